"""The runner's own decode step: FMS's decoder layers run as a loop of native
kernel calls, without FMS's modules.

At real sizes a decode step is bound by reading the weights, which the native
linear kernel does at about 80 % of the machine's triad bandwidth; what else a
step cost was FMS's Python and small tensor ops: per layer about twenty module
calls, keyword dictionaries, views, casts and temporaries around the kernels
(granite-2b, bfloat16, batch 8, one thread: ~30 ms of a 0.26 s step). This
module runs the arithmetic of FMS's ``GraniteBlock`` / ``LLaMABlock`` in about
eight calls a layer, with the same roundings in the same order, so logits and
KV cache are bit for bit those of FMS's forward as this runner runs it (with
the same native linear layers, norms, rotary and attention; a test checks
both):

- once a step: the embedding (FMS's module, and Granite's multiplier), each
  token's rotary angles, the kernels' thread counts;
- per layer: fused QKV product (``NativeLinear``); rotary on the query and
  key heads, the new key and value stored at the token's slot and the paged
  decode attention, in one call (``_core.paged_decode_qkv_bf16`` / ``_f32``);
  output product; the residual connection fused with the next RMS norm
  (``_core.add_rms_norm_bf16`` / ``_f32``); fused gate/up product; SiLU times
  up (torch's ops: their rounding is what FMS gets); down product; residual
  and the next layer's norm (or the final norm) in one call;
- then FMS's head and (Granite) logits scaling.

It runs single-token decode steps only, and only a model it was built for:
an eager, unsharded Granite or LLaMA whose linear layers, norms and rotary
are this project's native ones and whose attention is the native op
(:func:`build` returns None otherwise). Prefills, chunks and every other
model keep FMS's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spyre_cb import _core
from spyre_cb.cpus import kernel_threads
from spyre_cb.linear import NativeLinear
from spyre_cb.norm import NativeRMSNorm
from spyre_cb.rotary import rotation_tables
from spyre_cb.views import numpy_view


@dataclass(frozen=True)
class _Layer:
    ln: NativeRMSNorm
    qkv: NativeLinear
    dense: NativeLinear
    ff_ln: NativeRMSNorm
    gate_up: NativeLinear
    down: NativeLinear


class NativeDecoder:
    """A decode step of an FMS Granite or LLaMA model by direct kernel calls
    (see the module's text); made by :func:`build`."""

    def __init__(self, model: Any, layers: list[_Layer], encoder: Any, granite: bool) -> None:
        base = model.base_model
        attn = base.layers[0].attn
        self.model = model
        self.layers = layers
        self.encoder = encoder
        self.final_norm: NativeRMSNorm = model.base_model.dec_norm
        self.dtype = layers[0].qkv.dtype
        self.heads = int(attn.nheads)
        self.kv_heads = int(attn.kvheads)
        self.head_dim = int(attn.emb_kq_per_head)
        self.value_dim = int(attn.emb_v_per_head)
        self.ffn = int(base.layers[0].ff_sub_layer.hidden_dim)
        self.vocab_size = int(model.config.src_vocab_size)
        scale = attn.scale_factor
        self.scale = float(scale) if scale is not None else self.head_dim**-0.5
        cfg = model.config
        self.embedding_multiplier = float(cfg.embedding_multiplier) if granite else None
        self.residual_multiplier = float(cfg.residual_multiplier) if granite else None
        self.logits_scaling = float(cfg.logits_scaling) if granite else None
        bf16 = self.dtype == torch.bfloat16
        self._attention = _core.paged_decode_qkv_bf16 if bf16 else _core.paged_decode_qkv_f32

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: np.ndarray,
        block_table: np.ndarray,
        context_start: np.ndarray,
        context_end: np.ndarray,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Next-token logits ``[batch, vocab]`` of one decode step: ``input_ids``,
        ``positions`` and ``slots`` ``[batch]`` (int64), the block table and each
        sequence's in-table context ``context_start <= j < context_end`` (the
        plan's left padding and tkv); the new keys and values land in
        ``kv_cache``."""
        model = self.model
        base = model.base_model
        b = input_ids.shape[0]
        if b == 0:  # (the core never plans an empty decode)
            return torch.empty(0, self.vocab_size, dtype=self.dtype)
        h = base.embedding(input_ids)  # [b, emb], a new tensor
        if self.embedding_multiplier is not None:
            h = h * self.embedding_multiplier
        cos, neg_sin, sin = (t.numpy() for t in rotation_tables(self.encoder, positions, int(positions.max()) + 1))
        threads = kernel_threads()
        attn_threads = torch.get_num_threads()
        width = self.heads * self.value_dim
        rm = self.residual_multiplier
        layers = self.layers
        # h: the residual stream, updated in place by each residual connection,
        # which is fused with the norm after it
        n = layers[0].ln.rows(h)
        for i, (layer, (key_cache, value_cache)) in enumerate(zip(layers, kv_cache)):
            qkv = layer.qkv.rows(n, threads)  # [b, (heads + 2 kvh) d]
            attn = torch.empty(b, width, dtype=self.dtype)
            # rotary, the new key and value into the cache, the attention: one call
            self._attention(
                numpy_view(qkv),
                cos,
                neg_sin,
                sin,
                slots,
                numpy_view(key_cache),
                numpy_view(value_cache),
                block_table,
                context_start,
                context_end,
                self.scale,
                self.heads,
                numpy_view(attn),
                attn_threads,
            )
            x = layer.dense.rows(attn, threads)
            n = layer.ff_ln.add_rows(x, rm, h)
            gate, up = layer.gate_up.rows(n, threads).split(self.ffn, dim=1)
            x = layer.down.rows((torch.nn.functional.silu(gate) * up).contiguous(), threads)
            n = (layers[i + 1].ln if i + 1 < len(layers) else self.final_norm).add_rows(x, rm, h)
        logits: torch.Tensor = model.head(n)
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        return logits


def build(
    model: Any, *, backend: str, linear_ops: str, attention_ops: str, tensor_parallel: bool
) -> NativeDecoder | None:
    """The native decoder for ``model``, or None where it would not give FMS's
    results or cannot run (the model keeps FMS's forward)."""
    return (
        _build(model)
        if (backend, linear_ops, attention_ops, tensor_parallel) == ("eager", "native", "native", False)
        else None
    )


def _build(model: Any) -> NativeDecoder | None:
    from fms.models.granite import Granite, GraniteBlock
    from fms.models.llama import LLaMA, LLaMABlock
    from fms.modules.attention import FusedQKV, MultiHeadAttention
    from fms.modules.feedforward import GatedLinearUnit

    block_type: type
    if type(model) is Granite:
        granite, block_type = True, GraniteBlock
    elif type(model) is LLaMA:
        granite, block_type = False, LLaMABlock
    else:
        return None
    base = model.base_model
    if model.config.p_dropout or not isinstance(base.dec_norm, NativeRMSNorm) or not len(base.layers):
        return None
    dtype = base.dec_norm.dtype
    if dtype not in (torch.bfloat16, torch.float32) or base.embedding.weight.dtype != dtype:
        return None
    encoder = base.layers[0].attn.position_encoder
    if getattr(encoder, "_spyre_cb_tables", None) is None:  # not this project's rotary
        return None
    layers = []
    for block in base.layers:
        attn, ff = block.attn, block.ff_sub_layer
        ok = (
            type(block) is block_type
            and type(attn) is MultiHeadAttention
            and not attn.has_sinks
            and attn.position_encoder is encoder
            and type(attn.in_proj) is FusedQKV
            and type(ff) is GatedLinearUnit
            and ff.fused
            and not ff.p_dropout
            and type(ff.a) is torch.nn.SiLU
            and isinstance(block.ln, NativeRMSNorm)
            and isinstance(block.ff_ln, NativeRMSNorm)
        )
        if not ok:
            return None
        linears = (attn.in_proj.qkv_fused, attn.dense, ff.wg1_fused, ff.w2)
        if not all(isinstance(m, NativeLinear) for m in linears):
            return None
        layer = _Layer(block.ln, linears[0], linears[1], block.ff_ln, linears[2], linears[3])
        if {m.dtype for m in (layer.ln, layer.ff_ln, *linears)} != {dtype}:
            return None
        layers.append(layer)
    return NativeDecoder(model, layers, encoder, granite)


__all__ = ["NativeDecoder", "build"]
