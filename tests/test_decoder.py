"""The runner's own decode step (``spyre_cb.decoder``): FMS's logits and KV
cache, bit for bit, for Granite (with its multipliers) and LLaMA, in bfloat16
and float32, under both policies; built only where that holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import spyre_cb
from spyre_cb import _core, decoder
from spyre_cb.linear import native_available
from spyre_cb.models import make_tiny_checkpoint
from spyre_cb.views import numpy_view

# the decoder runs over the native linear layers, which need AVX-512 (bfloat16: AVX512_BF16)
needs_native = pytest.mark.skipif(
    not (native_available(torch.bfloat16)[0] and native_available(torch.float32)[0]),
    reason="the native linear kernel does not run here (no AVX-512 / AVX512_BF16)",
)

GRANITE_MULTIPLIERS = dict(
    residual_multiplier=0.22, embedding_multiplier=12.0, logits_scaling=8.0, attention_multiplier=0.0625
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for arch in ("granite", "llama"):
        for dtype in ("bfloat16", "float32"):
            # head size 64: the attention's AVX-512 path where the CPU has it
            path = make_tiny_checkpoint(
                tmp_path_factory.mktemp(arch) / dtype, arch=arch, dtype=dtype, hidden_size=256, num_heads=4, seed=3
            )
            if arch == "granite":
                config = json.loads((path / "config.json").read_text())
                config.update(GRANITE_MULTIPLIERS)
                (path / "config.json").write_text(json.dumps(config))
            made[arch, dtype] = path
    return made


def _recorded(eng) -> list[torch.Tensor]:
    """Records the logits of every decode step the engine's runner runs."""
    runner = eng.executor.runner
    decode, seen = runner._decode, []

    def record(plan):
        out = decode(plan)
        seen.append(out.clone())
        return out

    runner._decode = record
    return seen


@needs_native
@pytest.mark.parametrize(
    "arch, dtype, policy",
    [
        ("granite", "bfloat16", "continuous"),
        ("granite", "float32", "continuous"),
        ("llama", "bfloat16", "continuous"),
        ("llama", "float32", "continuous"),
        # the other policy's decode plans (after chunks, with prefix caching)
        ("granite", "bfloat16", "chunked"),
    ],
)
def test_native_decode_steps_are_fms_bit_for_bit(checkpoints, arch, dtype, policy):
    engines = [
        spyre_cb.Engine(checkpoints[arch, dtype], dtype=dtype, max_num_seqs=3, max_model_len=256, policy=policy)
        for _ in range(2)
    ]
    native, fms = engines
    assert native.executor.runner.decoder is not None
    fms.executor.runner.decoder = None  # FMS's forward
    logits = [_recorded(e) for e in engines]
    params = spyre_cb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(5)
    # five requests through three seats: sequences join and leave mid-batch, with
    # different left paddings and contexts across blocks
    for i, n in enumerate((5, 70, 17, 33, 2)):
        prompt = torch.randint(3, 500, (n,), generator=g).tolist()
        for e in engines:
            e.add_request(f"r{i}", prompt, params)
    outs: list[dict] = [{}, {}]
    for _ in range(200):
        if not native.has_unfinished_requests():
            break
        for e, o in zip(engines, outs):
            for step in e.step():
                o.setdefault(step.request_id, []).extend(step.new_token_ids)
    assert not fms.has_unfinished_requests()
    assert len(logits[0]) == len(logits[1]) > 20
    for step, (a, b) in enumerate(zip(*logits)):
        assert torch.equal(a, b), f"decode step {step}: logits differ by {(a.float() - b.float()).abs().max()}"
    assert outs[0] == outs[1]
    for (k1, v1), (k2, v2) in zip(native.executor.runner.kv_cache, fms.executor.runner.kv_cache):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize(
    "setting",
    [dict(linear_ops="torch"), dict(attention_ops="vectorized"), dict(dtype="float16"), dict(backend="inductor")],
)
def test_other_settings_keep_fms_forward(checkpoints, setting):
    kw = dict(dtype="float32", max_num_seqs=2, max_model_len=128) | setting
    eng = spyre_cb.Engine(checkpoints["llama", "float32"], **kw)
    assert eng.executor.runner.decoder is None


@needs_native
def test_other_models_keep_fms_forward(checkpoints, tmp_path):
    mistral = make_tiny_checkpoint(tmp_path / "mistral", arch="mistral")
    eng = spyre_cb.Engine(mistral, dtype="float32", max_num_seqs=2, max_model_len=128)
    assert eng.executor.runner.linear_ops == "native" and eng.executor.runner.decoder is None
    # a block the decoder does not run as FMS does: another activation
    eng = spyre_cb.Engine(checkpoints["granite", "float32"], dtype="float32", max_num_seqs=2, max_model_len=128)
    model = eng.executor.runner.model
    assert decoder._build(model) is not None
    model.base_model.layers[1].ff_sub_layer.a = torch.nn.GELU()
    assert decoder._build(model) is None


def test_the_fused_attention_refuses_a_slot_outside_the_cache():
    b, heads, kvh, d = 2, 4, 2, 64
    qkv = torch.randn(b, (heads + 2 * kvh) * d).bfloat16()
    angles = torch.rand(b, d // 2).numpy()
    cache = [torch.randn(3, 4, kvh, d).bfloat16() for _ in range(2)]
    before = [c.clone() for c in cache]
    table = np.array([[0, 1], [2, 0]], dtype=np.int64)
    out = torch.empty(b, heads * d).bfloat16()
    args = (numpy_view(qkv), angles, angles, angles)
    rest = (numpy_view(cache[0]), numpy_view(cache[1]), table, np.zeros(b, np.int64), np.array([3, 2]), 0.125, heads)
    with pytest.raises(ValueError, match="token 1 is stored in slot 12, outside the cache's 12 slots"):
        _core.paged_decode_qkv_bf16(*args, np.array([2, 12]), *rest, numpy_view(out))
    assert all(torch.equal(c, w) for c, w in zip(cache, before))
    # one tensor as both caches: two NumPy views numpy's borrow checks cannot tell apart
    shared = (numpy_view(cache[0]), numpy_view(cache[0]), *rest[2:])
    with pytest.raises(ValueError, match="key_cache and value_cache share memory"):
        _core.paged_decode_qkv_bf16(*args, np.array([2, 9]), *shared, numpy_view(out))
    with pytest.raises(ValueError, match="qkv must be C-contiguous"):
        _core.paged_decode_qkv_bf16(numpy_view(qkv)[:, ::2], *args[1:], np.array([2, 9]), *rest, numpy_view(out))
    assert all(torch.equal(c, w) for c, w in zip(cache, before))
    _core.paged_decode_qkv_bf16(*args, np.array([2, 9]), *rest, numpy_view(out))
    assert not torch.equal(cache[0], before[0]), "the new keys were stored"


def test_add_rms_norm_refuses_shared_buffers():
    h = torch.randn(3, 16).bfloat16()
    delta = torch.randn(3, 16).bfloat16()
    with pytest.raises(ValueError, match="h and out share memory"):
        _core.add_rms_norm_bf16(numpy_view(delta), 0.5, numpy_view(h), None, None, 1e-5, numpy_view(h))
