"""Step plans: typed, immutable objects made by the Rust core, one per step.

A runner reads them and builds tensors; it never recomputes tkv, padding or
block math. Their vectors are int64 NumPy arrays (``torch.from_numpy``
wraps them without a copy); plans pickle, for broadcasting to ranks.
"""

from __future__ import annotations

from typing import Union

from spyre_cb._core import ChunkPlan, DecodePlan, IdlePlan, PrefillPlan

StepPlan = Union[PrefillPlan, ChunkPlan, DecodePlan, IdlePlan]
#: What a runner executes (an idle step runs nothing).
ForwardPlan = Union[PrefillPlan, ChunkPlan, DecodePlan]

__all__ = ["PrefillPlan", "ChunkPlan", "DecodePlan", "IdlePlan", "StepPlan", "ForwardPlan"]
