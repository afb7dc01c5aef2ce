"""The user-facing API: LLM.generate, sampling, stops, aborts, errors."""

from __future__ import annotations

import json
import shutil

import pytest

import spyre_cb
from conftest import random_prompts
from spyre_cb import (
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    SamplingParams,
    SpyreCBError,
    UnknownRequestError,
)

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return spyre_cb.LLM(tiny_model, max_num_seqs=3, max_model_len=256)


def test_generate_returns_request_outputs_in_order(llm, hf_greedy):
    prompts = ["The river was", "Numbers help people", "def add(a, b):"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=7, **GREEDY), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "length" and len(c.token_ids) == 7
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert o.prompt_token_ids == llm.tokenizer(o.prompt, add_special_tokens=False).input_ids
        assert c.token_ids == hf_greedy(o.prompt_token_ids, 7)


def test_generate_accepts_token_ids_and_one_prompt(llm):
    ids = random_prompts([12], llm.engine.vocab_size, seed=1)[0]
    one = llm.generate(ids, SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(one) == 1 and one[0].prompt is None and one[0].prompt_token_ids == ids
    many = llm.generate([ids, ids], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert many[0].outputs[0].token_ids == many[1].outputs[0].token_ids == one[0].outputs[0].token_ids


def test_per_prompt_sampling_params(llm):
    outs = llm.generate(
        ["a", "b"], [SamplingParams(max_tokens=2, **GREEDY), SamplingParams(max_tokens=5, **GREEDY)], use_tqdm=False
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(InvalidRequestError, match="got 1 sampling_params for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2)], use_tqdm=False)


def test_seeded_sampling_is_reproducible_and_differs_by_seed(llm):
    p = "The river was higher than"
    a = llm.generate([p], SamplingParams(max_tokens=20, temperature=1.0, seed=5, ignore_eos=True), use_tqdm=False)
    b = llm.generate([p], SamplingParams(max_tokens=20, temperature=1.0, seed=5, ignore_eos=True), use_tqdm=False)
    c = llm.generate([p], SamplingParams(max_tokens=20, temperature=1.0, seed=6, ignore_eos=True), use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert a[0].outputs[0].token_ids != c[0].outputs[0].token_ids
    # the same seed gives the same tokens whatever else shares the batch
    mixed = llm.generate(
        ["other prompt", p, "third"],
        [
            SamplingParams(max_tokens=30, temperature=0.7, seed=1, ignore_eos=True),
            SamplingParams(max_tokens=20, temperature=1.0, seed=5, ignore_eos=True),
            SamplingParams(max_tokens=4, **GREEDY),
        ],
        use_tqdm=False,
    )
    assert mixed[1].outputs[0].token_ids == a[0].outputs[0].token_ids


def test_top_k_1_equals_greedy(llm):
    p = "Morning light came"
    g = llm.generate([p], SamplingParams(max_tokens=15, **GREEDY), use_tqdm=False)
    k = llm.generate(
        [p], SamplingParams(max_tokens=15, temperature=1.3, top_k=1, seed=9, ignore_eos=True), use_tqdm=False
    )
    assert g[0].outputs[0].token_ids == k[0].outputs[0].token_ids


def test_top_p_and_top_k_restrict_the_choice(llm):
    import torch

    from spyre_cb.engine import RequestState
    from spyre_cb.sampling import Sampler

    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]])
    s = Sampler()
    picks = set()
    for seed in range(40):
        p = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=seed)
        s.start("x", p, 0)
        picks.add(s.sample(logits, [RequestState("x", [1], p)]).tokens[0])
    assert picks == {0}  # token 0 alone holds > 50% of the mass
    picks = set()
    for seed in range(60):
        p = SamplingParams(max_tokens=1, temperature=5.0, top_k=2, seed=seed)
        s.start("x", p, 0)
        picks.add(s.sample(logits, [RequestState("x", [1], p)]).tokens[0])
    assert picks == {0, 1}


def test_logprobs(llm):
    out = llm.generate(["The river"], SamplingParams(max_tokens=4, logprobs=3, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) == 3  # greedy token is in the top 3
        assert max(x.logprob for x in lp.values()) == lp[tok].logprob <= 0.0 and lp[tok].rank == 1


def test_stop_strings_cut_the_text(llm):
    free = llm.generate(["The river"], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop = free.text[5:8]
    assert len(stop) == 3
    cut = llm.generate(["The river"], SamplingParams(max_tokens=30, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[
        0
    ]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[: free.text.index(stop)]
    assert len(cut.token_ids) < 30 and free.token_ids[: len(cut.token_ids)] == cut.token_ids
    kept = llm.generate(
        ["The river"],
        SamplingParams(max_tokens=30, stop=stop, include_stop_str_in_output=True, **GREEDY),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text.endswith(stop)


def test_many_long_stop_strings_stream_exactly(llm, tiny_model):
    """64 stop strings of up to 1024 characters (the caps): the text streamed with
    Engine.stream_text is at every step a prefix of the final text (a possible
    stop string's start is held back, then released), and the final text is cut
    where the first stop string to complete occurs (ties: the list's order), as
    without streaming."""
    from spyre_cb.detokenizer import IncrementalDetokenizer

    ids = llm.generate(["The river"], SamplingParams(max_tokens=40, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    detok = IncrementalDetokenizer(llm.get_tokenizer())
    for t in ids:
        detok.push(t)
    ref = detok.text  # the text the stop strings are matched in
    # a 5-character stop string, and a 3-character one ending at the same place, neither earlier
    i = next(
        i for i in range(10, len(ref) - 5) if ref.find(ref[i : i + 5]) == i and ref.find(ref[i + 2 : i + 5]) == i + 2
    )
    stops = ["q" * 1024, ref[i : i + 5], ref[3] + "\x00", *(f"never {k} " * 100 for k in range(60)), ref[i + 2 : i + 5]]
    assert len(stops) == 64 and max(map(len, stops)) == 1024 and stops[2] not in ref
    want = llm.generate(["The river"], SamplingParams(max_tokens=40, stop=stops, **GREEDY), use_tqdm=False)[0]
    assert want.outputs[0].stop_reason == stops[1] and want.outputs[0].text == ref[:i]
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2)
    eng.stream_text = True
    eng.add_request("s", prompt="The river", sampling_params=SamplingParams(max_tokens=40, stop=stops, **GREEDY))
    streamed, held_once = "", False
    while eng.has_unfinished_requests():
        for o in eng.step():
            streamed += o.text or ""
            assert ref[:i].startswith(streamed), (streamed, ref[:i])
            held_once |= not o.finished and len(streamed) < len(eng.requests["s"].text)
    assert streamed == ref[:i] and held_once
    with pytest.raises(spyre_cb.InvalidRequestError, match="empty"):
        spyre_cb._core.StopStringMatcher(["a", ""])


def test_stop_token_ids(llm):
    free = llm.generate(["Numbers"], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    t = free.token_ids[4]
    first = free.token_ids.index(t)
    out = llm.generate(["Numbers"], SamplingParams(max_tokens=12, stop_token_ids=[t], **GREEDY), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == t


def test_eos_stops_unless_ignore_eos(tiny_model, tmp_path):
    # Make the model's EOS one of the tokens greedy decoding produces.
    base = spyre_cb.LLM(tiny_model, max_num_seqs=2, max_model_len=128)
    ids = random_prompts([20], base.engine.vocab_size, seed=4)[0]
    free = base.generate([ids], SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    eos = free[3]
    d = tmp_path / "eos_model"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (d / "config.json").write_text(json.dumps(cfg))
    llm = spyre_cb.LLM(d, max_num_seqs=2, max_model_len=128)
    stopped = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free[: free.index(eos) + 1] and stopped.finish_reason == "stop"
    ignored = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert ignored[0].outputs[0].token_ids == free
    # the early stop returned its blocks at the next step
    llm.engine.step()
    snap = llm.engine.snapshot()
    assert (snap.n_reserved_blocks, snap.n_used_blocks, snap.tkv) == (0, 0, 0)


def test_early_stop_frees_blocks_for_waiting_requests(tiny_model):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=1, max_model_len=128)
    p = random_prompts([10, 10], eng.vocab_size, seed=2)
    eng.add_request("probe", p[0], SamplingParams(max_tokens=6, **GREEDY))
    while eng.has_unfinished_requests():
        eng.step()
    free = eng.release("probe").output_token_ids
    stop_at = free[2]
    eng.add_request("a", p[0], SamplingParams(max_tokens=50, stop_token_ids=[stop_at], **GREEDY))
    eng.add_request("b", p[1], SamplingParams(max_tokens=2, **GREEDY))
    kinds = []
    while eng.get_request("a").finish_reason is None:
        eng.step()
        kinds.append(eng.last_plan_kind)
    assert eng.get_request("a").output_token_ids == free[: free.index(stop_at) + 1]
    assert eng.snapshot().finished_requests == ["a"] and eng.snapshot().waiting == ["b"]
    out = eng.step()  # a's blocks come back and b is prefilled in the same step
    assert [o.request_id for o in out] == ["b"] and eng.last_plan_kind == "prefill"


def test_abort_frees_blocks_for_waiting_requests(tiny_model):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=1, max_model_len=128)
    vocab = eng.vocab_size
    p = random_prompts([10, 10], vocab, seed=2)
    eng.add_request("a", p[0], SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    first = eng.get_request("a").output_token_ids[0]
    eng.abort_request("a")
    eng.add_request("b", p[1], SamplingParams(max_tokens=2, stop_token_ids=[], **GREEDY))
    snap = eng.snapshot()
    assert snap.running == [] and snap.waiting == ["b"]
    out = eng.step()  # frees a's blocks, prefills b at once
    # the abort shows in the output stream (a final output, no tokens), then b's prefill
    assert [(o.request_id, o.finished, o.finish_reason, o.new_token_ids) for o in out][0] == ("a", True, "abort", [])
    assert [o.request_id for o in out] == ["a", "b"]
    assert eng.get_request("a").finish_reason == "abort" and first >= 0


def test_abort_waiting_and_running(tiny_model, hf_greedy):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128)
    p = random_prompts([30, 40, 50], eng.vocab_size, seed=8)
    for i, ids in enumerate(p):
        eng.add_request(str(i), ids, SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(3):  # prefill 0, prefill 1, decode
        eng.step()
    eng.abort_request("2")  # waiting
    eng.abort_request("0")  # running
    with pytest.raises(UnknownRequestError, match="'0'"):
        eng.abort_request("0")
    with pytest.raises(UnknownRequestError):
        eng.abort_request("nope")
    while eng.has_unfinished_requests():
        eng.step()
    eng.step()
    snap = eng.snapshot()
    assert (snap.n_reserved_blocks, snap.n_used_blocks, snap.tkv) == (0, 0, 0)
    assert eng.get_request("1").output_token_ids == hf_greedy(p[1], 20)
    assert eng.get_request("0").finish_reason == "abort" and eng.get_request("2").finish_reason == "abort"


def test_streaming_steps(tiny_model):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128)
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
    eng.add_request("b", [8, 9], SamplingParams(max_tokens=2, **GREEDY))
    seen = {"a": [], "b": []}
    finished = []
    for outs in eng.steps():
        for o in outs:
            seen[o.request_id] += o.new_token_ids
            if o.finished:
                finished.append((o.request_id, o.finish_reason))
    assert len(seen["a"]) == 3 and len(seen["b"]) == 2
    assert sorted(finished) == [("a", "length"), ("b", "length")]


# ----- errors: every message names the value and the limit --------------------


@pytest.mark.parametrize(
    "call, exc, needle",
    [
        (
            lambda e: e.add_request("x", list(range(200)), SamplingParams(max_tokens=100)),
            InvalidRequestError,
            "prompt of 200 tokens plus max_tokens 100 = 300 exceeds max_model_len 256",
        ),
        (
            lambda e: e.add_request("x", [1, 2], SamplingParams(max_tokens=300)),
            InvalidRequestError,
            "exceeds max_model_len 256",
        ),
        (lambda e: e.add_request("x", [], SamplingParams(max_tokens=3)), InvalidRequestError, "prompt is empty"),
        (
            lambda e: e.add_request("x", prompt="", sampling_params=SamplingParams(max_tokens=3)),
            InvalidRequestError,
            "prompt is empty",
        ),
        (
            lambda e: e.add_request("x", [1, 99999], SamplingParams(max_tokens=3)),
            InvalidRequestError,
            "prompt_token_ids[1] = 99999 is outside the model's vocabulary",
        ),
        (
            lambda e: e.add_request("x", [1, -1], SamplingParams(max_tokens=3)),
            InvalidRequestError,
            "outside the model's vocabulary",
        ),
        (
            lambda e: e.add_request("x", [1, 2.5], SamplingParams(max_tokens=3)),
            InvalidRequestError,
            "must be an int, got float",
        ),
        (lambda e: SamplingParams(max_tokens=0), InvalidRequestError, "max_tokens must be at least 1, got 0"),
        (
            lambda e: SamplingParams(temperature=float("nan")),
            InvalidRequestError,
            "temperature must be a finite number >= 0, got nan",
        ),
        (lambda e: SamplingParams(top_p=0), InvalidRequestError, "top_p must be in (0, 1], got 0"),
        (lambda e: SamplingParams(top_k=-2), InvalidRequestError, "top_k must be an int >= 0"),
        (lambda e: e.add_request("x", [1], "greedy"), InvalidRequestError, "sampling_params must be a SamplingParams"),
        (
            lambda e: e.add_request(7, [1], SamplingParams(max_tokens=1)),
            InvalidRequestError,
            "request_id must be a str, got int",
        ),
    ],
)
def test_invalid_requests_name_the_limit_and_the_engine_keeps_serving(tiny_model, hf_greedy, call, exc, needle):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=256)
    ok = random_prompts([25], eng.vocab_size, seed=12)[0]
    eng.add_request("ok", ok, SamplingParams(max_tokens=6, **GREEDY))
    eng.step()
    before = eng.snapshot()
    with pytest.raises(exc) as err:
        call(eng)
    assert needle in str(err.value)
    assert isinstance(err.value, SpyreCBError) and isinstance(err.value, ValueError)
    assert eng.snapshot() == before
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.get_request("ok").output_token_ids == hf_greedy(ok, 6)


def test_duplicate_id(tiny_model):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128)
    eng.add_request("a", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="request id 'a' is already in use"):
        eng.add_request("a", [3], SamplingParams(max_tokens=2))


def test_volume_limit_rejection(tiny_model):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=256, max_batch_tkv_limit=150)
    with pytest.raises(InvalidRequestError, match="batch x tkv = 163 .* above max_batch_tkv_limit 150"):
        eng.add_request("a", [1] * 70, SamplingParams(max_tokens=36))


@pytest.mark.parametrize(
    "kw, exc, needle",
    [
        (
            dict(max_model_len=100),
            ConfigError,
            "max_model_len must be a positive multiple of the block size 64, got 100",
        ),
        (dict(max_num_seqs=0), ConfigError, "max_num_seqs must be at least 1, got 0"),
        (
            dict(available_blocks=1, max_model_len=256),
            ConfigError,
            "available_blocks 1 is fewer than one sequence of max_model_len 256 needs (4 blocks",
        ),
        (dict(backend="tpu"), ConfigError, "backend must be one of eager, inductor, sendnn, got 'tpu'"),
        (dict(backend="sendnn"), BackendUnavailableError, "torch_sendnn"),
        (dict(dtype="int8"), ConfigError, "dtype must be one of float32, bfloat16, float16, got 'int8'"),
    ],
)
def test_bad_engine_config(tiny_model, kw, exc, needle):
    args = dict(max_num_seqs=2, max_model_len=128)
    args.update(kw)
    with pytest.raises(exc) as err:
        spyre_cb.Engine(tiny_model, **args)
    assert needle in str(err.value)


def test_missing_or_malformed_model_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        spyre_cb.Engine(tmp_path / "nowhere", max_num_seqs=1, max_model_len=64)
    with pytest.raises(ConfigError, match="has no config.json"):
        spyre_cb.Engine(tmp_path, max_num_seqs=1, max_model_len=64)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no weights"):
        spyre_cb.Engine(tmp_path, max_num_seqs=1, max_model_len=64)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="names no architecture"):
        spyre_cb.Engine(tmp_path, max_num_seqs=1, max_model_len=64)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(ConfigError, match="could not load model"):
        spyre_cb.Engine(tmp_path, max_num_seqs=1, max_model_len=64)


def test_llm_tiny_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPYRE_CB_CACHE", str(tmp_path))
    from spyre_cb.models import tiny_model_path

    p = tiny_model_path()
    stamp = (p / "model.safetensors").stat().st_mtime_ns
    llm = spyre_cb.LLM("tiny", max_num_seqs=1, max_model_len=128)
    assert llm.engine.model_path == p and (p / "model.safetensors").stat().st_mtime_ns == stamp
    out = llm.generate("Good software is", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_numpy_token_ids_are_range_checked_too(tiny_model):
    import numpy as np

    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128)
    eng.add_request("ok", np.array([1, 2, 3]), SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match=r"prompt_token_ids\[1\] = 99999 is outside the model's vocabulary"):
        eng.add_request("bad", np.array([1, 99999]), SamplingParams(max_tokens=1))
