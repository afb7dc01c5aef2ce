"""How many CPUs this process may use, and the torch intra-op threads an
engine runs with.

``os.cpu_count()`` counts the machine's CPUs, not the ones a process may
run on: a CPU affinity mask (``taskset``, a container's cpuset) or a cgroup
CPU quota (``docker --cpus``) gives fewer, and running more intra-op threads
than that makes OpenMP threads wait on each other at every op.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch


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
