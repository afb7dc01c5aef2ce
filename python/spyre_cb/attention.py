"""Paged attention for CPU: vectorized store and decode ops for FMS models.

FMS's reference ``spyre_paged_attn`` ops (in ``fms.utils.spyre.paged``) clone
the whole KV cache on every store and gather keys token by token in Python,
so a decode step grows with the size of the pool. The ops registered here
(attention name :data:`VECTORIZED`) store in place through the slot mapping
and gather a decode batch's keys through its block table in one indexing
operation, then run one masked SDPA. Same inputs, same semantics:

- prefill (``block_table is None``): keys/values are written to their slots,
  attention runs over the prompt itself with the additive ``mask``;
- decode, and a chunk of a chunked prefill (several queries per sequence):
  keys ``left_padded_prompt_mask[i] <= j <= q`` of each sequence's block
  table (in-table coordinates) are attended to, ``q`` the query's own
  position (the last query sits at ``current_tkv_mask[i] - 1``).

The native ops (attention name :data:`NATIVE`, the default) run float32 and
bfloat16 single-query decodes through this project's Rust kernel
(``spyre_cb._core.paged_decode_attention``), which reads each sequence's
real keys in place through its block table: no gather copy, no mask, no
work on padding; a bfloat16 cache is read as its bits and widened to float32
element by element (a shift), the arithmetic is float32. Everything else
(prefills, chunks, float16) takes the vectorized path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spyre_cb import _core
from spyre_cb.views import numpy_view

#: FMS's own ops (reference implementation, slow on CPU).
FMS_REFERENCE = "spyre_paged_attn"
#: This module's vectorized ops.
VECTORIZED = "spyre_cb_paged_attn"
#: The vectorized ops with decodes through the native kernel.
NATIVE = "spyre_cb_native_paged_attn"

ATTENTION_OPS = {"native": NATIVE, "vectorized": VECTORIZED, "fms": FMS_REFERENCE}
#: KV cache dtypes the native kernel reads (others take the vectorized path).
NATIVE_CACHE_DTYPES = (torch.float32, torch.bfloat16)

_registered = False


def _store(keys, values, key_cache, value_cache, **attn_kwargs):
    slots = attn_kwargs["slot_mapping"].reshape(-1)
    kvh, hd = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, kvh, hd).index_copy_(0, slots, keys.reshape(-1, kvh, hd).to(key_cache.dtype))
    vd = value_cache.shape[3]
    value_cache.view(-1, kvh, vd).index_copy_(0, slots, values.reshape(-1, kvh, vd).to(value_cache.dtype))
    if attn_kwargs.get("block_table", None) is None:
        return keys, values, key_cache, value_cache
    return key_cache, value_cache, key_cache, value_cache


def _prefill(query, keys, values, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs):
    """Attention of a prefill over its own keys (``[batch, seq, kv_heads, dim]``,
    as the store returns them): causal, or with the additive ``mask`` when one
    is given. (FMS's generic SDPA op guesses the keys' layout from their shape,
    which goes wrong when a prompt is as long as there are KV heads.)"""
    mask = attn_kwargs.get("mask", None)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(1)
        mask = mask.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale_factor,
        enable_gqa=nheads != kvheads,
    )
    return out.transpose(1, 2).contiguous()


def _decode(query, key_cache, value_cache, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs):
    block_table = attn_kwargs["block_table"]  # [B, W]
    tkv = attn_kwargs["current_tkv_mask"]  # [B]
    left = attn_kwargs["left_padded_prompt_mask"]  # [B]
    b, w = block_table.shape
    block = key_cache.shape[1]
    flat = block_table.reshape(-1)
    # index_select is several times faster than advanced indexing on CPU
    keys = key_cache.index_select(0, flat).view(b, w * block, kvheads, -1).transpose(1, 2)
    values = value_cache.index_select(0, flat).view(b, w * block, kvheads, -1).transpose(1, 2)
    j = torch.arange(w * block, device=query.device)
    q_len = query.shape[1]
    # query t of q_len sits at in-table position tkv - q_len + t (decode:
    # q_len = 1; a prefill chunk: its left padding lies before position 0 and
    # attends to the first key only, so that no row is fully masked)
    qpos = tkv[:, None] - q_len + torch.arange(q_len, device=query.device)[None, :]
    qpos = torch.maximum(qpos, left[:, None])
    valid = (j[None, None, :] >= left[:, None, None]) & (j[None, None, :] <= qpos[:, :, None])
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        keys,
        values,
        attn_mask=valid[:, None, :, :],
        scale=scale_factor,
        enable_gqa=nheads != kvheads,
    )
    return out.transpose(1, 2).contiguous()


def _paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_start: torch.Tensor,
    context_end: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention read in place from the paged cache: ``query`` is
    ``[batch, heads, head_dim]``, the result ``[batch, heads, value_dim]``;
    sequence ``i`` attends to in-table positions ``context_start[i] <= j <
    context_end[i]``."""
    b, h, _ = query.shape
    out = torch.empty(b, h, value_cache.shape[-1], dtype=torch.float32)
    q = query.float().contiguous().numpy()
    rest = (
        block_table.contiguous().numpy(),
        context_start.contiguous().numpy(),
        context_end.contiguous().numpy(),
        scale,
        out.numpy(),
        torch.get_num_threads(),
    )
    # a bfloat16 cache is read as its bits
    kernel = _core.paged_decode_attention_bf16 if key_cache.dtype == torch.bfloat16 else _core.paged_decode_attention
    kernel(q, numpy_view(key_cache), numpy_view(value_cache), *rest)
    return out if query.dtype == torch.float32 else out.to(query.dtype)


#: The kernel as a torch custom op, so that compiled models call it as is
#: (eager calls skip the op's dispatch, ~30 us per call).
paged_decode = torch.library.custom_op("spyre_cb::paged_decode", mutates_args=())(_paged_decode)


@paged_decode.register_fake
def _(query, key_cache, value_cache, block_table, context_start, context_end, scale):
    b, h, _ = query.shape
    return query.new_empty(b, h, value_cache.shape[-1])


def _native_decode(query, key_cache, value_cache, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs):
    b, q_len = query.shape[0], query.shape[1]
    if q_len != 1 or key_cache.dtype not in NATIVE_CACHE_DTYPES or query.dtype != key_cache.dtype:
        return _decode(query, key_cache, value_cache, nheads, kvheads, p_dropout, scale_factor, **attn_kwargs)
    scale = scale_factor if scale_factor is not None else query.shape[-1] ** -0.5
    op = paged_decode if torch.compiler.is_compiling() else _paged_decode
    out = op(
        query.reshape(b, nheads, -1),
        key_cache,
        value_cache,
        attn_kwargs["block_table"],
        attn_kwargs["left_padded_prompt_mask"],
        attn_kwargs["current_tkv_mask"],
        float(scale),
    )
    return out.view(b, 1, nheads, -1)


def register() -> None:
    """Registers the op sets with FMS (idempotent)."""
    global _registered
    if _registered:
        return
    import fms.utils.spyre.paged  # noqa: F401  (registers FMS_REFERENCE)
    from fms.modules.attention import register_attention_op

    for name, decode in ((VECTORIZED, _decode), (NATIVE, _native_decode)):
        try:
            register_attention_op(
                name,
                _store,
                _prefill,
                is_prefill_op=lambda **kw: kw.get("block_table", None) is None,
                compute_decode_op=decode,
            )
        except KeyError:  # registered by an earlier import of this module
            pass
    _registered = True
