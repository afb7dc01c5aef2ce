"""Backends: eager (default), inductor (torch.compile on CPU), sendnn (AIU only)."""

from __future__ import annotations

import importlib.util

import pytest

import spyre_cb
from engine_harness import run_engine
from spyre_cb import BackendUnavailableError, ConfigError


@pytest.mark.skipif(importlib.util.find_spec("torch_sendnn") is not None, reason="the AIU stack is installed")
def test_sendnn_without_its_stack_fails_fast_and_says_what_is_missing(tiny_model):
    with pytest.raises(BackendUnavailableError, match="torch_sendnn") as err:
        spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128, backend="sendnn")
    assert "AIU" in str(err.value)


def test_unknown_backend_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match="backend must be one of eager, inductor, sendnn, got 'cuda'"):
        spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128, backend="cuda")


@pytest.mark.slow
def test_inductor_matches_hf_on_a_multi_request_scenario(tiny_model, hf_greedy):
    # joins, a tkv shift (70 > 64) and a finish that reduces left padding
    reqs = [(0, 49, 10), (0, 70, 4), (2, 20, 6)]
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=192, backend="inductor")
    records, prompts, outputs = run_engine(eng, reqs, seed=11)
    assert records == list(spyre_cb.simulate(reqs, max_num_seqs=2, max_model_len=192))
    for i, (_, _pl, mt) in enumerate(reqs):
        assert outputs[str(i)] == hf_greedy(prompts[i], mt)
