"""Checkpoints as transformers builds them: text prompts tokenized with the
tokenizer's special tokens, every EOS id honoured, only verified
architectures run, limits checked at construction, and a broken model
directory is a ConfigError that says what is broken."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spyre_cb
from spyre_cb import ConfigError, SamplingParams, SpyreCBError
from spyre_cb.checkpoint import VERIFIED_ARCHITECTURES
from spyre_cb.models import make_tiny_checkpoint

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("bos") / "llama", seed=2, arch="llama", add_bos=True)


def hf_text_greedy(path, text: str, n: int) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(text, return_tensors="pt")  # the tokenizer's defaults, as HF users call it
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, enc.input_ids.shape[1] :].tolist()


def test_text_prompts_get_the_bos_token_like_hf(bos_model):
    llm = spyre_cb.LLM(bos_model, max_num_seqs=2, max_model_len=128)
    bos = llm.get_tokenizer().bos_token_id if hasattr(llm, "get_tokenizer") else llm.tokenizer.bos_token_id
    texts = ["The river was higher than", "Numbers help people reason"]
    outs = llm.generate(texts, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    for text, out in zip(texts, outs):
        assert out.prompt_token_ids[0] == bos
        assert out.outputs[0].token_ids == hf_text_greedy(bos_model, text, 8)


def with_eos(src, dst, *, config_eos=None, generation_eos=None):
    shutil.copytree(src, dst)
    if config_eos is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["eos_token_id"] = config_eos
        (dst / "config.json").write_text(json.dumps(cfg))
    if generation_eos is not None:
        gen = json.loads((dst / "generation_config.json").read_text())
        gen["eos_token_id"] = generation_eos
        (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


def test_every_eos_id_ends_a_request(bos_model, tmp_path):
    base = spyre_cb.LLM(bos_model, max_num_seqs=2, max_model_len=128)
    ids = [5, 17, 99, 230, 41, 7, 300, 12]
    free = base.generate([ids], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    eos_a, eos_b = free[6], free[3]  # b comes first: the second id of a list must stop it
    assert eos_b not in free[:3]
    # config.json with a list (as Llama 3 ships [128001, 128009])
    listed = with_eos(bos_model, tmp_path / "list", config_eos=[eos_a, eos_b])
    # generation_config.json naming a chat template's end-of-turn token the config lacks
    turn = with_eos(bos_model, tmp_path / "turn", config_eos=1, generation_eos=[1, eos_b])
    for path in (listed, turn):
        llm = spyre_cb.LLM(path, max_num_seqs=2, max_model_len=128)
        assert eos_b in llm.engine.eos_token_ids
        out = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == free[:4] and out.finish_reason == "stop"
        kept = llm.generate([ids], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
        assert kept.token_ids == free and kept.finish_reason == "length"


@pytest.mark.parametrize(
    "arch, config_cls",
    [("GPTBigCodeForCausalLM", "GPTBigCodeConfig"), ("Qwen3ForCausalLM", "Qwen3Config")],
)
def test_unverified_architectures_are_refused_by_name(tmp_path, arch, config_cls):
    model_cls = getattr(transformers, arch)
    cfg = getattr(transformers, config_cls)(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        n_embd=32,
        n_layer=1,
        n_head=2,
        intermediate_size=64,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        n_positions=256,
    )
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        spyre_cb.Engine(tmp_path, max_num_seqs=1, max_model_len=128)
    msg = str(err.value)
    assert arch in msg and all(a in msg for a in VERIFIED_ARCHITECTURES) and "allow_unverified_architectures" in msg
    with pytest.warns(UserWarning, match="not verified"):
        try:
            spyre_cb.Engine(tmp_path, max_num_seqs=1, max_model_len=128, allow_unverified_architectures=True)
        except ConfigError:
            pass  # FMS may still fail to load it: then a ConfigError, never a raw exception


def test_max_model_len_beyond_the_position_table_is_a_config_error(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "short", seed=0, max_position_embeddings=256)
    spyre_cb.Engine(path, max_num_seqs=1, max_model_len=256)
    with pytest.raises(ConfigError, match="max_model_len 320 exceeds the model's max_position_embeddings 256"):
        spyre_cb.Engine(path, max_num_seqs=1, max_model_len=320)


FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
damage = st.sampled_from(["delete", "empty", "garbage", "truncate", "json-list", "binary"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(harm=st.lists(st.tuples(st.sampled_from(FILES), damage), min_size=1, max_size=3))
def test_broken_model_directories_only_raise_config_errors(tiny_model, tmp_path_factory, harm):
    d = tmp_path_factory.mktemp("broken") / "m"
    shutil.copytree(tiny_model, d)
    for name, how in harm:
        f = d / name
        if how == "delete":
            f.unlink(missing_ok=True)
        elif how == "empty":
            f.write_bytes(b"")
        elif how == "garbage":
            f.write_text("{ not json")
        elif how == "truncate" and f.exists():
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
        elif how == "json-list":
            f.write_text("[1, 2, 3]")
        elif how == "binary":
            f.write_bytes(b"\x00\xff\xfe\x89")
    try:
        llm = spyre_cb.LLM(d, max_num_seqs=1, max_model_len=128)
    except SpyreCBError as e:
        assert isinstance(e, ConfigError), e
        if any(n.startswith("tokenizer") and h != "delete" for n, h in harm) and "tokenizer" in str(e):
            assert "corrupt" in str(e) or "unreadable" in str(e)
        return
    # it loaded: then it must work (the damage was to an optional file)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_llm_uses_the_model_of_its_config(bos_model):
    from spyre_cb.config import EngineConfig

    llm = spyre_cb.LLM(config=EngineConfig(model=str(bos_model), max_num_seqs=1, max_model_len=128))
    assert llm.engine.model_path == bos_model


def test_vllm_prompt_forms(bos_model):
    llm = spyre_cb.LLM(bos_model, max_num_seqs=2, max_model_len=128)
    params = SamplingParams(max_tokens=4, **GREEDY)
    text = llm.generate("Hello there", params, use_tqdm=False)[0]
    as_dict = llm.generate({"prompt": "Hello there"}, params, use_tqdm=False)[0]
    assert (
        as_dict.prompt_token_ids == text.prompt_token_ids and as_dict.outputs[0].token_ids == text.outputs[0].token_ids
    )
    ids = text.prompt_token_ids
    mixed = llm.generate(["Hello there", {"prompt_token_ids": ids}, ids], params, use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in mixed}) == 1
    for bad in ({"text": "x"}, {"prompt": 5}, [{"prompt": "a", "extra": 1}], 3.5, [None]):
        with pytest.raises(spyre_cb.InvalidRequestError):
            llm.generate(bad, params, use_tqdm=False)
    assert not llm.engine.requests
