"""Linear layers prepacked for oneDNN (``EngineConfig.linear_ops``): the same
numbers as ``F.linear`` up to float reassociation, chosen as ``auto`` says,
and engines that use them give HF's greedy tokens."""

from __future__ import annotations

import pytest
import torch

import spyre_cb
from spyre_cb import ConfigError, SamplingParams
from spyre_cb.linear import PackedLinear, onednn_available, pack_linears, resolve

needs_onednn = pytest.mark.skipif(not onednn_available(torch.float32)[0], reason="no oneDNN in this torch build")


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
def test_pack_linears_skips_tied_weights():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10, bias=False))
    model[2].weight = model[0].weight  # an LM head tied to the embedding
    assert pack_linears(model, batch_hint=2) == 1
    assert isinstance(model[1], PackedLinear) and type(model[2]) is torch.nn.Linear


def test_auto_and_explicit_choices():
    ok = onednn_available(torch.float32)[0]
    assert resolve("auto", "eager", torch.float32) == ("onednn" if ok else "torch")
    assert resolve("auto", "inductor", torch.float32) == "torch"
    assert resolve("torch", "eager", torch.float32) == "torch"
    with pytest.raises(ConfigError, match="backend 'eager'"):
        spyre_cb.EngineConfig(linear_ops="onednn", backend="inductor")


@needs_onednn
def test_engines_with_packed_linears_give_hf_greedy_tokens(tiny_model, hf_greedy):
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256)
    assert llm.engine.runner.linear_ops == "onednn"
    assert any(isinstance(m, PackedLinear) for m in llm.engine.runner.model.modules())
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(p, 12) for p in prompts]
    plain = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256, linear_ops="torch")
    assert not any(isinstance(m, PackedLinear) for m in plain.engine.runner.model.modules())
    assert [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)] == got
