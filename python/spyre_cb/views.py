"""How a torch tensor reaches this project's native kernels: a NumPy view of
its storage, no copy. NumPy has no bfloat16, so a bfloat16 tensor is viewed
as its ``uint16`` bits, which the kernels read as bfloat16."""

from __future__ import annotations

import numpy as np
import torch


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor (bfloat16 as its ``uint16`` bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


__all__ = ["numpy_view"]
