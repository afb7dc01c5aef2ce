"""FMS's rotary position embedding, computed with a quarter of the work.

FMS rotates each (even, odd) pair of a query/key head by a 2x2 matrix it
broadcasts over the batch and heads: a multiply over ``[B, L, H, D/2, 2, 2]``
and a sum over the last axis, a large share of a small model's decode step
on CPU. The same rotation is ``(c q0 - s q1, s q0 + c q1)`` over ``[B, L,
H, D/2]``; computed from FMS's own cached cos/sin, with the same two products
added in the same order, the results are bit-identical (one rounding per
product, one per sum, as in FMS's two-element sum). Outside compiled graphs
the rotation runs as one native pass (``spyre_cb._core.rope_bf16`` /
``rope_f32``, Rust, the same roundings) instead of about ten tensor ops.

Only FMS's plain ``RotaryEmbedding`` with full rotation and no YaRN scaling
is replaced; anything else keeps FMS's own method.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from spyre_cb import _core
from spyre_cb.views import numpy_view


def patch_rotary(model: Any) -> int:
    """Gives every plain rotary embedding of ``model`` the fast method; returns how many."""
    try:
        from fms.modules.positions import RotaryEmbedding
    except ImportError:
        return 0
    # (a position encoder is a plain object the attention modules hold, not a submodule)
    found = {id(v): v for m in model.modules() for v in vars(m).values() if type(v) is RotaryEmbedding}
    n = 0
    for enc in found.values():
        if getattr(enc, "partial_rope", 1.0) == 1.0 and enc.rope_type != "yarn":
            # per instance (the class stays FMS's): its tables, and the method reading them
            enc._spyre_cb_tables = {}  # type: ignore[attr-defined]
            enc.adjusted_qk = types.MethodType(_adjusted_qk, enc)  # type: ignore[method-assign]
            n += 1
    return n


def _tables(self: Any, device: torch.device, alpha: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, -sin, sin), each ``[max_len, D/2]``, from FMS's cached 2x2 matrices."""
    freqs = self.cached_freqs[device.index][alpha]  # [max_len, D/2, 2, 2]: [[c, -s], [s, c]]
    key = (device.index, alpha, freqs.size(0))
    got = self._spyre_cb_tables.get(key)
    if got is None:
        got = (freqs[..., 0, 0].contiguous(), freqs[..., 0, 1].contiguous(), freqs[..., 1, 0].contiguous())
        self._spyre_cb_tables = {key: got}  # one per cache size (FMS grows its cache)
    return got


def rotation_tables(
    encoder: Any, positions: torch.Tensor, length: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, -sin, sin) of every position in ``positions`` (shape ``[..., D/2]``,
    float32) from a patched encoder's tables, cached for sequences up to ``length``
    (which picks NTK scaling's factor, as in FMS)."""
    alpha = encoder.compute_freqs_cis(positions.device, length)
    cos, nsin, sin = _tables(encoder, positions.device, alpha)
    return cos[positions], nsin[positions], sin[positions]


#: this project's kernels by dtype (``spyre_cb._core.rope_bf16`` / ``rope_f32``)
_NATIVE: dict[torch.dtype, Callable[..., None]] = {torch.bfloat16: _core.rope_bf16, torch.float32: _core.rope_f32}


def _rotate(x: torch.Tensor, c: torch.Tensor, ns: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x`` (``[B, L, H, D]``) rotated by ``c``, ``ns``, ``s`` (``[B, L, 1, D/2]``):
    by the native kernel in one pass where it can run (not inside a compiled
    graph), else by torch's ops; the same bits either way."""
    kernel = _NATIVE.get(x.dtype)
    if kernel is not None and c.dtype == torch.float32 and not torch.compiler.is_compiling():
        b, length, h, d = x.shape
        rows = x.reshape(b * length, h, d).contiguous()
        out = torch.empty_like(rows)
        tables = [t.reshape(b * length, d // 2).contiguous().numpy() for t in (c, ns, s)]
        kernel(numpy_view(rows), *tables, numpy_view(out))
        return out.view(b, length, h, d)
    pairs = x.float().view(*x.size()[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((c * x0 + ns * x1, s * x0 + c * x1), dim=-1)
    return out.flatten(3).type_as(x)


def _adjusted_qk(
    self: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    past_kv_state: Any = None,
    use_cache: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert q.dim() == 4 and k.dim() == 4
    seq_len = max(k.size(1), q.size(1))
    if position_ids is None:
        position_ids = torch.arange(0, seq_len, dtype=torch.long, device=q.device).repeat(k.size(0), 1)
        if use_cache and past_kv_state is not None and past_kv_state[0] is not None and past_kv_state[0].numel() > 0:
            position_ids += past_kv_state[0].size(2)
    max_start_pos = torch.max(position_ids[:, 0])
    c, ns, s = rotation_tables(self, position_ids, max_start_pos + seq_len)  # [B, L, D/2]

    def at(t: torch.Tensor, length: int) -> torch.Tensor:
        return t.narrow(1, t.size(1) - length, length).unsqueeze(2)  # [B, length, 1, D/2]

    q_out = _rotate(q, at(c, q.size(1)), at(ns, q.size(1)), at(s, q.size(1)))
    k_out = _rotate(k, at(c, k.size(1)), at(ns, k.size(1)), at(s, k.size(1)))
    return q_out.view_as(q), k_out.view_as(k)


__all__ = ["patch_rotary", "rotation_tables"]
