"""How linear layers run (``EngineConfig.linear_ops``): this project's bfloat16
kernel and oneDNN's prepacked weights give ``F.linear``'s numbers up to float
reassociation, are chosen as ``auto`` says, and engines that use them give
HF's greedy tokens."""

from __future__ import annotations

import pytest
import torch

import spyre_cb
from spyre_cb import ConfigError, SamplingParams, _core
from spyre_cb.linear import (
    NativeLinear,
    PackedLinear,
    native_available,
    onednn_available,
    replace_linears,
    resolve,
)

needs_onednn = pytest.mark.skipif(not onednn_available(torch.float32)[0], reason="no oneDNN in this torch build")
needs_native = pytest.mark.skipif(
    not native_available(torch.bfloat16)[0], reason=native_available(torch.bfloat16)[1] or "native kernel runs"
)


def _bits(t):
    return t.view(torch.int16).numpy().view("uint16")


@pytest.mark.parametrize("rows", [1, 3, 8, 33, 300])
def test_native_f32_kernel_equals_f_linear(rows):
    """float32: the same sums as ``F.linear`` up to their order, on any CPU."""
    torch.manual_seed(rows)
    k, n = 200, 37
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    packed = torch.empty(_core.packed_linear_len(n, k, "float32"))
    _core.pack_linear_f32(w.numpy(), packed.numpy())
    for threads in (1, 2):
        out = torch.empty(rows, n)
        _core.linear_f32(x.numpy(), packed.numpy(), b.numpy(), out.numpy(), threads)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 8, 33, 300])
def test_native_kernel_equals_f32_sums_rounded_once(rows):
    """Against float64 sums of the same bfloat16 values, on any CPU (without
    AVX512_BF16 the kernel's portable loop runs): within one bfloat16 rounding."""
    torch.manual_seed(rows)
    k, n = 200, 37  # neither a multiple of the kernel's 32 lanes nor of its tiles
    x = torch.randn(rows, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    b = torch.randn(n).bfloat16()
    want = x.double() @ w.double().T + b.double()
    packed = torch.empty(_core.packed_linear_len(n, k, "bfloat16"), dtype=torch.int16)
    _core.pack_linear_bf16(_bits(w), _bits(packed))
    for threads in (1, 2):
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        _core.linear_bf16(_bits(x), _bits(packed), _bits(b), _bits(out), threads)
        torch.testing.assert_close(out.double(), want, rtol=2**-8, atol=1e-4 * k)
        # float32 sums rounded once are what F.linear gives too, up to order
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=2e-2, atol=2e-2)


def test_native_kernel_refuses_shapes_that_disagree():
    x = torch.zeros(2, 8).bfloat16()
    packed = torch.zeros(_core.packed_linear_len(3, 8, "bfloat16"), dtype=torch.int16)
    with pytest.raises(ValueError, match="shapes disagree"):
        _core.linear_bf16(_bits(x), _bits(packed), None, _bits(torch.zeros(3, 3).bfloat16()))
    with pytest.raises(ValueError, match="packed weight holds"):
        _core.linear_bf16(_bits(x), _bits(packed), None, _bits(torch.zeros(2, 40).bfloat16()))
    with pytest.raises(ValueError, match="bias holds 2"):
        _core.linear_bf16(
            _bits(x), _bits(packed), _bits(torch.zeros(2).bfloat16()), _bits(torch.zeros(2, 3).bfloat16())
        )
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.linear_bf16(_bits(x), _bits(packed), None, _bits(torch.zeros(3, 2).bfloat16()).T)
    with pytest.raises(ValueError, match="packed holds"):
        _core.pack_linear_bf16(_bits(torch.zeros(3, 8).bfloat16()), _bits(packed[1:]))
    with pytest.raises(ValueError, match="dtype must be"):
        _core.packed_linear_len(3, 8, "float16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_linear_module_shapes(dtype):
    torch.manual_seed(0)
    for bias in (True, False):
        lin = torch.nn.Linear(96, 160, bias=bias).to(dtype)
        native = NativeLinear(lin)
        for shape in [(4, 1, 96), (1, 37, 96), (7, 96)]:
            x = torch.randn(*shape, dtype=dtype)
            want = torch.nn.functional.linear(x, lin.weight, lin.bias)
            got = native(x)
            assert got.shape == want.shape and got.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_f_linear(dtype):
    if not onednn_available(dtype)[0]:
        pytest.skip(onednn_available(dtype)[1])
    torch.manual_seed(0)
    for bias in (True, False):
        lin = torch.nn.Linear(96, 160, bias=bias).to(dtype)
        packed = PackedLinear(lin, batch_hint=4)
        for shape in [(4, 1, 96), (1, 37, 96), (7, 96)]:
            x = torch.randn(*shape, dtype=dtype)
            want = torch.nn.functional.linear(x, lin.weight, lin.bias)
            got = packed(x)
            assert got.shape == want.shape and got.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_onednn
def test_replace_linears_skips_tied_weights():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10, bias=False))
    model[2].weight = model[0].weight  # an LM head tied to the embedding
    assert replace_linears(model, "onednn", batch_hint=2) == 1
    assert isinstance(model[1], PackedLinear) and type(model[2]) is torch.nn.Linear
    assert replace_linears(model, "torch", batch_hint=2) == 0


def test_auto_and_explicit_choices():
    for dtype in (torch.float32, torch.bfloat16):
        fallback = "onednn" if onednn_available(dtype)[0] else "torch"
        assert resolve("auto", "eager", dtype) == ("native" if native_available(dtype)[0] else fallback)
        assert resolve("auto", "inductor", dtype) == "torch"
        assert resolve("torch", "eager", dtype) == "torch"
    if not native_available(torch.bfloat16)[0]:
        with pytest.raises(ConfigError, match="lacks AVX512_BF16"):
            resolve("native", "eager", torch.bfloat16)
    with pytest.raises(ConfigError, match="bfloat16 and float32, not float16"):
        resolve("native", "eager", torch.float16)
    for ops in ("onednn", "native"):
        with pytest.raises(ConfigError, match="backend 'eager'"):
            spyre_cb.EngineConfig(linear_ops=ops, backend="inductor")


@needs_onednn
def test_engines_with_packed_linears_give_hf_greedy_tokens(tiny_model, hf_greedy):
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256, linear_ops="onednn")
    assert llm.engine.runner.linear_ops == "onednn"
    assert any(isinstance(m, PackedLinear) for m in llm.engine.runner.model.modules())
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(p, 12) for p in prompts]
    plain = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256, linear_ops="torch")
    assert not any(isinstance(m, PackedLinear) for m in plain.engine.runner.model.modules())
    assert [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)] == got
    if native_available(torch.float32)[0]:
        native = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256, linear_ops="native")
        assert any(isinstance(m, NativeLinear) for m in native.engine.runner.model.modules())
        assert [o.outputs[0].token_ids for o in native.generate(prompts, params, use_tqdm=False)] == got


@needs_native
def test_bfloat16_engines_with_the_native_kernel_agree_with_torch(tiny_model):
    """The same bfloat16 engine with the native kernel and with F.linear: its
    log-probabilities stay within bfloat16 rounding of the other's (greedy tokens
    of a random bf16 model may part later, where two logits are within a rounding)."""
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    outs = {}
    for ops in ("native", "torch"):
        llm = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256, dtype="bfloat16", linear_ops=ops)
        assert llm.engine.runner.linear_ops == ops
        assert any(isinstance(m, NativeLinear) for m in llm.engine.runner.model.modules()) == (ops == "native")
        outs[ops] = llm.generate(prompts, params, use_tqdm=False)
    for native, torch_out in zip(outs["native"], outs["torch"]):
        first_native, first_torch = native.outputs[0].logprobs[0], torch_out.outputs[0].logprobs[0]
        assert native.outputs[0].token_ids[0] == torch_out.outputs[0].token_ids[0]
        for tok, lp in first_torch.items():
            if tok in first_native:
                assert abs(first_native[tok].logprob - lp.logprob) < 0.1
