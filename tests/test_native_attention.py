"""The native decode kernel (``spyre_cb._core.paged_decode_attention``, reached
as the ``spyre_cb::paged_decode`` torch op) against the vectorized torch
path it replaces; its refusals; and that engines really run it."""

from __future__ import annotations

import pytest
import torch

import spyre_cb
from conftest import drain, random_prompts
from spyre_cb import _core, attention
from spyre_cb.linear import native_available, onednn_available


def _inputs(seed: int, batch: int, heads: int, kv_heads: int, n_blocks: int = 40, width: int = 5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, heads, 64, generator=g)
    kc = torch.randn(n_blocks, 64, kv_heads, 64, generator=g)
    vc = torch.randn(n_blocks, 64, kv_heads, 64, generator=g)
    table = torch.randint(0, n_blocks, (batch, width), generator=g)
    tkv = torch.randint(1, width * 64 + 1, (1,), generator=g).repeat(batch)
    left = (torch.rand(batch, generator=g) * (tkv - 1)).long()
    return q, kc, vc, {"block_table": table, "current_tkv_mask": tkv, "left_padded_prompt_mask": left}


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (12, 6), (8, 2)])
def test_native_decode_equals_the_vectorized_decode(heads, kv_heads):
    for seed in range(6):
        q, kc, vc, kw = _inputs(seed, batch=5, heads=heads, kv_heads=kv_heads)
        want = attention._decode(q, kc, vc, heads, kv_heads, 0.0, None, **kw)
        got = attention._native_decode(q, kc, vc, heads, kv_heads, 0.0, None, **kw)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (12, 4)])
def test_native_decode_reads_a_bfloat16_cache(heads, kv_heads):
    """A bfloat16 cache (read as it lies: on AVX512_BF16 its scores come from
    ``vdpbf16ps``, elsewhere each element is widened to float32) gives what the
    float32 kernel gives on the same values up to the order of the float32 sums
    (the same bfloat16 result but where that order crosses a rounding), and what
    the vectorized bfloat16 path gives within bfloat16's precision."""
    for seed in range(4):
        q, kc, vc, kw = _inputs(seed, batch=4, heads=heads, kv_heads=kv_heads)
        qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
        got = attention._native_decode(qb, kb, vb, heads, kv_heads, 0.0, None, **kw)
        assert got.dtype == torch.bfloat16
        exact = attention._native_decode(qb.float(), kb.float(), vb.float(), heads, kv_heads, 0.0, None, **kw)
        assert (got == exact.bfloat16()).float().mean() > 0.99
        torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-5)
        torch_path = attention._decode(qb, kb, vb, heads, kv_heads, 0.0, None, **kw)
        torch.testing.assert_close(got.float(), torch_path.float(), rtol=2e-2, atol=2e-2)


def test_native_decode_runs_under_torch_compile():
    q, kc, vc, kw = _inputs(1, batch=3, heads=4, kv_heads=2)

    def step(q, kc, vc, table, tkv, left):
        out = attention.paged_decode(q.reshape(3, 4, 64) * 2.0, kc, vc, table, left, tkv, 0.125)
        return out.sum(-1)

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    args = (q, kc, vc, kw["block_table"], kw["current_tkv_mask"], kw["left_padded_prompt_mask"])
    torch.testing.assert_close(compiled(*args), step(*args))


def test_bad_inputs_raise_value_errors_naming_the_limit():
    q, kc, vc, kw = _inputs(2, batch=2, heads=4, kv_heads=2, n_blocks=8, width=2)
    table = kw["block_table"].clone()
    table[1, :] = 8  # one past the last block
    with pytest.raises(ValueError, match="outside the cache's 8 blocks"):
        attention.paged_decode(q.reshape(2, 4, 64), kc, vc, table, torch.tensor([0, 0]), torch.tensor([5, 5]), 0.1)
    with pytest.raises(ValueError, match="within its block table's 128 slots"):
        attention.paged_decode(
            q.reshape(2, 4, 64), kc, vc, kw["block_table"], torch.tensor([0, 0]), torch.tensor([129, 5]), 0.1
        )
    with pytest.raises(ValueError, match="shapes disagree"):
        attention.paged_decode(
            q.reshape(2, 4, 64), kc, vc[:, :, :1], kw["block_table"], torch.tensor([0, 0]), torch.tensor([5, 5]), 0.1
        )
    with pytest.raises(TypeError):  # float64 caches are not the kernel's
        _core.paged_decode_attention(
            q.reshape(2, 4, 64).numpy(),
            kc.double().numpy(),
            vc.numpy(),
            kw["block_table"].numpy(),
            torch.tensor([0, 0]).numpy(),
            torch.tensor([5, 5]).numpy(),
            0.1,
            torch.empty(2, 4, 64).numpy(),
        )


def _counting(monkeypatch, name: str) -> list:
    calls: list = []
    kernel = getattr(_core, name)
    monkeypatch.setattr(_core, name, lambda *a, **kw: (calls.append(a[0].shape), kernel(*a, **kw))[1])
    return calls


@pytest.mark.skipif(
    not (
        native_available(torch.bfloat16)[0]
        and native_available(torch.float32)[0]
        and onednn_available(torch.float32)[0]
    ),
    reason="the runner's own decode step needs the native linear kernel (AVX-512 / AVX512_BF16), the FMS path oneDNN",
)
def test_engines_decode_through_the_kernel(tiny_model, monkeypatch):
    params = spyre_cb.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    # the runner's own decode step (spyre_cb.decoder) calls the fused kernel
    fused = _counting(monkeypatch, "paged_decode_qkv_f32")
    llm = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256)
    llm.generate([[5, 6, 7], [8, 9, 10, 11]], params)
    n_layers = llm.engine.runner.n_layers
    assert len(fused) >= 4 * n_layers  # every decode step, every layer
    fused_bf16 = _counting(monkeypatch, "paged_decode_qkv_bf16")
    spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256, dtype="bfloat16").generate([[5, 6, 7]], params)
    assert len(fused_bf16) >= 4 * n_layers
    # FMS's forward (here: with oneDNN's linear layers) calls the attention op
    calls = _counting(monkeypatch, "paged_decode_attention")
    llm = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=256, linear_ops="onednn")
    assert llm.engine.runner.decoder is None
    llm.generate([[5, 6, 7], [8, 9, 10, 11]], params)
    assert len(calls) >= 4 * n_layers
    calls.clear()
    spyre_cb.LLM(
        tiny_model, max_num_seqs=2, max_model_len=256, attention_ops="vectorized", linear_ops="onednn"
    ).generate([[5, 6, 7]], params)
    assert calls == []


@pytest.mark.parametrize("policy", ["continuous", "chunked"])
def test_prompts_as_short_as_the_kv_heads_are_hf_exact(tiny_model, hf_greedy, policy):
    # prefills run their prompt tokens only, so a prompt can be as long as
    # there are KV heads (2): a layout guessed from shapes would go wrong there
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=4, max_model_len=256, policy=policy)
    prompts = random_prompts([1, 2, 3, 4, 65], eng.vocab_size, seed=186)
    params = spyre_cb.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    drain(eng)
    for i, p in enumerate(prompts):
        assert eng.get_request(str(i)).output_token_ids == hf_greedy(p, 6), len(p)


def test_padding_slots_are_never_written_nor_read(tiny_model, hf_greedy):
    # every KV slot starts as NaN: a padding slot that were read would turn
    # its sequence's tokens to garbage, one that were written would lose its NaN
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=3, max_model_len=256, available_blocks=24)
    for k, v in eng.runner.kv_cache:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    # joins at block boundaries and mid-block, a tkv shift (prompt 150 > tkv)
    lengths = [30, 100, 150, 5, 64, 1]
    prompts = random_prompts(lengths, eng.vocab_size, seed=9)
    params = spyre_cb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
        eng.step()
    drain(eng)
    for i, p in enumerate(prompts):
        assert eng.get_request(str(i)).output_token_ids == hf_greedy(p, 12), lengths[i]
    keys = eng.runner.kv_cache[0][0]
    assert keys.isnan().any() and not keys.isnan().all()
