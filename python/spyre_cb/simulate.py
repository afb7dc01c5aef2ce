"""Model-free simulation of a workload through the exact scheduler."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from spyre_cb import _core
from spyre_cb._core import StepRecord


class Trace(list[StepRecord]):
    """A list of :class:`StepRecord`, one per step (``trace[i].step == i``).

    ``rejected`` maps the ids of requests refused at ``add_request`` to the
    reason; the other requests ran as if those had never been submitted.
    """

    rejected: dict[str, str]

    def __init__(self, records: Iterable[StepRecord] = (), rejected: dict[str, str] | None = None):
        super().__init__(records)
        self.rejected = dict(rejected or {})

    def to_dicts(self) -> list[dict]:
        return [r.to_dict() for r in self]


def simulate(
    requests: Sequence[tuple[int, int, int]],
    max_num_seqs: int,
    max_model_len: int,
    available_blocks: int | None = None,
    max_batch_tkv_limit: int | None = None,
    steps: int | None = None,
) -> Trace:
    """Runs ``requests`` through the scheduler with no model.

    ``requests`` are ``(arrival_step, prompt_len, max_tokens)``; request ids are
    ``"0"``, ``"1"``, ... in list order. Every request generates exactly
    ``max_tokens`` tokens. Requests arriving at step N are added, then step N
    is observed, then the next step runs. With ``steps=None`` the simulation
    runs until every request has finished plus the step after (tkv back to 0);
    otherwise it records steps ``0..steps``.

    Raises :class:`~spyre_cb.errors.ConfigError` for impossible limits. Invalid
    requests do not raise: they are listed in ``Trace.rejected``.
    """
    records, rejected = _core.simulate(
        requests,
        max_num_seqs,
        max_model_len,
        available_blocks=available_blocks,
        max_batch_tkv_limit=max_batch_tkv_limit,
        steps=steps,
    )
    return Trace(records, dict(rejected))
