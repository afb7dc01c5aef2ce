"""FMS's RMS norm as one native pass (``spyre_cb.norm``): FMS's numbers up to the
order of one sum, replaced only where that holds, and in every eager engine."""

from __future__ import annotations

import pytest
import torch
from fms.modules.layernorm import LayerNormParameterized

import spyre_cb
from spyre_cb import _core
from spyre_cb.norm import NativeRMSNorm, replace_norms
from spyre_cb.views import numpy_view


def _fms_norm(dim: int, dtype: torch.dtype, **kw) -> LayerNormParameterized:
    torch.manual_seed(dim)
    norm = LayerNormParameterized(dim, eps=1e-5, use_high_precision_pow=True, **kw)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim) + 0.5)
        if norm.elementwise_shift:
            norm.bias.copy_(torch.randn(dim) / 10)
    return norm.to(dtype)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 37])
def test_native_norm_gives_fms_numbers(rows, shift):
    dim = 200  # not a multiple of the kernel's 16 lanes
    x = torch.randn(rows, 1, dim) * 3
    fms = _fms_norm(dim, torch.float32, elementwise_shift=shift)
    torch.testing.assert_close(NativeRMSNorm(fms)(x), fms(x), rtol=1e-6, atol=1e-6)
    fms16 = _fms_norm(dim, torch.bfloat16, elementwise_shift=shift)
    x16 = x.bfloat16()
    got, want = NativeRMSNorm(fms16)(x16), fms16(x16)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # the same roundings; only the float32 sum of squares is added in another order
    assert (got == want).float().mean() > 0.97
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)


def test_only_norms_the_kernel_reproduces_are_replaced():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rms = _fms_norm(64, torch.float32)
            self.centered = _fms_norm(64, torch.float32, use_mean=True)
            self.rms16 = _fms_norm(64, torch.bfloat16)
            self.low16 = LayerNormParameterized(64, use_high_precision_pow=False).to(torch.bfloat16)

    block = Block()
    assert replace_norms(block) == 2
    assert isinstance(block.rms, NativeRMSNorm) and isinstance(block.rms16, NativeRMSNorm)
    assert type(block.centered) is LayerNormParameterized and type(block.low16) is LayerNormParameterized
    # an input of another dtype gets FMS's own arithmetic
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(block.rms(x), block.rms._fms(x))


def test_the_kernel_refuses_shapes_that_disagree():
    x = torch.randn(2, 8).numpy()
    with pytest.raises(ValueError, match="must have the same shape"):
        _core.rms_norm_f32(x, None, None, 1e-5, torch.empty(2, 9).numpy())
    with pytest.raises(ValueError, match="weight holds 7 elements, 8 expected"):
        _core.rms_norm_f32(x, torch.ones(7).numpy(), None, 1e-5, torch.empty(2, 8).numpy())
    with pytest.raises(ValueError, match="rms_norm: x must be C-contiguous"):
        _core.rms_norm_f32(torch.randn(2, 16).numpy()[:, ::2], None, None, 1e-5, torch.empty(2, 8).numpy())
    # in place: two views of one bfloat16 tensor, which NumPy cannot tell share memory
    h = torch.randn(2, 8).bfloat16()
    with pytest.raises(ValueError, match="rms_norm: x and out share memory"):
        _core.rms_norm_bf16(numpy_view(h), None, None, 1e-5, numpy_view(h))


def test_eager_engines_run_the_native_norm_with_hf_tokens(tiny_model, hf_greedy):
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    params = spyre_cb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256)
    model = llm.engine.runner.model
    assert any(isinstance(m, NativeRMSNorm) for m in model.modules())
    assert not any(type(m) is LayerNormParameterized for m in model.modules())
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(p, 12) for p in prompts]
