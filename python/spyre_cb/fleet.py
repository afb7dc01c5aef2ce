"""Fleet sizing by simulation: N exact schedulers behind a routing rule.

``simulate_fleet(requests, limits..., replicas=N, router=...)`` runs a
workload (as :func:`spyre_cb.simulate` takes it) through ``N`` replicas of
one scheduler configuration, stepped together (a step takes as long on every
replica), each request routed when it arrives by the replicas' state then:

- ``least-loaded``: the replica with the fewest outstanding sequences
  (waiting + running + paused; ties: the lowest index);
- ``round-robin``: the next replica in turn;
- ``prefix-affinity``: among the replicas within ``slack`` (default 4)
  sequences of the least loaded, the one whose prefix cache holds most of
  the prompt (the chunked policy with ``prefix_caching``; needs prompts as
  token ids).

``fleet_size(requests, ..., ttft_p99=, itl_p99=)`` finds the fewest replicas
whose fleet meets the p99 targets (in steps). All of it runs in the Rust
core (``spyre_cb._core.simulate_fleet``, ``fleet_size``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from spyre_cb import _core
from spyre_cb._core import SchedulerConfig

#: The routing rules a fleet takes.
ROUTERS = ("least-loaded", "round-robin", "prefix-affinity")


@dataclass(frozen=True)
class FleetStats:
    """A fleet simulation: ``steps`` until everything finished, fleet
    ``latency`` (TTFT/ITL in steps), per replica ``replicas`` (requests, busy
    steps, utilisation, mean and max waiting, latency, counters), the replica
    of each request (``assignment``, -1: rejected) and ``rejected``."""

    router: str
    steps: int
    latency: dict[str, Any]
    replicas: list[dict[str, Any]]
    assignment: list[int]
    rejected: list[tuple[int, str]]

    @property
    def n_replicas(self) -> int:
        return len(self.replicas)

    def summary(self) -> str:
        """A per-replica table and the fleet's latency, as ``spyre-cb simulate --replicas`` prints it."""
        lines = [
            f"{self.n_replicas} replicas, router {self.router}: {self.steps} steps",
            f"{'replica':>7} {'requests':>8} {'util':>5} {'wait mean':>9} {'wait max':>8} "
            f"{'ttft p50':>8} {'ttft p99':>8} {'itl p50':>7} {'itl p99':>7} {'hit blocks':>10}",
        ]
        for i, r in enumerate(self.replicas):
            t, g = r["latency"]["ttft_steps"], r["latency"]["itl_steps"]
            lines.append(
                f"{i:>7} {r['requests']:>8} {r['utilisation']:>5.2f} {r['mean_waiting']:>9.1f} {r['max_waiting']:>8} "
                f"{t['p50']:>8.0f} {t['p99']:>8.0f} {g['p50']:>7.0f} {g['p99']:>7.0f} "
                f"{r['counters']['prefix_cached_blocks']:>10}"
            )
        t, g = self.latency["ttft_steps"], self.latency["itl_steps"]
        lines.append(
            f"fleet: ttft p50 {t['p50']:.0f} p99 {t['p99']:.0f} steps; itl p50 {g['p50']:.0f} p99 {g['p99']:.0f} steps"
        )
        return "\n".join(lines)


def _stats(router: str, d: dict[str, Any]) -> FleetStats:
    return FleetStats(
        router, d["steps"], d["latency"], d["replicas"], list(d["assignment"]), [tuple(x) for x in d["rejected"]]
    )


def _listed(requests: Iterable[Any]) -> Any:
    return requests if isinstance(requests, (list, tuple)) else list(requests)


def simulate_fleet(
    requests: Iterable[tuple[int, int, int] | dict[str, Any]],
    *config: SchedulerConfig | int | None,
    replicas: int = 2,
    router: str = "least-loaded",
    slack: int | None = None,
    steps: int | None = None,
    **limits: Any,
) -> FleetStats:
    """Runs ``requests`` through ``replicas`` schedulers behind ``router`` (see the module docs)."""
    d = _core.simulate_fleet(
        _listed(requests), *config, replicas=replicas, router=router, slack=slack, steps=steps, **limits
    )
    return _stats(router, d)


def fleet_size(
    requests: Iterable[tuple[int, int, int] | dict[str, Any]],
    *config: SchedulerConfig | int | None,
    ttft_p99: float | None = None,
    itl_p99: float | None = None,
    router: str = "least-loaded",
    slack: int | None = None,
    max_replicas: int = 16,
    **limits: Any,
) -> tuple[int, FleetStats] | None:
    """The fewest replicas (up to ``max_replicas``) whose fleet meets the p99 TTFT and
    ITL targets (steps; None: no target), with that fleet's stats; None if none does."""
    found = _core.fleet_size(
        _listed(requests),
        *config,
        ttft_p99=ttft_p99,
        itl_p99=itl_p99,
        router=router,
        slack=slack,
        max_replicas=max_replicas,
        **limits,
    )
    if found is None:
        return None
    n, d = found
    return n, _stats(router, d)


__all__ = ["ROUTERS", "FleetStats", "fleet_size", "simulate_fleet"]
