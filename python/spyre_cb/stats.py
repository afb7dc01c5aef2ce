"""Capacity planning: compact simulation statistics, their summary and a plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence

import numpy as np

from spyre_cb import _core

KINDS = ("idle", "prefill", "decode")


@dataclass
class SimulationStats:
    """Per-step columns (index = step) and per-request admission/finish steps."""

    requests: list[tuple[int, int, int]]
    n_blocks: int
    max_num_seqs: int
    max_model_len: int
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

    @property
    def n_steps(self) -> int:
        return max(len(self.tkv) - 1, 0)

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
            "idle_steps": int((self.kind[1:] == 0).sum()) if len(self.kind) else 0,
            "tokens": int(max_tokens[ok].sum()),
            "mean_batch_size": float(self.n_running[decode].mean()) if decode.any() else 0.0,
            "padding_share": float(self.padding_slots.sum() / computed) if computed else 0.0,
            "max_used_blocks": int(self.n_used_blocks.max()) if len(self.n_used_blocks) else 0,
            "max_reserved_blocks": int(self.n_reserved_blocks.max()) if len(self.n_reserved_blocks) else 0,
            "n_blocks": self.n_blocks,
            "queue_delay_mean": float(wait.mean()) if wait.size else 0.0,
            "queue_delay_p50": float(np.percentile(wait, 50)) if wait.size else 0.0,
            "queue_delay_p95": float(np.percentile(wait, 95)) if wait.size else 0.0,
            "queue_delay_max": int(wait.max()) if wait.size else 0,
            "latency_mean": float(latency.mean()) if latency.size else 0.0,
        }

    def plot(self, path, title: str | None = None) -> None:
        """Draws tkv, batch size, waiting length and reserved/used blocks over steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = np.arange(len(self.tkv))
        fig, ax = plt.subplots(4, 1, figsize=(11, 9), sharex=True, constrained_layout=True)
        ax[0].plot(x, self.tkv, lw=0.8, color="tab:blue")
        ax[0].set_ylabel("tkv")
        ax[0].axhline(self.max_model_len, ls="--", lw=0.8, color="grey", label="max_model_len")
        ax[0].legend(loc="upper right", fontsize=8)
        ax[1].plot(x, self.n_running, lw=0.8, color="tab:green")
        ax[1].axhline(self.max_num_seqs, ls="--", lw=0.8, color="grey", label="max_num_seqs")
        ax[1].set_ylabel("batch size")
        ax[1].legend(loc="upper right", fontsize=8)
        ax[2].plot(x, self.n_waiting, lw=0.8, color="tab:orange")
        ax[2].set_ylabel("waiting")
        ax[3].plot(x, self.n_reserved_blocks, lw=0.8, label="reserved", color="tab:red")
        ax[3].plot(x, self.n_used_blocks, lw=0.8, label="used", color="tab:purple")
        ax[3].axhline(self.n_blocks, ls="--", lw=0.8, color="grey", label="available")
        ax[3].set_ylabel("KV blocks")
        ax[3].set_xlabel("step")
        ax[3].legend(loc="upper right", fontsize=8)
        s = self.summary()
        fig.suptitle(
            title
            or f"{s['requests']} requests, {s['steps']} steps, mean batch {s['mean_batch_size']:.2f}, "
            f"padding {100 * s['padding_share']:.1f}%"
        )
        fig.savefig(path, dpi=110)
        plt.close(fig)


def simulate_stats(
    requests: Sequence[tuple[int, int, int]],
    max_num_seqs: int,
    max_model_len: int,
    available_blocks: int | None = None,
    max_batch_tkv_limit: int | None = None,
    steps: int | None = None,
) -> SimulationStats:
    """Runs the workload through the scheduler (no model) and returns compact statistics."""
    if not isinstance(requests, (list, tuple)):
        requests = list(requests) if isinstance(requests, Iterable) else requests
    d = _core.simulate_stats(  # validates every request (typed errors)
        requests,
        max_num_seqs,
        max_model_len,
        available_blocks=available_blocks,
        max_batch_tkv_limit=max_batch_tkv_limit,
        steps=steps,
    )
    n_blocks = _core.Scheduler(max_num_seqs, max_model_len, available_blocks, max_batch_tkv_limit).n_blocks
    cols = {k: np.asarray(d[k], dtype=np.int64) for k in (
        "tkv", "kind", "n_running", "n_waiting", "n_reserved_blocks", "n_used_blocks",
        "computed_slots", "padding_slots", "admitted", "finished",
    )}
    return SimulationStats(
        requests=[tuple(r) for r in requests], n_blocks=n_blocks, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
        rejected=dict(d["rejected"]), **cols,
    )
