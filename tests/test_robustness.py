"""Robustness through the Python API: random aborts and early stops with a
real model, and fuzzed bad input. Nothing leaks, nothing crashes, and a valid
request afterwards still gets HF-identical tokens."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spyre_cb
from conftest import random_prompts
from spyre_cb import SamplingParams, SpyreCBError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def held_blocks_match_pool(eng) -> None:
    """Every used block belongs to a running request or one finishing this step."""
    snap = eng.snapshot()
    owners = snap.running + snap.finished_requests
    held = [b for rid in owners for b in (eng.scheduler.request_blocks(rid) or [])]
    assert len(held) == len(set(held)) == snap.n_used_blocks, (snap, held)
    eng.scheduler.check_invariants()


def test_random_aborts_and_early_stops_leak_nothing(tiny_model, hf_greedy):
    rng = random.Random(1234)
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=8, max_model_len=256, available_blocks=24)
    vocab = eng.vocab_size
    n_requests = 1000
    lengths = [rng.randint(1, 120) for _ in range(n_requests)]
    prompts = random_prompts(lengths, vocab, seed=99)
    plan = {}
    next_id = 0
    aborted, stopped = set(), set()
    abort_kinds = {"waiting": 0, "running-after-prefill": 0, "running-after-decode": 0}
    step = 0
    while next_id < n_requests or eng.has_unfinished_requests():
        # a few arrivals per step
        for _ in range(1 if rng.random() < 0.15 else 0):
            if next_id >= n_requests:
                break
            rid = str(next_id)
            mt = rng.randint(1, 256 - lengths[next_id])
            mt = min(mt, rng.choice([4, 8, 16, 64, 256]))
            stop_ids = rng.sample(range(vocab), 25) if rng.random() < 0.2 else None
            eng.add_request(rid, prompts[next_id], SamplingParams(max_tokens=mt, stop_token_ids=stop_ids, **GREEDY))
            plan[rid] = (prompts[next_id], mt, stop_ids)
            next_id += 1
        # random aborts of waiting and running requests
        snap = eng.snapshot()
        just_aborted = []
        candidates = list(snap.running) if snap.running and rng.random() < 0.7 else list(snap.waiting)
        if candidates and rng.random() < 0.06:
            rid = rng.choice(candidates)
            if True:
                kind = (
                    "waiting"
                    if rid in snap.waiting
                    else ("running-after-prefill" if eng.last_plan_kind == "prefill" else "running-after-decode")
                )
                used_before = eng.scheduler.n_used_blocks
                blocks = eng.scheduler.request_blocks(rid) or []
                eng.abort_request(rid)
                aborted.add(rid)
                abort_kinds[kind] += 1
                # blocks stay allocated until the start of the next step
                assert eng.scheduler.n_used_blocks == used_before
                # held until the start of the next step, then returned
                assert (eng.scheduler.request_blocks(rid) or []) == blocks
                just_aborted.append(rid)
        outs = eng.step()
        step += 1
        for rid in just_aborted:
            assert eng.scheduler.request_blocks(rid) is None
        for o in outs:
            if o.finished and o.finish_reason == "stop":
                stopped.add(o.request_id)
        held_blocks_match_pool(eng)
    eng.step()
    snap = eng.snapshot()
    assert (snap.tkv, snap.n_reserved_blocks, snap.n_used_blocks) == (0, 0, 0)
    assert len(aborted) >= 100 and len(stopped) >= 20 and all(v >= 5 for v in abort_kinds.values()), abort_kinds
    print(f"\n{step} steps, {len(aborted)} aborts {abort_kinds}, {len(stopped)} early stops")
    # finished requests: exactly max_tokens, or cut at their stop token
    finished = [r for r in plan if r not in aborted]
    for rid in finished:
        s = eng.get_request(rid)
        _, mt, stop_ids = plan[rid]
        if s.finish_reason == "stop":
            assert s.output_token_ids[-1] in stop_ids and len(s.output_token_ids) <= mt
        else:
            assert s.finish_reason == "length" and len(s.output_token_ids) == mt
    # a sample of the survivors: tokens identical to HF greedy alone
    for rid in rng.sample(finished, 25):
        p, mt, _ = plan[rid]
        out = eng.get_request(rid).output_token_ids
        assert out == hf_greedy(p, mt)[: len(out)], rid


# ----- fuzzed input -----------------------------------------------------------------

weird = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(min_value=-5, max_value=2**40), max_size=5),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
token_lists = st.one_of(
    weird,
    st.lists(st.integers(min_value=-3, max_value=600), min_size=0, max_size=300),
    st.lists(st.one_of(st.integers(0, 500), st.floats(), st.none()), max_size=4),
)


@pytest.fixture(scope="module")
def fuzz_engine(tiny_model):
    return spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=256)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    rid=st.one_of(st.text(max_size=4), weird),
    ids=token_lists,
    max_tokens=st.one_of(st.integers(-5, 400), weird),
    temperature=st.one_of(st.floats(allow_nan=True), st.integers(-2, 3), weird),
    top_p=st.one_of(st.floats(allow_nan=True), weird),
    top_k=st.one_of(st.integers(-3, 600), weird),
    stop=st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2), weird),
)
def test_fuzzed_requests_raise_typed_errors_or_work(fuzz_engine, rid, ids, max_tokens, temperature, top_p, top_k, stop):
    eng = fuzz_engine
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop)
    except SpyreCBError:
        params = SamplingParams(max_tokens=3, **GREEDY)
    before = eng.snapshot()
    try:
        eng.add_request(rid, ids, params)
    except SpyreCBError:
        assert eng.snapshot() == before
        return
    # accepted: it must run to completion
    while eng.has_unfinished_requests():
        eng.step()
        eng.scheduler.check_invariants()
    state = eng.release(rid)
    assert 1 <= len(state.output_token_ids) <= params.max_tokens


@settings(max_examples=300, deadline=None)
@given(
    args=st.tuples(weird, weird, st.one_of(st.none(), weird), st.one_of(st.none(), weird)),
)
def test_fuzzed_scheduler_config_and_simulate(args):
    for call in (
        lambda: spyre_cb.Scheduler(*args),
        lambda: spyre_cb.simulate([(0, 10, 5)], *args),
        lambda: spyre_cb.simulate(args[0], 2, 128),
        lambda: spyre_cb.simulate([args], 2, 128),
    ):
        try:
            call()
        except SpyreCBError:
            pass


def test_engine_still_exact_after_fuzzing(fuzz_engine, hf_greedy):
    eng = fuzz_engine
    p = random_prompts([77], eng.vocab_size, seed=5)[0]
    eng.add_request("after-fuzz", p, SamplingParams(max_tokens=12, **GREEDY))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.release("after-fuzz").output_token_ids == hf_greedy(p, 12)


def test_nan_and_inf_never_reach_the_sampler():
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(spyre_cb.InvalidRequestError, match="temperature"):
            SamplingParams(temperature=bad)


def test_a_failing_forward_aborts_that_step_and_the_engine_keeps_serving(tiny_model, hf_greedy):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=256)
    p = random_prompts([20, 30, 40], eng.vocab_size, seed=21)
    eng.add_request("a", p[0], SamplingParams(max_tokens=10, **GREEDY))
    eng.add_request("b", p[1], SamplingParams(max_tokens=10, **GREEDY))
    eng.step()  # prefill a
    real = eng.runner.execute

    def broken(plan):
        raise RuntimeError("simulated device failure")

    eng.runner.execute = broken
    with pytest.raises(RuntimeError, match="simulated device failure"):
        eng.step()  # the prefill of b fails
    eng.runner.execute = real
    assert eng.get_request("b").finish_reason == "abort"
    eng.add_request("c", p[2], SamplingParams(max_tokens=5, **GREEDY))
    while eng.has_unfinished_requests():
        eng.step()
        eng.scheduler.check_invariants()
    eng.step()
    snap = eng.snapshot()
    assert (snap.n_reserved_blocks, snap.n_used_blocks, snap.tkv) == (0, 0, 0)
    assert eng.get_request("a").output_token_ids == hf_greedy(p[0], 10)
    assert eng.get_request("c").output_token_ids == hf_greedy(p[2], 5)
