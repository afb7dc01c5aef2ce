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
