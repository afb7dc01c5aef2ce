"""The 12 published scenarios with a real FMS model: every step record equals
the spec, and every request's tokens equal transformers' greedy output."""

from __future__ import annotations

import zlib

import pytest

import spyre_cb
from engine_harness import run_engine
from scenarios import IDS, SCENARIOS


def make_engine(model, sc=None, **kw):
    limits = dict(sc.limits) if sc is not None else {}
    limits.update(kw)
    return spyre_cb.Engine(model, **limits)


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_scenario_with_real_model(sc, tiny_model, hf_greedy):
    eng = make_engine(tiny_model, sc)
    records, prompts, outputs = run_engine(eng, sc.requests, seed=zlib.crc32(sc.name.encode()))
    expected = sc.expected_steps()
    assert [r.to_dict() for r in records] == expected
    for i, (_, _pl, mt) in enumerate(sc.requests):
        assert len(outputs[str(i)]) == mt
        assert outputs[str(i)] == hf_greedy(prompts[i], mt), f"request {i}"


@pytest.mark.parametrize(
    "max_model_len, max_num_seqs, requests",
    [
        # multi-block prompts, joins mid-block, a tkv shift, a finish that lets
        # the batch shrink its left padding
        (512, 3, [(0, 130, 40), (5, 200, 30), (12, 20, 60), (40, 300, 20)]),
        # long context: several joins, shifts by more than one block
        (2048, 4, [(0, 100, 50), (3, 700, 30), (8, 1500, 20), (9, 64, 80), (60, 1000, 8)]),
    ],
    ids=["mml512", "mml2048"],
)
def test_long_prompts_match_hf(max_model_len, max_num_seqs, requests, tiny_model, hf_greedy):
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    records, prompts, outputs = run_engine(eng, requests, seed=max_model_len)
    sim = spyre_cb.simulate(requests, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    assert records == list(sim)
    # the workload really exercised shifts and multi-block prefills
    tkvs = [r.tkv for r in records]
    assert any(b - a >= 64 for a, b in zip(tkvs, tkvs[1:])), "expected a tkv shift"
    for i, (_, _pl, mt) in enumerate(requests):
        assert outputs[str(i)] == hf_greedy(prompts[i], mt), f"request {i}"
