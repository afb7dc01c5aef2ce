"""Offline tiny checkpoints: deterministic, loadable by HF and FMS, both architectures."""

from __future__ import annotations

import hashlib

import pytest

import spyre_cb
from engine_harness import run_engine
from spyre_cb.models import make_tiny_checkpoint


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4)
    assert digest(a / "model.safetensors") == digest(b / "model.safetensors")
    assert digest(a / "tokenizer.json") == digest(b / "tokenizer.json")
    assert digest(a / "model.safetensors") != digest(c / "model.safetensors")


def test_tokenizer_round_trips_text(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "The key value cache is cut into blocks of 64 slots."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of"):
        make_tiny_checkpoint(tmp_path / "x", arch="gpt2")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_verified_architectures_run_and_match_hf(tmp_path, arch):
    import torch
    import transformers

    path = make_tiny_checkpoint(tmp_path / arch, seed=1, arch=arch)
    reqs = [(0, 49, 12), (0, 70, 6), (3, 130, 8)]  # a join with a tkv shift
    eng = spyre_cb.Engine(path, max_num_seqs=2, max_model_len=256)
    records, prompts, outputs = run_engine(eng, reqs, seed=2)
    assert records == list(spyre_cb.simulate(reqs, max_num_seqs=2, max_model_len=256))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for i, (_, pl, mt) in enumerate(reqs):
        ids = torch.tensor([prompts[i]])
        with torch.inference_mode():
            ref = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=mt, do_sample=False, pad_token_id=0
            )
        assert outputs[str(i)] == ref[0, pl:].tolist(), f"request {i}"
