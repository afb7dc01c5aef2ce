"""Capacity planning: compact simulation statistics, their summary and a plot."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from spyre_cb import _core
from spyre_cb._core import RejectionReason, SchedulerConfig
from spyre_cb.errors import ConfigError
from spyre_cb.fleet import FleetStats, simulate_fleet

KINDS = ("idle", "prefill", "decode")


def describe_wait(reason: str) -> str:
    """A waits_by_reason key (a RejectionReason name, either policy) in words."""
    return str(getattr(RejectionReason, reason).description)


def nearest_rank(values: np.ndarray, p: float) -> float:
    """The ``p``-th percentile (0 < p <= 100) by nearest rank: the smallest observed
    value with at least p% of the sample at or below it (0 for an empty sample).

    The definition the core uses for the time-to-first-token and inter-token
    percentiles, so every percentile of a summary is one of the observed step
    counts and they compare like for like (no interpolated half steps).
    """
    if not values.size:
        return 0.0
    v = np.sort(values)
    k = min(max(int(np.ceil(p / 100 * v.size)), 1), v.size)
    return float(v[k - 1])


@dataclass
class SimulationStats:
    """Per-step columns and per-request admission/finish steps.

    Each row is one step, or one stretch of identical idle steps: ``step`` is
    the first step a row stands for and ``span`` how many it stands for.
    """

    requests: list[tuple[int, int, int]]
    config: SchedulerConfig
    step: np.ndarray
    span: np.ndarray
    tkv: np.ndarray
    kind: np.ndarray
    n_running: np.ndarray
    n_waiting: np.ndarray
    n_reserved_blocks: np.ndarray
    n_used_blocks: np.ndarray
    computed_slots: np.ndarray
    padding_slots: np.ndarray
    admitted: np.ndarray  #: step of each request's prefill, -1 if rejected
    finished: np.ndarray  #: step each request finished, -1 if rejected
    rejected: dict[str, str] = field(default_factory=dict)
    #: steps in which the next prefill waited, by reason (RejectionReason names, both policies)
    waits_by_reason: dict[str, int] = field(default_factory=dict)
    #: time to first token and inter-token latency in steps ({"n", "mean", "p50", "p99", "max"}
    #: each) and the longest pause
    latency: dict[str, Any] = field(default_factory=dict)
    #: steps by kind, pause/resume events (chunked), prefix-cache savings (chunked)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def policy(self) -> str:
        return self.config.policy

    def wait_reasons(self) -> list[tuple[str, int]]:
        """(condition in words, steps) for each condition that kept a request waiting, most first."""
        out = [(describe_wait(k), v) for k, v in self.waits_by_reason.items() if v]
        return sorted(out, key=lambda kv: -kv[1])

    @property
    def n_steps(self) -> int:
        """Steps run (step 0, the state before any step, not counted)."""
        return int(self.step[-1] + self.span[-1] - 1) if len(self.step) else 0

    @property
    def n_blocks(self) -> int:
        return self.config.available_blocks

    def summary(self) -> dict:
        """Headline numbers of the run."""
        ok = self.admitted >= 0
        arrivals = np.array([r[0] for r in self.requests], dtype=np.int64)
        max_tokens = np.array([r[2] for r in self.requests], dtype=np.int64)
        wait = (self.admitted - arrivals)[ok]
        latency = (self.finished - arrivals)[ok]
        decode = self.kind == 2
        computed = int(self.computed_slots.sum())
        return {
            "requests": len(self.requests),
            "rejected": len(self.rejected),
            "steps": self.n_steps,
            "prefill_steps": int((self.kind == 1).sum()),
            "decode_steps": int(decode.sum()),
            "idle_steps": int(self.span[1:][self.kind[1:] == 0].sum()) if len(self.kind) else 0,
            "tokens": int(max_tokens[ok].sum()),
            "mean_batch_size": float(self.n_running[decode].mean()) if decode.any() else 0.0,
            "padding_share": float(self.padding_slots.sum() / computed) if computed else 0.0,
            "max_used_blocks": int(self.n_used_blocks.max()) if len(self.n_used_blocks) else 0,
            "max_reserved_blocks": int(self.n_reserved_blocks.max()) if len(self.n_reserved_blocks) else 0,
            "n_blocks": self.n_blocks,
            "queue_delay_mean": float(wait.mean()) if wait.size else 0.0,
            "queue_delay_p50": nearest_rank(wait, 50),
            "queue_delay_p95": nearest_rank(wait, 95),
            "queue_delay_max": int(wait.max()) if wait.size else 0,
            "latency_mean": float(latency.mean()) if latency.size else 0.0,
            "waits_by_reason": dict(self.waits_by_reason),
            "policy": self.policy,
            "ttft_steps": dict(self.latency.get("ttft_steps", {})),
            "itl_steps": dict(self.latency.get("itl_steps", {})),
            "max_pause_steps": int(self.latency.get("max_pause_steps", 0)),
            "pause_events": int(self.counters.get("pause_events", 0)),
            "prefix_cached_blocks": int(self.counters.get("prefix_cached_blocks", 0)),
        }

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Draws tkv, batch size, waiting length and reserved/used blocks over steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = self.step  # rows of idle stretches span several steps
        line = dict(lw=0.8, drawstyle="steps-post")
        fig, ax = plt.subplots(4, 1, figsize=(11, 9), sharex=True, constrained_layout=True)
        ax[0].plot(x, self.tkv, color="tab:blue", **line)
        ax[0].set_ylabel("tkv")
        ax[0].axhline(self.config.max_model_len, ls="--", lw=0.8, color="grey", label="max_model_len")
        ax[0].legend(loc="upper right", fontsize=8)
        ax[1].plot(x, self.n_running, color="tab:green", **line)
        ax[1].axhline(self.config.max_num_seqs, ls="--", lw=0.8, color="grey", label="max_num_seqs")
        ax[1].set_ylabel("batch size")
        ax[1].legend(loc="upper right", fontsize=8)
        ax[2].plot(x, self.n_waiting, color="tab:orange", **line)
        ax[2].set_ylabel("waiting")
        reasons = self.wait_reasons()
        if reasons:
            text = "the queue head waited because:\n" + "\n".join(f"{why}: {n} steps" for why, n in reasons)
            ax[2].text(
                0.01,
                0.95,
                text,
                transform=ax[2].transAxes,
                va="top",
                fontsize=7,
                bbox=dict(facecolor="white", alpha=0.8, lw=0),
            )
        ax[3].plot(x, self.n_reserved_blocks, label="reserved", color="tab:red", **line)
        ax[3].plot(x, self.n_used_blocks, label="used", color="tab:purple", **line)
        ax[3].axhline(self.n_blocks, ls="--", lw=0.8, color="grey", label="available")
        ax[3].set_ylabel("KV blocks")
        ax[3].set_xlabel("step")
        ax[3].legend(loc="upper right", fontsize=8)
        s = self.summary()
        fig.suptitle(
            title
            or f"{self.policy} policy: {s['requests']} requests, {s['steps']} steps, "
            f"mean batch {s['mean_batch_size']:.2f}, padding {100 * s['padding_share']:.1f}%"
            + (f", TTFT p50 {s['ttft_steps']['p50']:.0f} steps" if s["ttft_steps"] else "")
        )
        fig.savefig(path, dpi=110)
        plt.close(fig)


@overload
def simulate_stats(
    requests: Iterable[tuple[int, int, int] | dict[str, Any]],
    *config: SchedulerConfig | int | None,
    steps: int | None = None,
    replicas: None = None,
    router: str | None = None,
    **limits: Any,
) -> SimulationStats: ...
@overload
def simulate_stats(
    requests: Iterable[tuple[int, int, int] | dict[str, Any]],
    *config: SchedulerConfig | int | None,
    steps: int | None = None,
    replicas: int,
    router: str | None = None,
    **limits: Any,
) -> FleetStats: ...
def simulate_stats(
    requests: Iterable[tuple[int, int, int] | dict[str, Any]],
    *config: SchedulerConfig | int | None,
    steps: int | None = None,
    replicas: int | None = None,
    router: str | None = None,
    **limits: Any,
) -> SimulationStats | FleetStats:
    """Runs the workload through the scheduler (no model) and returns compact statistics.

    The limits are a :class:`SchedulerConfig` or its fields as keywords
    (``policy="chunked"`` and its options included), as for :func:`spyre_cb.simulate`.
    With ``replicas`` (and ``router``): a fleet of that many schedulers behind
    the routing rule, as :func:`spyre_cb.fleet.simulate_fleet` runs it.
    """
    if replicas is not None:
        return simulate_fleet(
            requests, *config, replicas=replicas, router=router or "least-loaded", steps=steps, **limits
        )
    if router is not None:
        raise ConfigError("router needs replicas")
    if not isinstance(requests, (list, tuple)):
        requests = list(requests) if isinstance(requests, Iterable) else requests
    # the core resolves the limits and validates every request (typed errors)
    d = _core.simulate_stats(requests, *config, steps=steps, **limits)
    cfg: SchedulerConfig = d["config"]
    cols = {
        k: np.asarray(d[k], dtype=np.int64)
        for k in (
            "step",
            "span",
            "tkv",
            "kind",
            "n_running",
            "n_waiting",
            "n_reserved_blocks",
            "n_used_blocks",
            "computed_slots",
            "padding_slots",
            "admitted",
            "finished",
        )
    }
    return SimulationStats(
        requests=[_as_tuple(r) for r in requests],
        config=cfg,
        rejected=dict(d["rejected"]),
        waits_by_reason=dict(d["waits_by_reason"]),
        latency=dict(d["latency"]),
        counters=dict(d.get("counters", {})),
        **cols,
    )


def _as_tuple(r: Any) -> tuple[int, int, int]:
    if isinstance(r, dict):
        return (int(r["arrival_step"]), len(r["prompt_token_ids"]), int(r["max_tokens"]))
    a, p, m = r
    return (int(a), int(p), int(m))
