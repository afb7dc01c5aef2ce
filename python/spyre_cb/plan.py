"""Step plans as plain, picklable data (one per step, made by the Rust core).

A runner reads these and builds tensors; it never recomputes tkv, padding or
block math. Positions and slots are precomputed; see the field docs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """Prefill of one request, padded left to the batch tkv and right to a block boundary."""

    request_id: str
    tkv: int  #: batch tkv after the prefill; the last prompt token sits at tkv - 1
    tkv_shift: int  #: how far the running sequences moved right (multiple of 64)
    new_batch: bool
    prompt_len: int
    left_padding: int  #: pad tokens before the prompt (fully padded blocks cut off)
    right_padding: int  #: pad tokens after the prompt up to the block boundary
    input_ids: list[int]  #: padded input (pads are 0); empty for token-less requests
    positions: list[int]  #: position ids: pads 0, prompt 0..prompt_len-1
    slot_mapping: list[int]  #: KV slot of every input token
    block_table: list[int]  #: the blocks this prefill fills
    logits_index: int  #: index of the last prompt token in the input

    kind = "prefill"

    @property
    def input_len(self) -> int:
        return self.left_padding + self.prompt_len + self.right_padding

    @property
    def request_ids(self) -> list[str]:
        return [self.request_id]


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """One decode step of every running sequence, most recently admitted first."""

    request_ids: list[str]
    tkv: int  #: virtual position written this step (batch tkv before the step)
    input_ids: list[int]  #: last generated token of each sequence
    positions: list[int]  #: position id of each input token
    slot_mapping: list[int]  #: KV slot each input token is written to
    block_table: list[list[int]]  #: rectangular, padded with the null block 0
    left_padding: list[int]  #: in-table index of each sequence's first real token
    current_tkv: list[int]  #: in-table length including this step's token

    kind = "decode"


@dataclass(frozen=True, slots=True)
class IdlePlan:
    """Nothing to run this step."""

    kind = "idle"

    @property
    def request_ids(self) -> list[str]:
        return []


StepPlan = Union[PrefillPlan, DecodePlan, IdlePlan]

_IDLE = IdlePlan()


def plan_from_dict(d: dict[str, Any]) -> StepPlan:
    """Builds the typed plan from the core's dict."""
    kind = d.pop("kind")
    if kind == "prefill":
        return PrefillPlan(**d)
    if kind == "decode":
        return DecodePlan(**d)
    return _IDLE
