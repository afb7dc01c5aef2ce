"""How the model's linear layers run: this project's bfloat16 kernel, or
oneDNN with the weights prepacked once at load, or ``F.linear``.

A decode step multiplies a handful of rows (the batch) by every weight
matrix, so its matmuls are bound by reading the weights. ``F.linear`` on CPU
goes to MKL's GEMM with the weights as stored; oneDNN's inner-product
primitive with the weights reordered once into its blocked layout reads them
about twice as fast at decode shapes (float32, batch 8, 768x3072, one
thread: 786 µs -> 408 µs; bfloat16: 330 µs -> 202 µs) and is also faster at
prefill shapes. The same primitive is what torch's inductor emits with
freezing, and what vLLM's CPU engine uses.

In bfloat16 on a CPU with AVX512_BF16, ``linear_ops="native"`` runs this
project's kernel (``spyre_cb._core.linear_bf16``): it reads the weights as
stored, once per call, prefetching the next rows while it multiplies the
current ones with every input row, and leaves a prefill's many rows to
``F.linear``. Measured against oneDNN (BENCHMARKS.md §10): as fast at one or
two rows (the output head: 1.3-1.5x), 0.7-0.9x at 4-32 rows, and no packed
copy to build at load (granite-2b loads in half the time). So ``auto`` keeps
oneDNN; ``native`` is for batch-1 latency and quick loads.

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
from spyre_cb.errors import ConfigError


def native_available(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether this project's linear kernel runs ``dtype`` fast here, and if not why."""
    if dtype != torch.bfloat16:
        return False, f"the native linear kernel is bfloat16 only, not {str(dtype).removeprefix('torch.')}"
    if not _core.linear_bf16_is_fast():
        return False, "this CPU lacks AVX512_BF16 (the native linear kernel's instructions)"
    return True, ""


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
    """``y = x W^T + b`` in bfloat16 by this project's kernel, ``W`` packed once at load
    (``spyre_cb._core.pack_linear_bf16``; the module's original weight is not kept)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16).contiguous()
        # allocated by NumPy, which asks Linux for transparent huge pages on large
        # arrays: fewer TLB misses while the weights stream
        n_packed = _core.packed_linear_len(self.out_features, self.in_features)
        self.packed = torch.from_numpy(np.empty(n_packed, dtype=np.int16))
        _core.pack_linear_bf16(_bits(weight), _bits(self.packed))
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).contiguous()
        self._packed_bits = _bits(self.packed)
        self._bias_bits = None if self.bias is None else _bits(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch.empty((rows.shape[0], self.out_features), dtype=torch.bfloat16)
        _core.linear_bf16(_bits(rows), self._packed_bits, self._bias_bits, _bits(out), torch.get_num_threads())
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, native"


def _bits(t: torch.Tensor) -> np.ndarray:
    """The ``uint16`` bits of a contiguous 16-bit tensor, without a copy."""
    return t.view(torch.int16).numpy().view(np.uint16)


def resolve(linear_ops: str, backend: str, dtype: torch.dtype) -> str:
    """``native``, ``onednn`` or ``torch`` for an engine's ``linear_ops`` (``auto``: oneDNN
    with the eager backend where it runs the dtype, else torch; ``native`` only when asked
    for: BENCHMARKS.md §10 has where it wins); ConfigError when the one asked for cannot
    run here."""
    ok, why = onednn_available(dtype)
    if linear_ops == "auto":
        return "onednn" if backend == "eager" and ok else "torch"
    if linear_ops == "native":
        native_ok, native_why = native_available(dtype)
        if not native_ok:
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
