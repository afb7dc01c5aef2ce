"""Type stubs of the native module built from crates/spyre-cb-py."""

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, final, overload

import numpy as np
import numpy.typing as npt

BLOCK_SIZE: int
NULL_BLOCK: int
MAX_AVAILABLE_BLOCKS: int
__version__: str
__all__ = [
    "Router",
    "SpyreCBError",
    "InvalidRequestError",
    "ConfigError",
    "UnknownRequestError",
    "BackendUnavailableError",
    "SchedulerStateError",
    "ExecutorError",
    "SchedulerConfig",
    "Scheduler",
    "StepRecord",
    "Trace",
    "TraceIter",
    "UpdateOutcome",
    "RejectionReason",
    "PrefillPlan",
    "DecodePlan",
    "IdlePlan",
    "ChunkPlan",
    "ChunkedStepRecord",
    "ChunkedTrace",
    "plan_pooling",
    "simulate_fleet",
    "fleet_size",
    "simulate",
    "simulate_stats",
    "synthetic_workload",
    "paged_decode_attention",
    "paged_decode_attention_bf16",
    "paged_decode_qkv_bf16",
    "paged_decode_qkv_f32",
    "linear_bf16",
    "linear_bf16_is_fast",
    "pack_linear_bf16",
    "packed_linear_len",
    "linear_f32",
    "pack_linear_f32",
    "linear_f32_is_fast",
    "openmp_workers_shared",
    "add_rms_norm_bf16",
    "add_rms_norm_f32",
    "rms_norm_bf16",
    "rms_norm_f32",
    "rope_bf16",
    "rope_f32",
    "share_openmp_workers",
    "StopStringMatcher",
    "BLOCK_SIZE",
    "NULL_BLOCK",
    "MAX_AVAILABLE_BLOCKS",
    "__version__",
]

_I64 = npt.NDArray[np.int64]
_Request = tuple[int, int, int] | dict[str, Any]

class SpyreCBError(Exception): ...
class InvalidRequestError(SpyreCBError, ValueError): ...
class ConfigError(SpyreCBError, ValueError): ...
class UnknownRequestError(SpyreCBError, KeyError): ...
class BackendUnavailableError(SpyreCBError, RuntimeError): ...
class SchedulerStateError(SpyreCBError, RuntimeError): ...
class ExecutorError(SpyreCBError, RuntimeError): ...

@final
class SchedulerConfig:
    """The scheduler's limits with their defaults filled in and checked (immutable)."""

    FIELDS: ClassVar[list[str]]
    POLICIES: ClassVar[tuple[str, str]]
    def __new__(
        cls,
        max_num_seqs: int,
        max_model_len: int,
        available_blocks: int | None = None,
        max_batch_tkv_limit: int | None = None,
        policy: str | None = None,
        chunk_size: int | None = None,
        interleave: bool | None = None,
        decode_pausing: bool | None = None,
        prefix_caching: bool | None = None,
    ) -> SchedulerConfig: ...
    @property
    def policy(self) -> str: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def interleave(self) -> bool: ...
    @property
    def decode_pausing(self) -> bool: ...
    @property
    def prefix_caching(self) -> bool: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def available_blocks(self) -> int: ...
    @property
    def max_batch_tkv_limit(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def n_physical_blocks(self) -> int: ...
    @property
    def max_blocks_per_seq(self) -> int: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __reduce__(
        self,
    ) -> tuple[type[SchedulerConfig], tuple[int, int, int, int, str, int, bool, bool, bool]]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class StepRecord:
    """One observation of the scheduler (step 0: before any step); the chunk-only fields are None under the continuous policy."""

    def __new__(
        cls,
        step: int,
        tkv: int,
        waiting: list[str],
        running: list[str],
        request_outputs: list[str],
        finished_requests: list[str],
        n_reserved_blocks: int,
        n_used_blocks: int,
    ) -> StepRecord: ...
    @property
    def step(self) -> int: ...
    @property
    def tkv(self) -> int: ...
    @property
    def waiting(self) -> list[str]: ...
    @property
    def running(self) -> list[str]: ...
    @property
    def request_outputs(self) -> list[str]: ...
    @property
    def finished_requests(self) -> list[str]: ...
    @property
    def n_reserved_blocks(self) -> int: ...
    @property
    def n_used_blocks(self) -> int: ...
    @property
    def paused(self) -> list[str] | None: ...
    @property
    def n_cached_blocks(self) -> int | None: ...
    @property
    def n_prefix_hits(self) -> int | None: ...
    @property
    def block_tables(self) -> dict[str, list[int]] | None: ...
    @property
    def block_ref_count(self) -> dict[int, int] | None: ...
    @property
    def prefill_slot_mappings(self) -> dict[str, list[int]] | None: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __getnewargs__(self) -> tuple[int, int, list[str], list[str], list[str], list[str], int, int]: ...

@final
class Trace:
    """A simulation's records (trace[i] is step i; idle stretches are stored once), counters and latency."""

    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, key: int, /) -> StepRecord: ...
    @overload
    def __getitem__(self, key: slice, /) -> list[StepRecord]: ...
    def __iter__(self) -> Iterator[StepRecord]: ...
    @property
    def counters(self) -> dict[str, int]: ...
    @property
    def latency(self) -> dict[str, Any]: ...
    @property
    def max_decode_volume(self) -> int: ...
    @property
    def rejected(self) -> dict[str, str]: ...
    @property
    def n_stored_records(self) -> int: ...
    def to_dicts(self) -> list[dict[str, Any]]: ...

ChunkedStepRecord = StepRecord
ChunkedTrace = Trace

@final
class TraceIter:
    def __iter__(self) -> TraceIter: ...
    def __next__(self) -> StepRecord: ...

@final
class StopStringMatcher:
    """A request's stop strings, matched incrementally as its text grows."""

    def __new__(cls, stops: list[str]) -> StopStringMatcher: ...
    def feed(self, text: str) -> tuple[int, int] | None:
        """Appends text; (stop index, start offset in the whole text) of the first stop
        string (in order) that now occurs ending inside it, or None."""
    @property
    def held(self) -> int:
        """Characters at the text's end that may still start a stop string."""
    @property
    def fed(self) -> int: ...
    def __len__(self) -> int: ...

@final
class UpdateOutcome:
    """Ids that finished in the closed step, and ids aborted when it closed."""

    @property
    def finished(self) -> list[str]: ...
    @property
    def finish_reasons(self) -> list[str]: ...
    @property
    def stop_reasons(self) -> list[int | None]: ...
    @property
    def aborted(self) -> list[str]: ...

@final
class RejectionReason:
    """Why the next prefill (the head of the queue, or the next chunk) did not run."""

    BATCH_FULL: ClassVar[RejectionReason]
    PREFILL_TAKEN: ClassVar[RejectionReason]
    NO_ROOM_FOR_TOKENS: ClassVar[RejectionReason]
    SHIFT_OVERFLOWS_RUNNING: ClassVar[RejectionReason]
    NOT_ENOUGH_BLOCKS: ClassVar[RejectionReason]
    VOLUME_LIMIT: ClassVar[RejectionReason]
    INTERLEAVE: ClassVar[RejectionReason]
    PAUSED_DECODES: ClassVar[RejectionReason]
    @property
    def description(self) -> str: ...
    def __int__(self) -> int: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class PrefillPlan:
    """Prefill of one request, padded left to the batch tkv and right to a block boundary."""

    kind: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    def __new__(
        cls,
        request_id: str,
        tkv: int,
        tkv_shift: int,
        new_batch: bool,
        prompt_len: int,
        left_padding: int,
        right_padding: int,
        logits_index: int,
        input_ids: Sequence[int] | _I64,
        positions: Sequence[int] | _I64,
        slot_mapping: Sequence[int] | _I64,
        block_table: Sequence[int] | _I64,
        block_copies: Sequence[Sequence[int]] | _I64,
    ) -> PrefillPlan: ...
    @property
    def request_id(self) -> str: ...
    @property
    def tkv(self) -> int: ...
    @property
    def tkv_shift(self) -> int: ...
    @property
    def new_batch(self) -> bool: ...
    @property
    def prompt_len(self) -> int: ...
    @property
    def left_padding(self) -> int: ...
    @property
    def right_padding(self) -> int: ...
    @property
    def logits_index(self) -> int: ...
    @property
    def input_len(self) -> int: ...
    @property
    def input_ids(self) -> _I64: ...
    @property
    def positions(self) -> _I64: ...
    @property
    def slot_mapping(self) -> _I64: ...
    @property
    def block_table(self) -> _I64: ...
    @property
    def block_copies(self) -> _I64: ...
    @property
    def request_ids(self) -> tuple[str]: ...
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]: ...

@final
class DecodePlan:
    """One decode step of every running sequence, most recently admitted first."""

    kind: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    def __new__(
        cls,
        request_ids: tuple[str, ...],
        batch_size: int,
        tkv: int,
        input_ids: Sequence[int] | _I64,
        positions: Sequence[int] | _I64,
        slot_mapping: Sequence[int] | _I64,
        block_table: Sequence[Sequence[int]] | _I64,
        left_padding: Sequence[int] | _I64,
        current_tkv: Sequence[int] | _I64,
        block_copies: Sequence[Sequence[int]] | _I64,
    ) -> DecodePlan: ...
    @property
    def request_ids(self) -> tuple[str, ...]: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def tkv(self) -> int: ...
    @property
    def input_ids(self) -> _I64: ...
    @property
    def positions(self) -> _I64: ...
    @property
    def slot_mapping(self) -> _I64: ...
    @property
    def block_table(self) -> _I64: ...
    @property
    def block_copies(self) -> _I64: ...
    @property
    def left_padding(self) -> _I64: ...
    @property
    def current_tkv(self) -> _I64: ...
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]: ...

@final
class IdlePlan:
    """Nothing runs this step."""

    kind: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    def __new__(cls) -> IdlePlan: ...
    @property
    def request_ids(self) -> tuple[()]: ...
    def __reduce__(self) -> tuple[Any, tuple[()]]: ...

@final
class ChunkPlan:
    """One prefill chunk (chunked policy), attending over earlier chunks through the block table."""

    kind: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    def __new__(
        cls,
        request_id: str,
        prompt_len: int,
        chunk_index: int,
        chunk_count: int,
        chunk_size: int,
        left_padding: int,
        start: int,
        end: int,
        context_end: int,
        is_last: bool,
        logits_index: int,
        cached_blocks: int,
        input_ids: Sequence[int] | _I64,
        positions: Sequence[int] | _I64,
        slot_mapping: Sequence[int] | _I64,
        block_slots: Sequence[int] | _I64,
        block_table: Sequence[int] | _I64,
        block_copies: Sequence[Sequence[int]] | _I64,
    ) -> ChunkPlan: ...
    @property
    def request_id(self) -> str: ...
    @property
    def prompt_len(self) -> int: ...
    @property
    def chunk_index(self) -> int: ...
    @property
    def chunk_count(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def left_padding(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def context_end(self) -> int: ...
    @property
    def is_last(self) -> bool: ...
    @property
    def logits_index(self) -> int: ...
    @property
    def cached_blocks(self) -> int: ...
    @property
    def tkv(self) -> int: ...
    @property
    def input_ids(self) -> _I64: ...
    @property
    def positions(self) -> _I64: ...
    @property
    def slot_mapping(self) -> _I64: ...
    @property
    def block_slots(self) -> _I64: ...
    @property
    def block_table(self) -> _I64: ...
    @property
    def block_copies(self) -> _I64: ...
    @property
    def request_ids(self) -> tuple[str, ...]: ...
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]: ...

@final
class Scheduler:
    """Waiting queue, running batch, KV block pool and tkv, under either policy."""

    @overload
    def __new__(cls, config: SchedulerConfig, /) -> Scheduler: ...
    @overload
    def __new__(
        cls,
        max_num_seqs: int,
        max_model_len: int,
        available_blocks: int | None = None,
        max_batch_tkv_limit: int | None = None,
        policy: str | None = None,
        chunk_size: int | None = None,
        interleave: bool | None = None,
        decode_pausing: bool | None = None,
        prefix_caching: bool | None = None,
    ) -> Scheduler: ...
    @property
    def config(self) -> SchedulerConfig: ...
    @property
    def policy(self) -> str: ...
    @property
    def counters(self) -> dict[str, int]: ...
    @property
    def n_paused(self) -> int: ...
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        stop_token_ids: Sequence[int] | None = None,
        eos_token_ids: Sequence[int] | None = None,
        min_tokens: int | None = None,
        beam_width: int | None = None,
    ) -> None: ...
    def add_request_len(self, request_id: str, prompt_len: int, max_tokens: int) -> None: ...
    def validate(self, request_id: str, prompt_len: int, max_tokens: int, *, beam_width: int | None = None) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def schedule(self) -> PrefillPlan | ChunkPlan | DecodePlan | IdlePlan: ...
    def update(
        self, tokens: Sequence[int], stopped: Sequence[bool] | None = None, parents: Sequence[int] | None = None
    ) -> UpdateOutcome: ...
    def cancel(self) -> UpdateOutcome: ...
    @property
    def step_in_flight(self) -> bool: ...
    def snapshot(self) -> StepRecord: ...
    def has_unfinished_requests(self) -> bool: ...
    def check_invariants(self) -> None: ...
    def request_blocks(self, request_id: str) -> list[int] | None: ...
    def contains(self, request_id: str) -> bool: ...
    @property
    def last_rejection(self) -> RejectionReason | None: ...
    @property
    def is_drained(self) -> bool: ...
    @property
    def last_aborted(self) -> list[str]: ...
    @property
    def step(self) -> int: ...
    @property
    def tkv(self) -> int: ...
    @property
    def n_waiting(self) -> int: ...
    @property
    def n_running(self) -> int: ...
    @property
    def n_reserved_blocks(self) -> int: ...
    @property
    def n_unreserved_blocks(self) -> int: ...
    @property
    def n_used_blocks(self) -> int: ...

def plan_pooling(lengths: Sequence[int], config: SchedulerConfig) -> list[tuple[list[int], int]]:
    """Batches of an encoder's requests of ``lengths`` tokens: ``(indices, padded_len)``
    each, rows right-padded to a multiple of the block size."""

def simulate_fleet(requests: Iterable[Any], *config: SchedulerConfig | int | None, **kwargs: Any) -> dict[str, Any]:
    """``replicas`` schedulers behind a ``router`` over one workload (see spyre_cb.fleet)."""

@final
class Router:
    """The routing rule of ``simulate_fleet`` for a data-parallel server (see spyre_cb.data_parallel)."""

    def __new__(
        cls,
        rule: str | None = None,
        replicas: int | None = None,
        capacity_blocks: int | None = None,
        slack: int | None = None,
    ) -> Router: ...
    @property
    def rule(self) -> str: ...
    @property
    def replicas(self) -> int: ...
    def route(self, loads: Sequence[int | None], prompt: Sequence[int]) -> int | None: ...
    def cached_blocks(self, replica: int, prompt: Sequence[int]) -> int: ...
    def forget(self, replica: int) -> None: ...

def fleet_size(
    requests: Iterable[Any], *config: SchedulerConfig | int | None, **kwargs: Any
) -> tuple[int, dict[str, Any]] | None:
    """The fewest replicas meeting ``ttft_p99`` / ``itl_p99`` (see spyre_cb.fleet)."""

def simulate(
    requests: Iterable[_Request],
    *config: SchedulerConfig | int | None,
    steps: int | None = None,
    **limits: Any,
) -> Trace: ...
def simulate_stats(
    requests: Iterable[_Request],
    *config: SchedulerConfig | int | None,
    steps: int | None = None,
    record_steps: bool = True,
    **limits: Any,
) -> dict[str, Any]: ...
def synthetic_workload(
    n: int,
    *,
    seed: int | None = None,
    max_model_len: int | None = None,
    mean_interarrival: float = 4.0,
    prompt_median: float = 200.0,
    tokens_median: float = 100.0,
    sigma: float = 1.0,
    prompt_range: tuple[int, int] | None = None,
    tokens_range: tuple[int, int] | None = None,
) -> list[tuple[int, int, int]]: ...
def paged_decode_attention(
    query: npt.NDArray[np.float32],
    key_cache: npt.NDArray[np.float32],
    value_cache: npt.NDArray[np.float32],
    block_table: npt.NDArray[np.int64],
    context_start: npt.NDArray[np.int64],
    context_end: npt.NDArray[np.int64],
    scale: float,
    out: npt.NDArray[np.float32],
    threads: int = 1,
) -> None:
    """Decode attention read in place from a paged KV cache, written into ``out``.

    ``query`` ``[batch, heads, head_dim]``; caches ``[blocks, block_size,
    kv_heads, dim]``; ``block_table`` ``[batch, width]``; sequence ``i``
    attends to in-table positions ``context_start[i] <= j <
    context_end[i]``; ``out`` ``[batch, heads, value_dim]``. Arrays must be
    C-contiguous; a bad shape, range or block id raises ``ValueError``.
    """

def paged_decode_attention_bf16(
    query: npt.NDArray[np.float32],
    key_cache: npt.NDArray[np.uint16],
    value_cache: npt.NDArray[np.uint16],
    block_table: npt.NDArray[np.int64],
    context_start: npt.NDArray[np.int64],
    context_end: npt.NDArray[np.int64],
    scale: float,
    out: npt.NDArray[np.float32],
    threads: int = 1,
) -> None:
    """:func:`paged_decode_attention` over a bfloat16 cache given as its bits
    (``uint16`` views of torch's ``bfloat16`` storage); query and ``out`` in float32."""

def pack_linear_bf16(weight: npt.NDArray[np.uint16], packed: npt.NDArray[np.uint16]) -> None:
    """Reorders a bfloat16 weight (``[out, in]``, the bits of an ``nn.Linear``'s weight)
    into ``packed`` (1-D, :func:`packed_linear_len` elements): blocks of 32 output
    features holding each pair of inner elements of every feature together, padded
    with zeros. A length that disagrees raises ``ValueError``."""

def pack_linear_f32(weight: npt.NDArray[np.float32], packed: npt.NDArray[np.float32]) -> None:
    """:func:`pack_linear_bf16` for a float32 weight: blocks of 32 output features
    holding each inner element of every feature together."""

def packed_linear_len(out_features: int, in_features: int, dtype: str) -> int:
    """Elements of a packed weight of ``out_features x in_features`` in ``dtype``
    (``"bfloat16"`` or ``"float32"``; another raises ``ValueError``)."""

def linear_bf16(
    x: npt.NDArray[np.uint16],
    packed: npt.NDArray[np.uint16],
    bias: npt.NDArray[np.uint16] | None,
    out: npt.NDArray[np.uint16],
    threads: int = 1,
) -> None:
    """``out = x weight^T + bias`` in bfloat16, every array the bits of a bfloat16
    tensor: ``x`` ``[rows, in]``, ``packed`` the weight packed by
    :func:`pack_linear_bf16`, ``bias`` ``[out]``, ``out`` ``[rows, out]``; ``f32`` sums
    rounded once to nearest even. Split over up to ``threads`` threads by block of
    output features; the GIL is released. Every array must be C-contiguous; lengths
    that disagree with the shapes raise ``ValueError``."""

def linear_f32(
    x: npt.NDArray[np.float32],
    packed: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    out: npt.NDArray[np.float32],
    threads: int = 1,
) -> None:
    """:func:`linear_bf16` in float32 (fused multiply-adds), the weight packed by
    :func:`pack_linear_f32`."""

def linear_f32_is_fast() -> bool:
    """Whether this CPU runs :func:`linear_f32` vectorized (AVX-512F)."""

def linear_bf16_is_fast() -> bool:
    """Whether this CPU runs :func:`linear_bf16` vectorized (AVX512_BF16); without it
    the kernel still computes the right numbers, slowly."""

def share_openmp_workers(library: str | None) -> bool:
    """Runs the kernels' split work on the workers of the GNU OpenMP runtime at
    ``library`` (torch's ``libgomp``), through its ``GOMP_parallel``, instead of
    on threads started per call; ``None`` goes back to those. Never loads the
    library: returns False, and changes nothing, when it is not already loaded
    in this process or lacks the entry."""

def openmp_workers_shared() -> bool:
    """Whether the kernels' split work runs on a shared OpenMP runtime's workers."""

def paged_decode_qkv_bf16(
    qkv: npt.NDArray[np.uint16],
    cos: npt.NDArray[np.float32],
    neg_sin: npt.NDArray[np.float32],
    sin: npt.NDArray[np.float32],
    slots: npt.NDArray[np.int64],
    key_cache: npt.NDArray[np.uint16],
    value_cache: npt.NDArray[np.uint16],
    block_table: npt.NDArray[np.int64],
    context_start: npt.NDArray[np.int64],
    context_end: npt.NDArray[np.int64],
    scale: float,
    n_heads: int,
    out: npt.NDArray[np.uint16],
    threads: int = 1,
) -> None:
    """A decode step's attention from its fused QKV rows (``[batch, (n_heads +
    kv_heads) * head_dim + kv_heads * value_dim]``, bfloat16 as its bits): the
    query and key heads rotated by each token's angles (``[batch, head_dim / 2]``
    each), the new keys and values stored at ``slots`` of the paged caches
    (``[n_blocks, block_size, kv_heads, dim]``), the attention over each
    sequence's positions ``context_start <= j < context_end`` of its block table,
    rounded into ``out`` (``[batch, n_heads * value_dim]``). FMS's separate steps,
    bit for bit. ``ValueError`` naming the limit broken, checked before the cache
    is written."""

def paged_decode_qkv_f32(
    qkv: npt.NDArray[np.float32],
    cos: npt.NDArray[np.float32],
    neg_sin: npt.NDArray[np.float32],
    sin: npt.NDArray[np.float32],
    slots: npt.NDArray[np.int64],
    key_cache: npt.NDArray[np.float32],
    value_cache: npt.NDArray[np.float32],
    block_table: npt.NDArray[np.int64],
    context_start: npt.NDArray[np.int64],
    context_end: npt.NDArray[np.int64],
    scale: float,
    n_heads: int,
    out: npt.NDArray[np.float32],
    threads: int = 1,
) -> None:
    """:func:`paged_decode_qkv_bf16` in float32."""

def add_rms_norm_bf16(
    delta: npt.NDArray[np.uint16],
    multiplier: float | None,
    h: npt.NDArray[np.uint16],
    weight: npt.NDArray[np.uint16] | None,
    bias: npt.NDArray[np.uint16] | None,
    eps: float,
    out: npt.NDArray[np.uint16],
) -> None:
    """A residual connection, then the next RMS norm (bfloat16 as its bits):
    ``h = delta * multiplier + h`` in place (``delta + h`` when ``multiplier`` is
    None), each op rounded as torch rounds it, then ``out`` = :func:`rms_norm_bf16`
    of ``h``; ``ValueError`` for shapes that disagree (nothing written)."""

def add_rms_norm_f32(
    delta: npt.NDArray[np.float32],
    multiplier: float | None,
    h: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32] | None,
    bias: npt.NDArray[np.float32] | None,
    eps: float,
    out: npt.NDArray[np.float32],
) -> None:
    """:func:`add_rms_norm_bf16` in float32."""

def rms_norm_bf16(
    x: npt.NDArray[np.uint16],
    weight: npt.NDArray[np.uint16] | None,
    bias: npt.NDArray[np.uint16] | None,
    eps: float,
    out: npt.NDArray[np.uint16],
) -> None:
    """Root-mean-square normalization of each row of ``x`` (``[rows, dim]``) into
    ``out``, then times ``weight`` and plus ``bias`` (``[dim]`` each, optional), in
    bfloat16 given as its bits, computed in float32 and rounded after each step as
    torch rounds FMS's ``LayerNormParameterized``; ``ValueError`` for shapes that
    disagree."""

def rms_norm_f32(
    x: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32] | None,
    bias: npt.NDArray[np.float32] | None,
    eps: float,
    out: npt.NDArray[np.float32],
) -> None:
    """:func:`rms_norm_bf16` in float32."""

def rope_bf16(
    x: npt.NDArray[np.uint16],
    cos: npt.NDArray[np.float32],
    neg_sin: npt.NDArray[np.float32],
    sin: npt.NDArray[np.float32],
    out: npt.NDArray[np.uint16],
) -> None:
    """FMS's rotary embedding of ``x`` (``[rows, heads, head_dim]``, bfloat16 as its
    bits) into ``out``, each row's pairs rotated by its angles (``cos``, ``neg_sin``,
    ``sin``: ``[rows, head_dim / 2]``), with torch's roundings (FMS's results, bit
    for bit); ``ValueError`` for shapes that disagree."""

def rope_f32(
    x: npt.NDArray[np.float32],
    cos: npt.NDArray[np.float32],
    neg_sin: npt.NDArray[np.float32],
    sin: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
) -> None:
    """:func:`rope_bf16` in float32."""
