"""The model runner: turns each step plan into padded tensors and runs the model.

It only reads the plan made by the Rust core (positions, slots, block tables,
paddings); it never computes tkv or block math itself.
"""

from __future__ import annotations

from typing import Any

import torch

from spyre_cb import attention, decoder, linear, norm, rotary
from spyre_cb.checkpoint import Checkpoint
from spyre_cb.config import EngineConfig
from spyre_cb.cpus import share_torch_workers
from spyre_cb.errors import BackendUnavailableError, ConfigError
from spyre_cb.plan import ChunkPlan, DecodePlan, ForwardPlan, PrefillPlan

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_backend(backend: str) -> None:
    """Fails fast, before any model is loaded, for a backend whose software stack is
    not installed here (EngineConfig has already checked the name)."""
    if backend == "sendnn":
        try:
            import torch_sendnn  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'sendnn' runs on an IBM Spyre AIU and needs the torch_sendnn package "
                f"(the AIU software stack), which is not installed here ({e}); "
                "use backend='eager' or 'inductor' on CPU"
            ) from None


def check_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """A cheap load-time check that FMS filled every parameter with finite numbers.

    FMS leaves parameters it finds no weights for uninitialized (for example
    when config.json names more layers than were saved), which would produce
    garbage silently; NaN or infinite weights would too.
    """
    path = checkpoint.path
    params = list(model.parameters())
    needed = sum(p.numel() for p in params)
    stored = checkpoint.stored_weights()
    if stored is not None and needed > stored:
        raise ConfigError(
            f"model directory {str(path)!r}: config.json describes a model of {needed:,} weights but the "
            f"checkpoint stores only {stored:,}: the config does not match the weights (more layers or larger "
            "dimensions than were saved?)"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        if not bool(torch.isfinite(p).all()):
            raise ConfigError(
                f"model directory {str(path)!r}: weight {names.get(id(p), '?')} holds NaN or infinite values"
            )


class ModelRunner:
    """Loads an FMS model and executes step plans against a paged KV cache."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig, *, tensor_parallel: bool = False) -> None:
        backend = config.backend
        dtype = TORCH_DTYPES[config.dtype]
        check_backend(backend)
        path = checkpoint.path
        attention.register()
        from fms.models import get_model

        try:
            if tensor_parallel:  # this rank's shard; the process group is set up by the executor
                model = get_model(
                    architecture="hf_pretrained",
                    model_path=str(path),
                    data_type=dtype,
                    distributed_strategy="tp",
                    group=torch.distributed.group.WORLD,
                )
            else:
                model = get_model(architecture="hf_pretrained", model_path=str(path), data_type=dtype)
        except Exception as e:  # an unreadable or unsupported checkpoint
            raise ConfigError(f"could not load model from {str(path)!r} with FMS: {type(e).__name__}: {e}") from e
        check_weights(model, checkpoint)
        model.eval()
        #: how the linear layers run: "native" (this project's bfloat16 kernel),
        #: "onednn" (prepacked at load) or "torch"
        self.linear_ops = linear.resolve(config.linear_ops, backend, dtype)
        linear.replace_linears(model, self.linear_ops, batch_hint=config.max_num_seqs)
        if backend == "eager":  # compiled backends fuse their own norms
            norm.replace_norms(model)
        # the native kernels split their work on torch's OpenMP workers, not beside them
        share_torch_workers()
        rotary.patch_rotary(model)  # bit-identical to FMS's, a quarter of the work
        #: decode steps as a loop of native kernel calls (FMS's logits, bit for bit),
        #: where the model allows it; None: FMS's forward
        self.decoder = decoder.build(
            model,
            backend=backend,
            linear_ops=self.linear_ops,
            attention_ops=config.attention_ops,
            tensor_parallel=tensor_parallel,
        )
        self.model = model
        self.dtype = dtype
        self.backend = backend
        self.attn_name = attention.ATTENTION_OPS[config.attention_ops]
        #: FMS's reference ops run the padded inputs (their prefill op guesses
        #: layouts from shapes); this project's ops run prompt tokens only
        self.pad_inputs = config.attention_ops == "fms"
        self.block_size = block_size = config.scheduler.block_size
        self.vocab_size = int(model.config.src_vocab_size)
        attn = model.base_model.layers[0].attn
        self.kv_heads = int(attn.kvheads)
        self.head_dim = int(attn.emb_kq_per_head)
        self.n_layers = len(model.base_model.layers)
        shape = (config.scheduler.n_physical_blocks, block_size, self.kv_heads, self.head_dim)
        self.kv_cache = _allocate_kv_cache(shape, self.n_layers, dtype)
        self._forward = self._compile(model, backend)

    @staticmethod
    def _compile(model: Any, backend: str) -> Any:
        if backend == "eager":
            return model
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # A block count equal to a prefill length would otherwise merge two
        # dynamic sizes into one symbol and force recompiles.
        fx_config.use_duck_shape = False
        if backend == "inductor":
            return torch.compile(model, backend="inductor", dynamic=True)
        return torch.compile(model, backend="sendnn", dynamic=False)

    @torch.inference_mode()
    def execute(self, plan: ForwardPlan, *, all_positions: bool = False) -> torch.Tensor:
        """Runs one step; returns next-token logits, one row per sampling
        sequence (none for a non-final chunk), or for a prefill or chunk with
        ``all_positions`` one row per prompt token of the input (padding has
        none).

        Padding is part of the plan (the shapes a Spyre card runs) but not of
        the computation here: a prefill or chunk runs its prompt tokens only.
        Their KV lands in the same slots; the padding's slots are never read
        (decodes attend from each sequence's left padding on, and every query
        attends only up to its own position), so no result changes. FMS's
        reference ops (``attention_ops="fms"``) get the padded input, as
        before."""
        if len(plan.block_copies):
            self._copy_blocks(plan.block_copies)
        if isinstance(plan, PrefillPlan):
            return self._prefill(plan, all_positions)
        if isinstance(plan, ChunkPlan):
            return self._chunk(plan, all_positions)
        return self._decode(plan)

    def _copy_blocks(self, copies: Any) -> None:
        """Copies KV blocks ``copies[:, 0]`` onto ``copies[:, 1]`` in every layer (beams
        the core forked onto their own copy of a block they shared)."""
        src = torch.from_numpy(copies[:, 0])
        dst = torch.from_numpy(copies[:, 1])
        for k, v in self.kv_cache:
            k[dst] = k[src]
            v[dst] = v[src]

    def _chunk(self, plan: ChunkPlan, all_positions: bool = False) -> torch.Tensor:
        """One chunk of a chunked prefill: its queries attend over the request's
        earlier chunks and cached prefix blocks through its block table (the
        decode attention op with several queries per sequence)."""
        n = plan.end - plan.start  # prompt positions start..end (in-table positions too)
        real = slice(plan.left_padding, plan.left_padding + n)
        out = self._run_prompt(
            plan,
            slice(0, plan.chunk_size) if self.pad_inputs else real,
            real,
            all_positions,
            block_table=torch.from_numpy(plan.block_table).unsqueeze(0),
            current_tkv_mask=torch.tensor([plan.context_end if self.pad_inputs else plan.end], dtype=torch.int64),
            left_padded_prompt_mask=torch.zeros(1, dtype=torch.int64),
        )
        return out if all_positions or plan.is_last else out[:0]

    def _prefill(self, plan: PrefillPlan, all_positions: bool = False) -> torch.Tensor:
        real = slice(plan.left_padding, plan.left_padding + plan.prompt_len)
        if not self.pad_inputs:  # causal attention over the prompt itself
            return self._run_prompt(plan, real, real, all_positions, mask=None)
        n = plan.input_len
        is_real = torch.zeros(n, dtype=torch.bool)
        is_real[real] = True
        # causal, and pads see only pads (so no row is all -inf)
        allowed = torch.ones(n, n, dtype=torch.bool).tril_() & (is_real[:, None] == is_real[None, :])
        mask = torch.zeros(1, n, n, dtype=self.dtype).masked_fill_(~allowed, float("-inf"))
        return self._run_prompt(plan, slice(0, n), real, all_positions, mask=mask)

    def _run_prompt(
        self, plan: PrefillPlan | ChunkPlan, rows: slice, real: slice, all_positions: bool, **attn_kwargs: Any
    ) -> torch.Tensor:
        """Runs input positions ``rows`` of a prefill or chunk; returns the
        logits of its prompt positions ``real`` (``all_positions``) or of its
        last prompt token only (FMS computes logits of the last inputs only)."""
        first = real.start if all_positions else real.stop - 1
        logits, self.kv_cache = self._forward(
            torch.from_numpy(plan.input_ids[rows]).unsqueeze(0),
            position_ids=torch.from_numpy(plan.positions[rows]).unsqueeze(0),
            past_key_value_states=self.kv_cache,
            use_cache=True,
            last_n_tokens=rows.stop - first,
            attn_name=self.attn_name,
            slot_mapping=torch.from_numpy(plan.slot_mapping[rows]).unsqueeze(0),
            **attn_kwargs,
        )
        return logits[0, : real.stop - first]

    def _decode(self, plan: DecodePlan) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.decode(
                torch.from_numpy(plan.input_ids),
                torch.from_numpy(plan.positions),
                plan.slot_mapping,
                plan.block_table,
                plan.left_padding,
                plan.current_tkv,
                self.kv_cache,
            )
        ids = torch.from_numpy(plan.input_ids).unsqueeze(1)
        pos = torch.from_numpy(plan.positions).unsqueeze(1)
        slots = torch.from_numpy(plan.slot_mapping).unsqueeze(1)
        logits, self.kv_cache = self._forward(
            ids,
            position_ids=pos,
            past_key_value_states=self.kv_cache,
            use_cache=True,
            attn_name=self.attn_name,
            slot_mapping=slots,
            block_table=torch.from_numpy(plan.block_table),
            current_tkv_mask=torch.from_numpy(plan.current_tkv),
            left_padded_prompt_mask=torch.from_numpy(plan.left_padding),
        )
        return logits[:, -1, :]


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _allocate_kv_cache(
    shape: tuple[int, ...], n_layers: int, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The paged KV cache, or a ConfigError naming its size when it cannot fit."""
    n_bytes = 2 * n_layers * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    available = _available_memory()
    what = (
        f"a KV cache of {n_bytes / 2**30:.2f} GiB ({shape[0]} blocks x {shape[1]} slots x {shape[2]} KV heads x "
        f"{shape[3]} dims x {n_layers} layers x 2, {dtype})"
    )
    if available is not None and n_bytes > available:
        raise ConfigError(
            f"{what} does not fit in the {available / 2**30:.2f} GiB of memory available: "
            "lower available_blocks, max_num_seqs or max_model_len"
        )
    try:
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(n_layers)]
    except (RuntimeError, MemoryError) as e:
        raise ConfigError(f"could not allocate {what}: {e}") from None
