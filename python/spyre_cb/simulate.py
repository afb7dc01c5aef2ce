"""Model-free simulation of a workload through the exact scheduler, under
either policy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from spyre_cb import _core
from spyre_cb._core import ChunkedTrace, SchedulerConfig, Trace

#: A simulated request: ``(arrival_step, prompt_len, max_tokens)`` or a dict
#: ``{"id", "arrival_step", "prompt_token_ids", "max_tokens", "output_token_ids"}``.
SimRequest = tuple[int, int, int] | dict[str, Any]


def simulate(
    requests: Iterable[SimRequest],
    *config: SchedulerConfig | int | None,
    steps: int | None = None,
    **limits: Any,
) -> Trace:
    """Runs ``requests`` through the scheduler with no model.

    ``requests`` are ``(arrival_step, prompt_len, max_tokens)`` tuples (ids
    ``"0"``, ``"1"``, ... in list order) or dicts with ``"id"`` (optional),
    ``"arrival_step"``, ``"prompt_token_ids"``, ``"max_tokens"`` and optionally
    ``"output_token_ids"``: the tokens the request emits (prefix-cache hits on
    blocks filled during decode depend on them; without them a request emits
    tokens that match no prompt). Every request generates exactly
    ``max_tokens`` tokens. Requests arriving at step N are added, then step N
    is observed, then the next step runs. With ``steps=None`` the simulation
    runs until every request has finished plus the step after (tkv back to 0);
    otherwise it records steps ``0..steps``.

    The limits are a :class:`SchedulerConfig`, or its fields (``max_num_seqs``,
    ``max_model_len``, ``available_blocks``, ``max_batch_tkv_limit``, and
    ``policy="continuous"`` (default: the published policy) or ``"chunked"``
    with ``chunk_size``, ``interleave``, ``decode_pausing``, ``prefix_caching``),
    resolved by the core exactly as ``SchedulerConfig(...)`` resolves them.
    Returns a :class:`Trace`: its records (under the chunked policy with
    block tables, ref counts and paused requests), ``counters`` and ``latency``.
    (``ChunkedTrace`` is the same class, under its former name.)
    Raises :class:`~spyre_cb.errors.ConfigError` for impossible limits. Invalid
    requests do not raise: they are listed in ``trace.rejected``. Stretches of
    idle steps cost no memory; Ctrl-C interrupts a long run.
    """
    return _core.simulate(requests, *config, steps=steps, **limits)


__all__ = ["simulate", "SimRequest", "Trace", "ChunkedTrace"]
