"""Model-free simulation of a workload through the exact scheduler."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from spyre_cb import _core
from spyre_cb._core import SchedulerConfig, Trace


def simulate(
    requests: Iterable[tuple[int, int, int]],
    *config: SchedulerConfig | int | None,
    steps: int | None = None,
    **limits: Any,
) -> Trace:
    """Runs ``requests`` through the scheduler with no model.

    ``requests`` are ``(arrival_step, prompt_len, max_tokens)``; request ids are
    ``"0"``, ``"1"``, ... in list order. Every request generates exactly
    ``max_tokens`` tokens. Requests arriving at step N are added, then step N
    is observed, then the next step runs. With ``steps=None`` the simulation
    runs until every request has finished plus the step after (tkv back to 0);
    otherwise it records steps ``0..steps``.

    The limits are a :class:`SchedulerConfig`, or its fields (``max_num_seqs``,
    ``max_model_len``, ``available_blocks``, ``max_batch_tkv_limit``), resolved
    by the core exactly as ``SchedulerConfig(...)`` resolves them. Raises :class:`~spyre_cb.errors.ConfigError` for
    impossible limits. Invalid requests do not raise: they are listed in
    ``Trace.rejected``. Stretches of idle steps cost no memory; Ctrl-C
    interrupts a long run.
    """
    return _core.simulate(requests, *config, steps=steps, **limits)


__all__ = ["simulate", "Trace"]
