"""spyre_cb: continuous batching for static-shape accelerators (IBM Spyre).

The scheduling core is Rust (``spyre_cb._core``); the model runner is a thin
Python layer over IBM Foundation Model Stack models.

Model-free planning works without torch::

    import spyre_cb
    trace = spyre_cb.simulate([(0, 49, 10), (0, 70, 4)], max_num_seqs=2, max_model_len=192)
    cfg = spyre_cb.SchedulerConfig(max_num_seqs=2, max_model_len=192)   # resolved limits
    trace = spyre_cb.simulate([(0, 49, 10)], cfg)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spyre_cb._core import (
    BLOCK_SIZE,
    ChunkedStepRecord,
    ChunkedTrace,
    RejectionReason,
    Scheduler,
    SchedulerConfig,
    StepRecord,
    Trace,
    UpdateOutcome,
    __version__,
)
from spyre_cb.config import EngineConfig
from spyre_cb.errors import (
    BackendUnavailableError,
    ConfigError,
    EngineDeadError,
    ExecutorError,
    InvalidRequestError,
    SchedulerStateError,
    SpyreCBError,
    UnknownRequestError,
)
from spyre_cb.fleet import FleetStats, fleet_size, simulate_fleet
from spyre_cb.plan import ChunkPlan, DecodePlan, IdlePlan, PrefillPlan, StepPlan
from spyre_cb.simulate import simulate
from spyre_cb.structured import StructuredOutputsParams

if TYPE_CHECKING:  # torch-backed parts load lazily
    from spyre_cb.async_engine import AsyncEngine
    from spyre_cb.beam_search import BeamSearchOutput, BeamSearchParams
    from spyre_cb.embedding import Embedder, EmbeddingOutput
    from spyre_cb.engine import Engine, StepOutput
    from spyre_cb.llm import LLM
    from spyre_cb.outputs import CompletionOutput, RequestOutput
    from spyre_cb.sampling import SamplingParams
    from spyre_cb.stats import SimulationStats, simulate_stats

_LAZY = {
    "LLM": "spyre_cb.llm",
    "RequestOutput": "spyre_cb.outputs",
    "CompletionOutput": "spyre_cb.outputs",
    "simulate_stats": "spyre_cb.stats",
    "SimulationStats": "spyre_cb.stats",
    "Engine": "spyre_cb.engine",
    "AsyncEngine": "spyre_cb.async_engine",
    "StepOutput": "spyre_cb.engine",
    "SamplingParams": "spyre_cb.sampling",
    "BeamSearchParams": "spyre_cb.beam_search",
    "BeamSearchOutput": "spyre_cb.beam_search",
    "Embedder": "spyre_cb.embedding",
    "EmbeddingOutput": "spyre_cb.embedding",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spyre_cb' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "BLOCK_SIZE",
    "EngineConfig",
    "SchedulerConfig",
    "RejectionReason",
    "UpdateOutcome",
    "Scheduler",
    "StepRecord",
    "Trace",
    "ChunkedStepRecord",
    "ChunkedTrace",
    "simulate",
    "simulate_fleet",
    "fleet_size",
    "FleetStats",
    "PrefillPlan",
    "ChunkPlan",
    "DecodePlan",
    "IdlePlan",
    "StepPlan",
    "SpyreCBError",
    "InvalidRequestError",
    "ConfigError",
    "ExecutorError",
    "EngineDeadError",
    "UnknownRequestError",
    "BackendUnavailableError",
    "SchedulerStateError",
    "LLM",
    "RequestOutput",
    "CompletionOutput",
    "simulate_stats",
    "SimulationStats",
    "Engine",
    "AsyncEngine",
    "StepOutput",
    "SamplingParams",
    "BeamSearchParams",
    "BeamSearchOutput",
    "Embedder",
    "EmbeddingOutput",
    "StructuredOutputsParams",
    "__version__",
]
