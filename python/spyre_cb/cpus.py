"""How many CPUs this process may use, and the torch intra-op threads an
engine runs with.

``os.cpu_count()`` counts the machine's CPUs, not the ones a process may
run on: a CPU affinity mask (``taskset``, a container's cpuset) or a cgroup
CPU quota (``docker --cpus``) gives fewer, and running more intra-op threads
than that makes OpenMP threads wait on each other at every op.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from pathlib import Path

import torch

from spyre_cb import _core


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 CFS), if one is set."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def intra_op_threads(num_threads: int | None, ranks: int = 1) -> int:
    """The threads each of ``ranks`` processes runs with: ``num_threads`` when
    given, else an equal share of the available CPUs."""
    return num_threads if num_threads else max(1, available_cpus() // ranks)


def _loaded_libgomp(maps: str, torch_dir: str) -> str | None:
    """The GNU OpenMP runtime torch runs its ops on, from this process's memory map
    (``/proc/self/maps``): the ``libgomp`` inside torch's install if one is mapped, else
    the only one mapped; None when there is none or no telling which."""
    paths = {line.split(None, 5)[5] for line in maps.splitlines() if len(line.split(None, 5)) == 6}
    gomp = sorted(p for p in paths if re.fullmatch(r"libgomp[-.\w]*\.so[.\d]*", os.path.basename(p)))
    mine = [p for p in gomp if p.startswith(torch_dir)]  # torch/lib or torch.libs
    if len(mine) == 1:
        return mine[0]
    return gomp[0] if len(gomp) == 1 else None


@functools.cache
def share_torch_workers() -> bool:
    """Has this project's kernels run their split work on torch's OpenMP workers
    (which spin between ops waiting for the next) rather than on threads started
    per call, which wait for a core beside them; True when torch's ATen runs on
    GNU OpenMP and its runtime was found. Once per process."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    library = _loaded_libgomp(maps, os.path.dirname(torch.__file__))
    return library is not None and _core.share_openmp_workers(library)


def kernel_threads() -> int:
    """The threads a call into this project's kernels may split over: torch's
    intra-op threads when the kernels share its workers, else one (a thread
    started per call costs more than a decode's matmul gains)."""
    return torch.get_num_threads() if share_torch_workers() else 1


class ThreadSetting:
    """Sets torch's intra-op threads for an engine's lifetime; ``restore()``
    puts back what the process had."""

    def __init__(self, threads: int) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(threads)

    def restore(self) -> None:
        torch.set_num_threads(self.before)


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of ``cpus`` since boot, from /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        busy += user + nice + system + irq + softirq + steal  # steal: a hypervisor's other tenants
        total += user + nice + system + idle + iowait + irq + softirq + steal
    return (busy, total) if total else None


class ThreadGovernor:
    """Re-picks the intra-op threads about once a second: the CPUs this process
    may use minus those other processes kept busy over the last interval.

    OpenMP threads wait for each other at the end of every op; when another
    process holds one of the cores, a thread that cannot run stalls the rest
    (measured: 2 threads on 2 cores with one core taken ran at 0.69x of 1
    thread). Used when ``num_threads`` is not given, in a single process whose
    CPUs are not capped by a cgroup quota (/proc/stat cannot see such a cap).
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = set(range(os.cpu_count() or 1))
        self.interval_s = interval_s
        self.enabled = _cgroup_quota() is None and _cpu_jiffies(self.cpus) is not None
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._mark()

    def _mark(self) -> None:
        self.t = time.monotonic()
        self.own = time.process_time()
        self.jiffies = _cpu_jiffies(self.cpus) if self.enabled else None

    def others_busy(self) -> float | None:
        """CPUs' worth of time other processes used since the last mark."""
        if self.jiffies is None:
            return None
        now = _cpu_jiffies(self.cpus)
        if now is None:
            return None
        wall = time.monotonic() - self.t
        busy = (now[0] - self.jiffies[0]) / self.tick
        return max(0.0, (busy - (time.process_time() - self.own)) / wall) if wall > 0 else None

    def maybe_adjust(self) -> None:
        """Call once per step; acts at most once per interval."""
        if not self.enabled or time.monotonic() - self.t < self.interval_s:
            return
        others = self.others_busy()
        self._mark()
        if others is not None:
            threads = min(len(self.cpus), max(1, len(self.cpus) - round(others)))
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
