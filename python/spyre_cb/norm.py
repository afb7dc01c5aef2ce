"""FMS's RMS normalization as one native pass over each row.

FMS's ``LayerNormParameterized`` without re-centering (Granite's and Llama's
norms) runs eight tensor ops for ``w * (x / sqrt(mean(x^2) + eps))``, each
with its temporary: at a decode's few rows that is op overhead, a norm before
every attention and feed-forward block and one at the end.
``spyre_cb._core.rms_norm_bf16`` / ``rms_norm_f32`` (Rust) compute the same
steps in one pass: in float32, rounded to the model's dtype after the
normalization, after the weight and after the bias, as torch rounds them.
The sum of squares is added in another order than torch's, so an output can
differ from FMS's by the rounding of that sum.

Replaced with the eager backend only (compiled backends fuse the norm
themselves), and only where the numbers are FMS's: no re-centering, float32,
or bfloat16 with FMS's float32 statistics (``use_high_precision_pow``).
"""

from __future__ import annotations

from typing import Any

import torch

from spyre_cb import _core
from spyre_cb.views import numpy_view


class NativeRMSNorm(torch.nn.Module):
    """FMS's ``LayerNormParameterized(use_mean=False)`` by this project's kernel."""

    _fms: Any

    def __init__(self, norm: Any) -> None:
        super().__init__()
        self.normalized_shape = norm.normalized_shape
        self.eps = float(norm.eps)
        self.weight = norm.weight.detach().contiguous() if norm.elementwise_scale else None
        self.bias = norm.bias.detach().contiguous() if norm.elementwise_shift else None
        params = [p for p in (self.weight, self.bias) if p is not None]
        self.dtype = params[0].dtype if params else None
        bf16 = self.dtype == torch.bfloat16
        self._kernel = _core.rms_norm_bf16 if bf16 else _core.rms_norm_f32
        self._add_kernel = _core.add_rms_norm_bf16 if bf16 else _core.add_rms_norm_f32
        self._weight_np = None if self.weight is None else numpy_view(self.weight)
        self._bias_np = None if self.bias is None else numpy_view(self.bias)
        # FMS's module itself, for inputs of another dtype (not a submodule: its
        # parameters are this module's)
        object.__setattr__(self, "_fms", norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:  # not what the kernel was set up for: FMS's arithmetic
            out: torch.Tensor = self._fms(x)
            return out
        return self.rows(x.reshape(-1, x.shape[-1]).contiguous()).view(x.shape)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The norm of contiguous ``[n, features]`` rows of the module's dtype (the
        decoder's direct call, no checks)."""
        y = torch.empty_like(rows)
        self._kernel(numpy_view(rows), self._weight_np, self._bias_np, self.eps, numpy_view(y))
        return y

    def add_rows(self, delta: torch.Tensor, multiplier: float | None, h: torch.Tensor) -> torch.Tensor:
        """A residual connection then this norm, as FMS's blocks run them: ``h =
        delta * multiplier + h`` in place (``delta + h`` without a multiplier),
        each op rounded as torch rounds it; returns the norm of the new ``h``
        (contiguous ``[n, features]`` rows of the module's dtype, no checks)."""
        y = torch.empty_like(h)
        self._add_kernel(
            numpy_view(delta), multiplier, numpy_view(h), self._weight_np, self._bias_np, self.eps, numpy_view(y)
        )
        return y

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, native"


def replace_norms(model: Any) -> int:
    """Replaces every FMS RMS norm of ``model`` whose numbers the kernel gives (see the
    module's text) by a :class:`NativeRMSNorm`; returns how many."""
    try:
        from fms.modules.layernorm import LayerNormParameterized
    except ImportError:
        return 0
    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is not LayerNormParameterized or child.use_mean:
                continue
            params = list(child.parameters(recurse=False))
            if not params or any(p.dtype != params[0].dtype for p in params):
                continue
            dtype = params[0].dtype
            if dtype == torch.float32 or (dtype == torch.bfloat16 and child.use_high_precision_pow):
                targets.append((parent, name, child))
    for parent, name, child in targets:
        setattr(parent, name, NativeRMSNorm(child))
    return len(targets)


__all__ = ["NativeRMSNorm", "replace_norms"]
