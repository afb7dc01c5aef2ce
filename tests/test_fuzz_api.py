"""A fuzzer over the whole public API: random sequences of calls with hostile
arguments on one long-lived Engine and LLM, the low-level Scheduler,
simulate/simulate_stats, SamplingParams and the CLI (in a subprocess).

Asserted after every example: only SpyreCBError subclasses escape (argparse's
exit status 2 for the CLI, never a traceback), no KV block leaks, and the
engine still serves a fresh greedy request with HF-identical tokens.
``SPYRE_CB_FUZZ_EXAMPLES`` sets the number of examples (CI: 200).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spyre_cb
from conftest import drain, random_prompts
from spyre_cb import SamplingParams, SpyreCBError

EXAMPLES = int(os.environ.get("SPYRE_CB_FUZZ_EXAMPLES", "200"))
GREEDY = dict(temperature=0.0, ignore_eos=True)

weird = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.integers(min_value=-3, max_value=2**33), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(-2, 5), max_size=2),
)
ids = st.one_of(st.sampled_from(["a", "b", "c", "llm-0"]), weird)
prompts = st.one_of(weird, st.lists(st.integers(-2, 600), min_size=0, max_size=140), st.text(max_size=30))
param_kw = st.dictionaries(
    st.sampled_from(
        [
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "logprobs",
            "n",
            "min_p",
            "min_tokens",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "prompt_logprobs",
        ]
    ),
    st.one_of(weird, st.integers(0, 40), st.floats(0, 2)),
    max_size=4,
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), ids, prompts, param_kw),
        st.tuples(st.just("abort"), ids),
        st.tuples(st.just("step")),
        st.tuples(st.just("release"), ids),
        st.tuples(st.just("get"), ids),
        st.tuples(st.just("generate"), st.one_of(prompts, st.lists(prompts, max_size=3), weird), param_kw),
        st.tuples(st.just("simulate"), st.one_of(weird, st.lists(st.tuples(weird, weird, weird), max_size=3)), weird),
        st.tuples(st.just("scheduler"), st.lists(weird, max_size=4), weird, weird),
        st.tuples(
            st.just("engine"),
            st.dictionaries(
                st.sampled_from(["max_num_seqs", "backend", "dtype", "seed", "available_blocks"]), weird, max_size=2
            ),
        ),
    ),
    max_size=8,
)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return spyre_cb.LLM(tiny_model, max_num_seqs=3, max_model_len=192)


def params_or_default(kw):
    try:
        return SamplingParams(**kw)
    except SpyreCBError:
        return SamplingParams(max_tokens=3, **GREEDY)


def run_op(op, eng, llm, tiny_model):
    kind = op[0]
    if kind == "add":
        eng.add_request(op[1], op[2], params_or_default(op[3]))
    elif kind == "abort":
        eng.abort_request(op[1])
    elif kind == "step":
        eng.step()
    elif kind == "release":
        eng.release(op[1])
    elif kind == "get":
        eng.get_request(op[1])
    elif kind == "generate":
        p = params_or_default(op[2])
        p.max_tokens = min(p.max_tokens or 8, 8)
        p.n = min(p.n, 2)
        llm.generate(op[1], p, use_tqdm=False)
    elif kind == "simulate":
        spyre_cb.simulate(op[1], 2, 128, steps=op[2] if isinstance(op[2], int) and 0 <= op[2] < 10_000 else None)
        spyre_cb.simulate_stats(op[1], max_num_seqs=2, max_model_len=128)
    elif kind == "scheduler":
        s = spyre_cb.Scheduler(2, 128)
        s.add_request(op[2] if isinstance(op[2], str) else "x", op[1], op[3])
        s.schedule()
        s.update(op[1][:1] if isinstance(op[1], list) else op[1])
    elif kind == "engine":
        kw = dict(max_num_seqs=2, max_model_len=128)
        kw.update(op[1])
        kw["available_blocks"] = (
            kw.get("available_blocks")
            if isinstance(kw.get("available_blocks"), int) and kw.get("available_blocks", 0) < 4096
            else None
        )
        spyre_cb.Engine(tiny_model, **kw)


def settle(eng) -> None:
    """Aborts what is left, steps until the pool is whole, checks it."""
    for rid, s in list(eng.requests.items()):
        if not s.finished:
            eng.abort_request(rid)
    drain(eng)
    for rid in list(eng.requests):
        eng.release(rid)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=ops)
def test_public_api_raises_only_typed_errors(llm, tiny_model, hf_greedy, ops):
    eng = llm.engine
    for op in ops:
        try:
            run_op(op, eng, llm, tiny_model)
        except SpyreCBError:
            pass
    settle(eng)
    p = random_prompts([21], eng.vocab_size, seed=31)[0]
    out = llm.generate([p], SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(p, 5)
    settle(eng)


cli_args = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "--seed",
                "--synthetic",
                "--max-num-seqs",
                "--max-model-len",
                "--available-blocks",
                "--prompt-median",
                "--mean-interarrival",
                "--json",
                "--plot",
                "--steps",
                "--summary",
                "-1",
                "nan",
                "inf",
                "0",
                "5",
                "64",
                "3",
                "x.txt",
                "/nonexistent/out.json",
                "out.png",
                "--table-max",
                "100000000000000000000",
            ]
        ),
        st.text(alphabet="abc-0123456789.", max_size=6),
    ),
    max_size=6,
)


@settings(max_examples=max(10, EXAMPLES // 8), deadline=None)
@given(args=cli_args)
def test_cli_never_shows_a_traceback(tmp_path_factory, args):
    cwd = tmp_path_factory.mktemp("cli")
    r = subprocess.run(
        [sys.executable, "-m", "spyre_cb", "simulate", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, 2), (r.returncode, r.stderr)
