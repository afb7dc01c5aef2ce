"""Linear layers with their weights prepacked for oneDNN, once, at load.

A decode step multiplies a handful of rows (the batch) by every weight
matrix, so its matmuls are bound by reading the weights. ``F.linear`` on CPU
goes to MKL's GEMM with the weights as stored; oneDNN's inner-product
primitive with the weights reordered once into its blocked layout reads them
about twice as fast at decode shapes (float32, batch 8, 768x3072, one
thread: 786 µs -> 408 µs; bfloat16: 330 µs -> 202 µs) and is also faster at
prefill shapes. The same primitive is what torch's inductor emits with
freezing, and what vLLM's CPU engine uses.

Only exact ``torch.nn.Linear`` modules are replaced (an FMS tensor-parallel
shard is one: its collectives live in the enclosing block); the numbers are
the same up to float reassociation.
"""

from __future__ import annotations

from typing import Any

import torch

from spyre_cb.config import LINEAR_OPS
from spyre_cb.errors import ConfigError


def onednn_available(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether oneDNN's packed linear can run ``dtype`` here, and if not why."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (MKL-DNN)"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")):
        return False, "this torch build lacks oneDNN's packed linear ops"
    if dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
        return False, "this CPU has no bfloat16 support in oneDNN"
    if dtype == torch.float16 and not ops._is_mkldnn_fp16_supported():
        return False, "this CPU has no float16 support in oneDNN"
    return True, ""


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` in oneDNN's layout (not a parameter: the model is
    only run, never trained or saved)."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, onednn"


def resolve(linear_ops: str, backend: str, dtype: torch.dtype) -> str:
    """``onednn`` or ``torch`` for an engine's ``linear_ops`` (``auto``: oneDNN with the
    eager backend where it runs the dtype); ConfigError when ``onednn`` cannot run."""
    ok, why = onednn_available(dtype)
    if linear_ops == "auto":
        return "onednn" if backend == "eager" and ok else "torch"
    if linear_ops == "onednn" and not ok:
        raise ConfigError(f"linear_ops 'onednn' cannot run here: {why} (use 'auto' or 'torch')")
    return linear_ops


def pack_linears(model: Any, batch_hint: int) -> int:
    """Replaces every ``torch.nn.Linear`` of ``model`` by a :class:`PackedLinear`;
    returns how many. ``batch_hint``: the rows a decode multiplies (oneDNN picks its
    blocking for it; other sizes run too)."""
    # a weight tied to another module's (an LM head sharing the embedding) stays as it
    # is: a packed copy would hold the matrix twice
    tied = {
        p.data_ptr() for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)
    }
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and child.weight.data_ptr() not in tied
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(targets)


__all__ = ["LINEAR_OPS", "PackedLinear", "pack_linears", "onednn_available", "resolve"]
