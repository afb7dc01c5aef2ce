"""The vLLM sampling and output surface, each option against a reference:
transformers' own logits processors where it has them, a direct computation
where it does not."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import transformers

import spyre_cb
from conftest import random_prompts
from spyre_cb import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return spyre_cb.LLM(tiny_model, max_num_seqs=4, max_model_len=256)


@pytest.fixture(scope="module")
def hf(tiny_model):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_generate(hf, ids, n, **kw) -> list[int]:
    x = torch.tensor([ids])
    kw.setdefault("eos_token_id", None)
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids) :].tolist()


def hf_logits(hf, ids) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def one(llm, ids, **kw):
    return llm.generate([ids], SamplingParams(**kw), use_tqdm=False)[0]


def test_repetition_penalty_matches_transformers(llm, hf):
    ids = random_prompts([30], llm.engine.vocab_size, seed=41)[0]
    for rp in (1.3, 0.8):
        got = one(llm, ids, max_tokens=15, repetition_penalty=rp, **GREEDY).outputs[0].token_ids
        assert got == hf_generate(hf, ids, 15, repetition_penalty=rp)
    assert one(llm, ids, max_tokens=15, repetition_penalty=1.3, **GREEDY).outputs[0].token_ids != hf_generate(
        hf, ids, 15
    )


def test_presence_and_frequency_penalties_match_a_direct_computation(llm, hf):
    ids = random_prompts([25], llm.engine.vocab_size, seed=42)[0]
    pres, freq = 0.9, 1.4
    seq, out = list(ids), []
    for _ in range(14):
        logits = hf_logits(hf, seq)[-1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        logits = logits - freq * counts - pres * (counts > 0).float()
        t = int(logits.argmax())
        out.append(t)
        seq.append(t)
    got = one(llm, ids, max_tokens=14, presence_penalty=pres, frequency_penalty=freq, **GREEDY)
    assert got.outputs[0].token_ids == out


def test_min_tokens_holds_back_eos_like_transformers(tiny_model, tmp_path, hf):
    base = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=128)
    ids = random_prompts([18], base.engine.vocab_size, seed=43)[0]
    free = one(base, ids, max_tokens=12, **GREEDY).outputs[0].token_ids
    eos = free[1]
    d = shutil.copytree(tiny_model, tmp_path / "eos")
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((d / name).read_text())
        cfg["eos_token_id"] = eos
        (d / name).write_text(json.dumps(cfg))
    llm = spyre_cb.LLM(d, max_num_seqs=2, max_model_len=128)
    early = one(llm, ids, max_tokens=12, temperature=0.0).outputs[0]
    assert early.token_ids == free[:2] and early.finish_reason == "stop"
    held = one(llm, ids, max_tokens=12, temperature=0.0, min_tokens=6).outputs[0]
    assert len(held.token_ids) >= 6
    assert held.token_ids == hf_generate(hf, ids, 12, eos_token_id=eos, min_new_tokens=6)[: len(held.token_ids)]


def test_min_p_keeps_only_likely_tokens():
    from spyre_cb.engine import RequestState
    from spyre_cb.sampling import Sampler

    logits = torch.tensor([[3.0, 2.9, 1.0, 0.0, -1.0]])
    s = Sampler()
    picks = set()
    for seed in range(80):
        p = SamplingParams(temperature=1.0, min_p=0.5, seed=seed)
        s.start("x", p, 0)
        picks.add(s.sample(logits, [RequestState("x", [1], p)]).tokens[0])
    assert picks == {0, 1}  # p(2)/p(0) = e^-2 < 0.5


def test_rows_with_nan_or_infinite_logits_fail_alone():
    from spyre_cb.engine import RequestState
    from spyre_cb.sampling import Sampler

    logits = torch.tensor([[0.0, 2.0], [float("nan"), 1.0], [1.0, 0.0], [float("inf"), 0.0]])
    p = SamplingParams(temperature=0.0)
    rows = [RequestState(str(i), [1], p) for i in range(4)]
    out = Sampler().sample(logits, rows)
    assert out.tokens == [1, 0, 0, 0]
    assert set(out.errors) == {1, 3} and "NaN or infinite logits" in out.errors[1]


def test_max_tokens_none_fills_max_model_len(llm):
    ids = random_prompts([200], llm.engine.vocab_size, seed=44)[0]
    out = one(llm, ids, max_tokens=None, **GREEDY).outputs[0]
    assert len(out.token_ids) == 256 - 200 and out.finish_reason == "length"
    with pytest.raises(spyre_cb.InvalidRequestError, match="leaves no room"):
        one(llm, [1] * 256, max_tokens=None, **GREEDY)


def test_n_completions_are_reproducible_and_distinct(llm):
    ids = random_prompts([12], llm.engine.vocab_size, seed=45)[0]
    a = one(llm, ids, n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    b = one(llm, ids, n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3
    g = one(llm, ids, n=2, max_tokens=6, **GREEDY)
    assert g.outputs[0].token_ids == g.outputs[1].token_ids and not llm.engine.requests


def test_logprobs_cumulative_and_decoded_tokens_match_transformers(llm, hf):
    ids = random_prompts([20], llm.engine.vocab_size, seed=46)[0]
    out = one(llm, ids, max_tokens=6, logprobs=2, **GREEDY).outputs[0]
    seq = list(ids) + out.token_ids
    ref = torch.log_softmax(hf_logits(hf, seq), dim=-1)
    tok = llm.get_tokenizer()
    total = 0.0
    for pos, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(ids) - 1 + pos]
        assert math.isclose(lp[t].logprob, float(row[t]), abs_tol=1e-4)
        assert lp[t].rank == 1 and lp[t].decoded_token == tok.decode([t])
        assert set(lp) == set(row.topk(2).indices.tolist())
        total += lp[t].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-9)
    assert one(llm, ids, max_tokens=2, **GREEDY).outputs[0].cumulative_logprob is None


def test_prompt_logprobs_match_transformers(llm, hf):
    ids = random_prompts([90], llm.engine.vocab_size, seed=47)[0]  # spans two blocks
    res = one(llm, ids, max_tokens=3, prompt_logprobs=3, **GREEDY)
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(ids)
    ref = torch.log_softmax(hf_logits(hf, ids), dim=-1)
    for pos in range(1, len(ids)):
        d, row = res.prompt_logprobs[pos], ref[pos - 1]
        assert math.isclose(d[ids[pos]].logprob, float(row[ids[pos]]), abs_tol=1e-4)
        assert d[ids[pos]].rank == int((row > row[ids[pos]]).sum()) + 1
        assert set(row.topk(3).indices.tolist()) <= set(d)
    # prompt logprobs do not change the generated tokens
    assert res.outputs[0].token_ids == one(llm, ids, max_tokens=3, **GREEDY).outputs[0].token_ids


def test_logits_processors_match_transformers(llm, hf):
    ids = random_prompts([15], llm.engine.vocab_size, seed=48)[0]
    banned = one(llm, ids, max_tokens=8, **GREEDY).outputs[0].token_ids[:3]

    def ban(out_ids, logits):
        logits[banned] = -math.inf
        return logits

    got = one(llm, ids, max_tokens=8, logits_processors=[ban], **GREEDY).outputs[0].token_ids
    assert not set(got) & set(banned)

    class HFBan(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, banned] = -math.inf
            return scores

    assert got == hf_generate(hf, ids, 8, logits_processor=transformers.LogitsProcessorList([HFBan()]))


def test_a_failing_logits_processor_ends_only_its_request(llm):
    ids = random_prompts([10, 11], llm.engine.vocab_size, seed=49)

    def broken(out_ids, logits):
        raise ValueError("bad processor")

    outs = llm.generate(
        ids,
        [SamplingParams(max_tokens=4, logits_processors=[broken], **GREEDY), SamplingParams(max_tokens=4, **GREEDY)],
        use_tqdm=False,
    )
    assert outs[0].outputs[0].finish_reason == "abort" and outs[1].outputs[0].finish_reason == "length"


def test_skip_special_tokens_controls_the_text(llm):
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    ids = random_prompts([10], llm.engine.vocab_size, seed=50)[0]

    def force_eos_first(out_ids, logits):
        if not out_ids:
            logits[:] = -math.inf
            logits[eos] = 0.0
        return logits

    for skip in (True, False):
        out = one(llm, ids, max_tokens=4, logits_processors=[force_eos_first], skip_special_tokens=skip, **GREEDY)
        c = out.outputs[0]
        assert c.token_ids[0] == eos and c.text == tok.decode(c.token_ids, skip_special_tokens=skip)
        assert (tok.eos_token in c.text) == (not skip)


def test_chat_uses_the_tokenizer_template(tiny_model, tmp_path, hf):
    d = shutil.copytree(tiny_model, tmp_path / "chat")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = spyre_cb.LLM(d, max_num_seqs=2, max_model_len=256)
    msgs = [{"role": "user", "content": "Which road leads to the river?"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)[0]
    expect = llm.get_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    expect = list(expect["input_ids"] if isinstance(expect, dict) or hasattr(expect, "input_ids") else expect)
    assert out.prompt_token_ids == expect
    assert out.outputs[0].token_ids == hf_generate(hf, expect, 6)
    bare = shutil.copytree(tiny_model, tmp_path / "bare")
    cfg.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(spyre_cb.InvalidRequestError, match="no chat template"):
        spyre_cb.LLM(bare, max_num_seqs=1, max_model_len=128).chat(msgs)


def test_llm_takes_dtype_and_seed(tiny_model):
    llm = spyre_cb.LLM(tiny_model, max_num_seqs=1, max_model_len=128, dtype="bfloat16", seed=3)
    assert llm.engine.runner.dtype == torch.bfloat16 and llm.engine.config.seed == 3
    out = one(llm, [5, 6, 7], max_tokens=3, **GREEDY)
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(n=0), "n must be"),
        (dict(min_p=1.5), "min_p must be in"),
        (dict(presence_penalty=3.0), "presence_penalty must be in"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be in \[0.01, 100\], got 0.0"),
        (dict(repetition_penalty=1e-300), r"repetition_penalty must be in \[0.01, 100\]"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens 5 is larger than max_tokens 2"),
        (dict(prompt_logprobs=-1), "prompt_logprobs must be"),
        (dict(logits_processors=[1]), "logits_processors must be a list of callables"),
        (dict(skip_special_tokens="yes"), "skip_special_tokens must be a bool"),
    ],
)
def test_new_options_are_validated(kw, needle):
    with pytest.raises(spyre_cb.InvalidRequestError, match=needle):
        SamplingParams(**kw)


def test_request_metrics(llm):
    ids = random_prompts([30, 12], llm.engine.vocab_size, seed=51)
    outs = llm.generate(
        ids, [SamplingParams(max_tokens=6, **GREEDY), SamplingParams(max_tokens=1, **GREEDY)], use_tqdm=False
    )
    for o, n in zip(outs, (6, 1)):
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.n_tokens == n and m.time_to_first_token > 0 and m.queue_time >= 0
    assert outs[0].metrics.mean_inter_token_latency > 0 and outs[1].metrics.mean_inter_token_latency is None
    first = outs[0].metrics
    assert math.isclose(
        first.mean_inter_token_latency * 5, first.last_token_time - first.first_token_time, rel_tol=1e-9
    )
