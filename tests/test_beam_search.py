"""Beam search in the engine: each request's beams share the prompt's KV
blocks and fork in the core; every returned beam (tokens and score) equals
transformers' ``generate(num_beams=k, do_sample=False, length_penalty=...)``,
EOS endings included; beam searches batch with ordinary requests, which stay
token-exact; blocks return whole, an abort frees every fork."""

from __future__ import annotations

import collections
import json
import random
import shutil

import pytest
import torch

from spyre_cb import LLM, Engine, SamplingParams
from spyre_cb.beam_search import BeamSearchOutput, BeamSearchParams
from spyre_cb.errors import InvalidRequestError
from spyre_cb.models import make_tiny_checkpoint


def _with_frequent_eos(src, dst):
    """``src`` with EOS ids its greedy outputs often produce (so beams end on EOS
    and the length penalty matters), written where transformers reads them too."""
    import transformers

    shutil.copytree(src, dst)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    rng = random.Random(1)
    seen: collections.Counter[int] = collections.Counter()
    with torch.inference_mode():
        for _ in range(12):
            p = [rng.randrange(2, 500) for _ in range(rng.randint(3, 40))]
            seen.update(
                hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16, pad_token_id=0)[0, len(p) :].tolist()
            )
    cfg = json.loads((dst / "config.json").read_text())
    eos = sorted({cfg["eos_token_id"], *(t for t, _ in seen.most_common(5))})
    cfg["eos_token_id"] = eos
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0}))
    return dst


@pytest.fixture(scope="module")
def eos_model(tiny_model, tmp_path_factory):
    return _with_frequent_eos(tiny_model, tmp_path_factory.mktemp("beam") / "m")


def _hf_beams(path, prompt, k, lp, max_tokens):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            num_beams=k,
            num_return_sequences=k,
            do_sample=False,
            length_penalty=lp,
            max_new_tokens=max_tokens,
            early_stopping=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return [s[len(prompt) :].tolist() for s in out.sequences], out.sequences_scores.tolist()


def _check_equal(ours: BeamSearchOutput | list, theirs) -> None:
    seqs = ours.sequences if isinstance(ours, BeamSearchOutput) else ours
    tokens, scores = theirs
    assert len(seqs) == len(tokens)
    for b, t, sc in zip(seqs, tokens, scores, strict=True):
        assert t[: len(b.output_token_ids)] == b.output_token_ids
        assert all(x == t[len(b.output_token_ids)] for x in t[len(b.output_token_ids) :])  # the rest is fill
        assert b.score == pytest.approx(sc, rel=1e-4, abs=1e-4)


POLICIES = [{}, {"policy": "chunked", "chunk_size": 64, "prefix_caching": True}]


@pytest.mark.parametrize("policy", POLICIES, ids=["continuous", "chunked"])
@pytest.mark.parametrize("k", [2, 4])
def test_beams_equal_transformers_batched_with_greedy_requests(eos_model, hf_greedy, tiny_model, k, policy):
    """Several beam searches (length penalties 1, 0, 2, -1) and greedy requests share one batch."""
    eng = Engine(str(eos_model), max_num_seqs=16, max_model_len=256, **policy)
    rng = random.Random(k)
    cases = []
    for i, lp in enumerate([1.0, 0.0, 2.0, -1.0, 1.0, 0.0]):
        prompt = [rng.randrange(2, eng.vocab_size) for _ in range(rng.randint(3, 90))]
        cases.append((f"b{i}", prompt, lp, rng.randint(1, 40)))
        eng.add_beam_search(f"b{i}", prompt, BeamSearchParams(beam_width=k, max_tokens=cases[-1][3], length_penalty=lp))
    greedy = [[rng.randrange(2, eng.vocab_size) for _ in range(rng.randint(3, 60))] for _ in range(2)]
    for j, p in enumerate(greedy):
        eng.add_request(f"g{j}", p, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0))
    outs = {}
    steps = 0
    while eng.has_unfinished_requests():
        steps += 1
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        eng.scheduler.check_invariants()
    stops = 0
    for rid, prompt, lp, mt in cases:
        o = outs[rid]
        assert o.beams is not None and len(o.beams) == k
        assert o.new_token_ids == o.beams[0].output_token_ids
        assert o.beams[0].tokens == prompt + o.beams[0].output_token_ids
        _check_equal(o.beams, _hf_beams(eos_model, prompt, k, lp, mt))
        stops += sum(b.finish_reason == "stop" for b in o.beams)
    assert stops > 0, "some beams end on EOS"
    for j, p in enumerate(greedy):  # the checkpoint's weights are the tiny model's
        assert eng.requests[f"g{j}"].output_token_ids == hf_greedy(p, 12)
    eng.step()
    assert eng.n_used_blocks == 0 and eng.n_reserved_blocks == 0


def test_llm_beam_search_api_on_another_architecture(tmp_path):
    """vLLM's ``LLM.beam_search`` on a Llama checkpoint that adds BOS, prompts as text and ids."""
    path = make_tiny_checkpoint(tmp_path / "llama", seed=1, arch="llama", add_bos=True)
    llm = LLM(str(path), max_num_seqs=8, max_model_len=256)
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    prompts = ["the quick brown fox", {"prompt": "a block of sixty four"}, [5, 6, 7, 8]]
    outs = llm.beam_search(prompts, params)
    assert [len(o.sequences) for o in outs] == [3, 3, 3]
    tok = llm.get_tokenizer()
    for o, p in zip(outs, ["the quick brown fox", "a block of sixty four", None], strict=True):
        ids = tok(p).input_ids if p is not None else [5, 6, 7, 8]
        assert o.sequences[0].tokens[: len(ids)] == ids
        assert all(len(s.output_token_ids) == 10 and s.finish_reason == "length" for s in o.sequences)
        assert o.sequences[0].text == tok.decode(o.sequences[0].output_token_ids, skip_special_tokens=True)
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        hf.generation_config.eos_token_id = None
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([ids]),
                num_beams=3,
                num_return_sequences=3,
                do_sample=False,
                max_new_tokens=10,
                pad_token_id=0,
            )
        assert [s.output_token_ids for s in o.sequences] == [r[len(ids) :].tolist() for r in ref]
    llm.engine.step()  # finished requests' blocks return with the next step
    assert llm.engine.n_used_blocks == 0


@pytest.mark.parametrize("policy", POLICIES, ids=["continuous", "chunked"])
def test_abort_frees_every_fork_and_bad_params_are_refused(tiny_model, policy):
    eng = Engine(str(tiny_model), max_num_seqs=4, max_model_len=256, **policy)
    eng.add_beam_search("b", list(range(2, 72)), BeamSearchParams(beam_width=3, max_tokens=50, ignore_eos=True))
    for _ in range(6):
        eng.step()
    assert eng.n_running == 3 and eng.n_used_blocks >= 3
    eng.abort_request("b")
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("b", "abort")]
    assert eng.n_used_blocks == 0 and eng.n_reserved_blocks == 0
    for bad, match in [
        (dict(beam_width=0, max_tokens=4), "beam_width must be an int >= 1"),
        (dict(beam_width=5, max_tokens=4), r"beam width 5 must be in \[1, max_num_seqs 4\]"),
        (dict(beam_width=2, max_tokens=4, temperature=-1), "temperature"),
        (dict(beam_width=2, max_tokens=300), "exceeds max_model_len"),
    ]:
        with pytest.raises(InvalidRequestError, match=match):  # at construction, or when added
            eng.add_beam_search("x", [5, 6], BeamSearchParams(**bad))
    assert not eng.has_unfinished_requests()


def test_server_use_beam_search_with_the_openai_client(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from spyre_cb.models import tiny_model_path
    from test_server import Server

    server = Server(tmp_path, "--max-model-len", "256", "--max-num-seqs", "8")
    try:
        monkeypatch.setenv("SPYRE_CB_CACHE", str(tmp_path))
        llm = LLM(str(tiny_model_path()), max_num_seqs=8, max_model_len=256)
        client = server.client()
        # best_of: the beam width (vLLM's); n: the beams returned, best first
        r = client.completions.create(
            model="tiny", prompt="the batch", max_tokens=8, n=2, extra_body={"use_beam_search": True, "best_of": 3}
        )
        want = llm.beam_search("the batch", BeamSearchParams(beam_width=3, max_tokens=8))[0].sequences
        assert [c.text for c in r.choices] == [s.text for s in want[:2]]
        assert [c.index for c in r.choices] == [0, 1]
        assert r.usage.completion_tokens == sum(len(s.output_token_ids) for s in want[:2])
        msgs = [{"role": "user", "content": "Hello"}]
        r = client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=6, n=2, extra_body={"use_beam_search": True, "length_penalty": 0.5}
        )
        ids = llm.get_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        want = llm.beam_search([list(ids)], BeamSearchParams(beam_width=2, max_tokens=6, length_penalty=0.5))[0]
        assert [c.message.content for c in r.choices] == [s.text for s in want.sequences]
        # a refused prompt refuses the request before any search starts
        with pytest.raises(openai.BadRequestError, match="prompt of 256 tokens leaves no room"):
            client.completions.create(
                model="tiny", prompt=[[5, 6, 7], [3] * 256], extra_body={"use_beam_search": True, "max_tokens": None}
            )
        assert server.metric("spyre_cb_requests_waiting") + server.metric("spyre_cb_requests_running") == 0
        with pytest.raises(openai.BadRequestError, match="stream"):
            client.completions.create(
                model="tiny", prompt="x", max_tokens=2, stream=True, extra_body={"use_beam_search": True}
            )
    finally:
        server.stop()


def test_a_step_failing_after_its_commit_ends_a_beam_search_once(tiny_model, monkeypatch):
    """The failed step's requests end with its error, a beam search once (its id is
    listed once per beam in the plan)."""
    eng = Engine(str(tiny_model), max_num_seqs=4, max_model_len=256)
    eng.add_beam_search("b", list(range(2, 40)), BeamSearchParams(beam_width=3, max_tokens=30, ignore_eos=True))
    eng.add_request("p", [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0))
    for _ in range(4):
        eng.step()
    original = eng.processor.emit

    def broken(*a, **k):
        raise RuntimeError("emit broke")

    monkeypatch.setattr(eng.processor, "emit", broken)
    with pytest.raises(RuntimeError, match="emit broke"):
        eng.step()
    monkeypatch.setattr(eng.processor, "emit", original)
    finals: collections.Counter[str] = collections.Counter()
    while eng.has_unfinished_requests():
        for o in eng.step():
            finals[o.request_id] += o.finished
    assert finals == {"b": 1, "p": 1}
    assert eng.requests["b"].finish_reason == "abort" and "emit broke" in (eng.requests["b"].error or "")
    eng.step()
    assert eng.n_used_blocks == 0
