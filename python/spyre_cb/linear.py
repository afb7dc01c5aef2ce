"""How the model's linear layers run: this project's kernel on weights packed
once at load, oneDNN's on weights prepacked once at load, or ``F.linear``.

A decode step multiplies a handful of rows (the batch) by every weight
matrix, so its matmuls are bound by reading the weights. ``F.linear`` on CPU
goes to a GEMM with the weights as stored, re-packing them on every call.

``native`` (``auto``'s choice where the CPU has the instructions: AVX512_BF16
for bfloat16, AVX-512F for float32) is this project's kernel
(``spyre_cb._core.linear_bf16`` / ``linear_f32``, Rust): the weight packed
once into blocks of 32 output features whose elements lie in the order the
kernel reads them, each block streamed once per step while every row is
multiplied by it, the next block prefetched meanwhile; sums already the
outputs, no horizontal reductions. At granite-2b's shapes in bfloat16 a
decode of 8 reads the weights at 1.5-1.8x oneDNN's rate (about 70 % of the
machine's triad bandwidth, BENCHMARKS.md §10); prefills run at about oneDNN's
rate. ``onednn`` (``auto``'s choice elsewhere) reorders every weight once
into oneDNN's blocked layout and calls its inner product, the primitive
torch's inductor emits with freezing and vLLM's CPU engine uses.

Only exact ``torch.nn.Linear`` modules are replaced (an FMS tensor-parallel
shard is one: its collectives live in the enclosing block); the numbers are
the same up to float reassociation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from spyre_cb import _core
from spyre_cb.config import LINEAR_OPS
from spyre_cb.cpus import kernel_threads
from spyre_cb.errors import ConfigError
from spyre_cb.views import numpy_view

#: the native kernel's element types: torch dtype -> (its name, the NumPy dtype of its packed buffer)
_NATIVE: dict[torch.dtype, tuple[str, type[np.generic]]] = {
    torch.bfloat16: ("bfloat16", np.int16),
    torch.float32: ("float32", np.float32),
}


def native_available(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether this project's linear kernel runs ``dtype`` fast here, and if not why."""
    if dtype == torch.bfloat16:
        return (True, "") if _core.linear_bf16_is_fast() else (False, "this CPU lacks AVX512_BF16")
    if dtype == torch.float32:
        return (True, "") if _core.linear_f32_is_fast() else (False, "this CPU lacks AVX-512F")
    return False, f"the native linear kernel runs bfloat16 and float32, not {str(dtype).removeprefix('torch.')}"


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


class NativeLinear(torch.nn.Module):
    """``y = x W^T + b`` (bfloat16 or float32) by this project's kernel, ``W`` packed
    once at load (``spyre_cb._core.pack_linear_bf16`` / ``pack_linear_f32``; the
    module's original weight is not kept)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = linear.weight.dtype
        name, np_dtype = _NATIVE[self.dtype]
        bf16 = self.dtype == torch.bfloat16
        self._kernel = _core.linear_bf16 if bf16 else _core.linear_f32
        weight = linear.weight.detach().contiguous()
        # allocated by NumPy, which asks Linux for transparent huge pages on large
        # arrays: fewer TLB misses while the weights stream
        n_packed = _core.packed_linear_len(self.out_features, self.in_features, name)
        self.packed = torch.from_numpy(np.empty(n_packed, dtype=np_dtype))
        self._packed_np = numpy_view(self.packed.view(self.dtype))  # bfloat16 as its bits
        (_core.pack_linear_bf16 if bf16 else _core.pack_linear_f32)(numpy_view(weight), self._packed_np)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self._bias_np = None if self.bias is None else numpy_view(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        # split over torch's own OpenMP workers where the kernels share them; else on
        # the caller's thread alone: a thread started per call competes with those
        # workers, which spin between ops (granite-2b, 2 CPUs, batch 8: 0.385 s a step
        # split over 2 started threads, 0.275 s on one, oneDNN 0.306 s)
        out = self.rows(rows, kernel_threads())
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def rows(self, rows: torch.Tensor, threads: int) -> torch.Tensor:
        """``rows W^T + b`` for contiguous ``[n, in_features]`` rows of the module's
        dtype, split over ``threads`` (the decoder's direct call, no checks)."""
        out = torch.empty((rows.shape[0], self.out_features), dtype=self.dtype)
        self._kernel(numpy_view(rows), self._packed_np, self._bias_np, numpy_view(out), threads)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, native"


def resolve(linear_ops: str, backend: str, dtype: torch.dtype) -> str:
    """``native``, ``onednn`` or ``torch`` for an engine's ``linear_ops`` (``auto``: with
    the eager backend, the native kernel where this CPU runs it fast for the dtype, else
    oneDNN where it runs the dtype, else torch); ConfigError when the one asked for
    cannot run here."""
    native_ok, native_why = native_available(dtype)
    ok, why = onednn_available(dtype)
    if linear_ops == "auto":
        if backend != "eager":
            return "torch"
        return "native" if native_ok else "onednn" if ok else "torch"
    if linear_ops == "native" and not native_ok:
        raise ConfigError(f"linear_ops 'native' cannot run here: {native_why} (use 'auto', 'onednn' or 'torch')")
    if linear_ops == "onednn" and not ok:
        raise ConfigError(f"linear_ops 'onednn' cannot run here: {why} (use 'auto' or 'torch')")
    return linear_ops


def replace_linears(model: Any, ops: str, batch_hint: int) -> int:
    """Replaces every ``torch.nn.Linear`` of ``model`` by a :class:`NativeLinear`
    (``ops`` ``native``) or a :class:`PackedLinear` (``onednn``); returns how many
    (none for ``torch``). ``batch_hint``: the rows a decode multiplies (oneDNN picks
    its blocking for it; other sizes run too)."""
    if ops == "torch":
        return 0
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
        setattr(parent, name, NativeLinear(child) if ops == "native" else PackedLinear(child, batch_hint))
    return len(targets)


__all__ = [
    "LINEAR_OPS",
    "NativeLinear",
    "PackedLinear",
    "native_available",
    "onednn_available",
    "replace_linears",
    "resolve",
]
