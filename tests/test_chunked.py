"""The chunked-prefill policy: the 15 published scheduler scenarios through
``simulate(policy="chunked")`` (every listed and unlisted step), the same
scenarios through the real-model Engine (records equal the simulation's,
tokens equal transformers' greedy output), and the 4 published runner facts."""

from __future__ import annotations

import pytest

import spyre_cb
from chunked_scenarios import RUNNER, SCHEDULER, SCHEDULER_IDS, compare
from spyre_cb import SamplingParams

BY_NAME = {s.name: s for s in SCHEDULER + RUNNER}


@pytest.mark.parametrize("sc", SCHEDULER, ids=SCHEDULER_IDS)
def test_published_scenario_step_by_step(sc):
    trace = spyre_cb.simulate(sc.sim_requests(), **sc.options)
    assert isinstance(trace, spyre_cb.ChunkedTrace)
    assert trace.rejected == {}
    expected = sc.expected_steps()
    assert len(trace) > expected[-1]["step"]
    for exp in expected:
        diff = compare(trace[exp["step"]], exp)
        assert not diff, f"step {exp['step']}: {diff}"
    assert trace[-1].tkv == 0 and trace[-1].n_used_blocks == 0
    for name, value in sc.counters.items():
        assert trace.counters[name] == value, name


def test_trace_shape_and_counters():
    sc = BY_NAME["max_batch_tkv_decode_pausing"]
    trace = spyre_cb.simulate(sc.sim_requests(), **sc.options)
    d = trace[10].to_dict()
    assert set(d) == {
        "step",
        "tkv",
        "waiting",
        "running",
        "request_outputs",
        "finished_requests",
        "n_reserved_blocks",
        "n_used_blocks",
        "n_cached_blocks",
        "n_prefix_hits",
        "block_tables",
        "block_ref_count",
    }
    assert trace[10].paused == ["0"] and trace[11].paused == ["1"]
    assert trace.counters["pause_events"] == 1 and trace.counters["resume_events"] == 1
    assert trace.max_decode_volume <= sc.config["max_batch_tkv_limit"]
    lat = trace.latency
    assert lat["max_pause_steps"] == 1 and lat["ttft_steps"]["n"] == 3


def test_misaligned_slot_mapping_follows_the_block_table():
    # the published file lists [0, 4] at step 4, where it lists no block table
    # (its harness compares slot mappings only next to block tables); block 4
    # belongs to request 0 then, and step 5's table says the chunk wrote block 7
    sc = BY_NAME["multi_chunk_partial_match_misaligned"]
    trace = spyre_cb.simulate(sc.sim_requests(), **sc.options)
    assert trace[4].prefill_slot_mappings == {"1": [0, 7]}
    assert trace[5].block_tables["1"] == [1, 2, 3, 7, 8, 9]


def test_tuple_requests_and_continuous_default_unchanged():
    reqs = [(0, 300, 20), (2, 40, 30), (3, 700, 10)]
    cb = spyre_cb.simulate(reqs, max_num_seqs=2, max_model_len=1024)
    assert isinstance(cb, spyre_cb.Trace)
    ch = spyre_cb.simulate(reqs, max_num_seqs=2, max_model_len=1024, policy="chunked", chunk_size=128)
    # a 700-token prompt takes 6 chunks; the short one keeps decoding in between
    kinds = [len(r.request_outputs) for r in ch]
    assert len(ch) > len(cb) - 10 and sum(kinds) == 60
    assert spyre_cb.simulate_stats(reqs, max_num_seqs=2, max_model_len=1024, policy="chunked").policy == "chunked"


def test_option_errors_name_the_limit():
    with pytest.raises(spyre_cb.ConfigError, match="chunk_size must be a positive multiple"):
        spyre_cb.SchedulerConfig(2, 256, policy="chunked", chunk_size=100)
    with pytest.raises(spyre_cb.ConfigError, match="policy must be one of"):
        spyre_cb.SchedulerConfig(2, 256, policy="paged")
    with pytest.raises(spyre_cb.ConfigError, match="options of policy='chunked'"):
        spyre_cb.SchedulerConfig(2, 256, prefix_caching=True)
    # max_model_len need not be a multiple of 64 under the chunked policy
    cfg = spyre_cb.SchedulerConfig(2, 514, policy="chunked")
    assert cfg.available_blocks == 2 * 9 and cfg.policy == "chunked"
    import pickle

    assert pickle.loads(pickle.dumps(cfg)) == cfg


# ----- the real model ---------------------------------------------------------


def _engine_requests(sc, vocab_size, hf_greedy):
    """The scenario's prompts mapped into the tiny model's vocabulary; where a
    prompt continues an earlier request's output (a cache hit on a block filled
    during decode), the continuation is that request's real greedy output."""
    outs: dict[str, list[int]] = {}
    reqs = []
    for r in sorted(sc.requests, key=lambda r: r["arrival_step"]):
        prompt = [t % vocab_size for t in r["prompt_token_ids"]]
        for prev in reqs:
            seq = prev["data_seq"]
            k = 0
            while k < min(len(seq), len(r["prompt_token_ids"])) and seq[k] == r["prompt_token_ids"][k]:
                k += 1
            p = len(prev["prompt_token_ids"])
            if k > p:  # reaches into the earlier request's generated tokens
                prompt[p:k] = outs[prev["id"]][: k - p]
        outs[r["id"]] = hf_greedy(prompt, r["max_tokens"])
        reqs.append(
            {
                "id": r["id"],
                "arrival_step": r["arrival_step"],
                "prompt_token_ids": prompt,
                "max_tokens": r["max_tokens"],
                "output_token_ids": outs[r["id"]],
                "data_seq": r["prompt_token_ids"] + r["output_token_ids"],
            }
        )
    for r in reqs:
        del r["data_seq"]
    return reqs, outs


def _run(eng, reqs):
    records = []
    step = 0
    pending = sorted(reqs, key=lambda r: r["arrival_step"])
    while True:
        if step > 0:
            eng.step()
        while pending and pending[0]["arrival_step"] <= step:
            r = pending.pop(0)
            params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True)
            eng.add_request(r["id"], r["prompt_token_ids"], params)
        snap = eng.snapshot()
        records.append(snap)
        if not pending and not eng.has_unfinished_requests() and snap.tkv == 0:
            return records
        step += 1
        assert step < 10_000


@pytest.mark.parametrize("sc", SCHEDULER, ids=SCHEDULER_IDS)
def test_published_scenario_with_real_model(sc, tiny_model, hf_greedy):
    eng = spyre_cb.Engine(tiny_model, **sc.options)
    reqs, outs = _engine_requests(sc, eng.vocab_size, hf_greedy)
    records = _run(eng, reqs)
    # the engine's records are the simulation's with the tokens it produced
    sim = spyre_cb.simulate(reqs, **sc.options)
    assert records == list(sim)
    # ... and the published expectations
    for exp in sc.expected_steps():
        diff = compare(records[exp["step"]], exp)
        assert not diff, f"step {exp['step']}: {diff}"
    for r in reqs:
        assert eng.get_request(r["id"]).output_token_ids == outs[r["id"]], f"request {r['id']}"


def test_prefix_hits_change_no_token(tiny_model, hf_greedy):
    """The same prompts with and without prefix caching: hits happen and every
    token stays transformers' greedy token."""
    import random

    rng = random.Random(7)
    stem = [rng.randrange(512) for _ in range(300)]
    prompts = [stem[:n] + [rng.randrange(512) for _ in range(t)] for n, t in [(300, 20), (256, 70), (200, 1), (300, 5)]]
    got = {}
    for caching in (False, True):
        eng = spyre_cb.Engine(
            tiny_model, max_num_seqs=3, max_model_len=512, policy="chunked", chunk_size=64, prefix_caching=caching
        )
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        hits = 0
        while eng.has_unfinished_requests():
            eng.step()
            hits = max(hits, eng.snapshot().n_cached_blocks)
        got[caching] = ([eng.get_request(str(i)).output_token_ids for i in range(len(prompts))], hits)
    assert got[True][1] > 0 and got[False][1] == 0
    assert got[True][0] == got[False][0] == [hf_greedy(p, 12) for p in prompts]


# ----- the 4 published runner facts --------------------------------------------


@pytest.mark.parametrize(
    "name", ["single_block_chunked_prefill", "multi_chunk_padded_prefill", "multi_chunk_unpadded_prefill"]
)
def test_runner_fact_prefill_chunks(name, tiny_model, hf_greedy):
    sc = BY_NAME[name]
    (req,) = sc.requests
    prompt_len = sc.runner_steps[0]["new_reqs"][0]["prompt_len"]
    eng = spyre_cb.Engine(tiny_model, **sc.options)
    prompt = [(7 * i + 3) % eng.vocab_size for i in range(prompt_len)]
    assert eng.scheduler.policy == "chunked"
    eng.add_request(req["id"], prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    steps = []
    while eng.has_unfinished_requests():
        before = eng.get_request(req["id"]).output_token_ids[:]
        eng.step()
        snap = eng.snapshot()
        steps.append((len(eng.get_request(req["id"]).output_token_ids) - len(before), snap.tkv))
    for call, (sampled, tkv) in zip(sc.runner_steps, steps):
        asserts = call["asserts"]
        if "len(sampled_token_ids)" in asserts:  # a non-final chunk samples nothing
            assert sampled == asserts["len(sampled_token_ids)"] == 0
        else:
            assert sampled == asserts["len(sampled_token_ids[0])"]
            assert tkv == asserts["tkv"]
    assert eng.get_request(req["id"]).output_token_ids == hf_greedy(prompt, 2)


def test_runner_fact_decode_padding_to_same_block(tiny_model, hf_greedy):
    sc = BY_NAME["decode_padding_to_same_block"]
    opts = dict(sc.options, interleave=False)  # the published schedule prefills both first
    eng = spyre_cb.Engine(tiny_model, **opts)
    lens = {c["new_reqs"][0]["req_id"]: c["new_reqs"][0]["prompt_len"] for c in sc.runner_steps if c["new_reqs"]}
    prompts = {rid: [(5 * i + len(rid)) % eng.vocab_size for i in range(n)] for rid, n in lens.items()}
    for rid in ("short", "long"):
        eng.add_request(rid, prompts[rid], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    tkvs = []
    for _ in range(5):
        eng.step()
        tkvs.append(eng.snapshot().tkv)
    want = [c["asserts"]["tkv"] for c in sc.runner_steps if "tkv" in c["asserts"]]
    assert tkvs[2:] == want == [64, 128, 66]
    while eng.has_unfinished_requests():
        eng.step()
    for rid in ("short", "long"):
        assert eng.get_request(rid).output_token_ids == hf_greedy(prompts[rid], 4)


# ----- failures ------------------------------------------------------------------


def _chunked_engine(tiny_model, **kw):
    opts = dict(max_num_seqs=3, max_model_len=512, policy="chunked", chunk_size=64, prefix_caching=True)
    opts.update(kw)
    return spyre_cb.Engine(tiny_model, **opts)


def test_a_failing_chunk_aborts_its_request_only(tiny_model, hf_greedy, monkeypatch):
    from conftest import drain, random_prompts

    eng = _chunked_engine(tiny_model)
    p = random_prompts([20, 300, 30], eng.vocab_size, seed=5)
    for i in range(3):
        eng.add_request(str(i), p[i], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    eng.step()  # prefill 0 (one chunk)
    eng.step()  # decode 0 (interleaving)
    eng.step()  # chunk 1 of 5 of request 1
    eng.step()  # decode 0
    assert eng.snapshot().running == ["0", "1"] and eng.snapshot().n_used_blocks == 2
    real = eng.runner.execute
    monkeypatch.setattr(eng.runner, "execute", lambda plan, **kw: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()  # chunk 2 of request 1 fails: request 1 alone is aborted
    monkeypatch.setattr(eng.runner, "execute", real)
    r1 = eng.get_request("1")
    assert r1.finish_reason == "abort" and "device lost" in r1.error
    assert eng.snapshot().n_used_blocks == 1  # its blocks are back
    drain(eng)
    for i in (0, 2):
        assert eng.get_request(str(i)).output_token_ids == hf_greedy(p[i], 10)


def test_abort_of_an_ongoing_prefill_returns_its_blocks(tiny_model, hf_greedy):
    from conftest import drain, random_prompts

    eng = _chunked_engine(tiny_model, max_num_seqs=2)
    p = random_prompts([400, 40], eng.vocab_size, seed=6)
    for i in range(2):
        eng.add_request(str(i), p[i], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    eng.step()
    eng.step()  # two chunks of request 0 (nothing decodes: no interleaving needed)
    held = eng.snapshot().n_used_blocks
    assert held == 2
    eng.abort_request("0")
    outs = eng.step()
    assert any(o.request_id == "0" and o.finish_reason == "abort" for o in outs)
    drain(eng)
    assert eng.get_request("1").output_token_ids == hf_greedy(p[1], 6)


def test_tensor_parallel_runs_chunks(tiny_model, hf_greedy):
    """A chunk travels to the other rank like any plan; tokens stay HF's."""
    from conftest import random_prompts

    eng = spyre_cb.Engine(
        tiny_model, max_num_seqs=2, max_model_len=512, policy="chunked", chunk_size=64, tensor_parallel_size=2
    )
    try:
        p = random_prompts([150, 20], eng.vocab_size, seed=8)
        for i in range(2):
            eng.add_request(str(i), p[i], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        while eng.has_unfinished_requests():
            eng.step()
        for i in range(2):
            assert eng.get_request(str(i)).output_token_ids == hf_greedy(p[i], 5)
    finally:
        eng.shutdown()


def test_llm_takes_the_policy_options(tiny_model):
    prompts = ["hello there " * 40, "a short one", "hello there " * 30 + "and more"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    base = [
        o.outputs[0].token_ids
        for o in spyre_cb.LLM(tiny_model, max_model_len=512).generate(prompts, params, use_tqdm=False)
    ]
    llm = spyre_cb.LLM(tiny_model, max_model_len=500, policy="chunked", chunk_size=64, prefix_caching=True)
    assert llm.engine.config.scheduler.policy == "chunked"
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == base


# ----- random workloads through the real model ------------------------------------


def test_random_workloads_engine_equals_simulation_and_hf(tiny_model, hf_greedy):
    """Random prompts sharing stems, random arrivals and options: the Engine's
    record equals the simulation's at every step (fed the tokens the model
    produced), every token is transformers' greedy one, and the pool comes back
    whole; across the seeds, decodes were paused and prefix blocks were reused."""
    import random

    seen = {"pause_events": 0, "prefix_cached_blocks": 0}
    for seed in range(6):
        rng = random.Random(seed)
        mml = rng.choice([300, 448, 512])
        opts = dict(
            max_num_seqs=rng.randint(2, 4),
            max_model_len=mml,
            max_batch_tkv_limit=rng.choice([None, mml + 20, mml + 200]),
            policy="chunked",
            chunk_size=rng.choice([64, 128]),
            interleave=rng.random() < 0.7,
            decode_pausing=True,
            prefix_caching=seed % 3 != 2,
        )
        stems = [[rng.randrange(512) for _ in range(256)] for _ in range(2)]
        reqs = []
        for i in range(rng.randint(4, 7)):
            stem = stems[rng.randrange(2)][: rng.choice([0, 130, 200, 256])]
            prompt = stem + [rng.randrange(512) for _ in range(rng.randint(1, 40))]
            mt = rng.randint(1, min(40, mml - len(prompt)))
            reqs.append(
                {"id": f"r{i}", "arrival_step": rng.randint(0, 8), "prompt_token_ids": prompt, "max_tokens": mt}
            )
        eng = spyre_cb.Engine(tiny_model, **opts)
        records = _run(eng, reqs)
        for r in reqs:
            r["output_token_ids"] = eng.get_request(r["id"]).output_token_ids
            assert r["output_token_ids"] == hf_greedy(r["prompt_token_ids"], r["max_tokens"]), (seed, r["id"])
        sim = spyre_cb.simulate(reqs, **opts)
        assert records == list(sim), seed
        assert records[-1].n_used_blocks == 0 and records[-1].tkv == 0
        eng.scheduler.check_invariants()
        for k in seen:
            seen[k] += sim.counters[k]
    assert seen["pause_events"] > 0 and seen["prefix_cached_blocks"] > 0, seen


def test_prompt_logprobs_across_chunks_equal_the_whole_prefill(tiny_model):
    from conftest import random_prompts

    (p,) = random_prompts([150], 512, seed=21)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    got = {}
    for opts in ({}, {"policy": "chunked", "chunk_size": 64}):
        eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=256, **opts)
        eng.add_request("x", p, params)
        while eng.has_unfinished_requests():
            eng.step()
        got[bool(opts)] = eng.get_request("x").prompt_logprobs
    cont, chunked = got[False], got[True]
    assert len(chunked) == len(cont) == len(p) and chunked[0] is None
    for a, b in zip(cont[1:], chunked[1:]):
        assert a.keys() == b.keys()
        for t in a:
            assert abs(a[t].logprob - b[t].logprob) < 1e-4
