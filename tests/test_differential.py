"""Differential test: the Rust core against the Python specification model
(tests/spec_model.py) on random scenarios, every step of the trace.

CI runs a bounded number of examples; the long run is
``SPYRE_CB_DIFF_EXAMPLES=20000 pytest tests/test_differential.py``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import spec_model
import spyre_cb
from scenarios import SCENARIOS

EXAMPLES = int(os.environ.get("SPYRE_CB_DIFF_EXAMPLES", "300"))


@st.composite
def scenario(draw):
    seqs = draw(st.integers(1, 8))
    mml_blocks = draw(st.integers(1, 16))
    mml = 64 * mml_blocks
    blocks = draw(st.one_of(st.none(), st.integers(mml_blocks, mml_blocks * seqs * 2)))
    limit = draw(st.one_of(st.none(), st.integers(max(1, mml // 2), mml * seqs * 2)))
    n = draw(st.integers(0, 25))
    reqs = []
    for _ in range(n):
        arrival = draw(st.integers(0, 60))
        pl = draw(st.integers(0, mml))
        mt = draw(st.one_of(st.integers(1, max(1, mml - pl)), st.integers(0, mml + 5)))
        reqs.append((arrival, pl, mt))
    return reqs, dict(max_num_seqs=seqs, max_model_len=mml, available_blocks=blocks, max_batch_tkv_limit=limit)


def compare(reqs, limits):
    want, rejected = spec_model.simulate(reqs, **limits)
    got = spyre_cb.simulate(reqs, **limits)
    assert sorted(got.rejected) == sorted(rejected)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.to_dict() == w, f"step {w['step']}"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
# regression and corner cases (kept whatever hypothesis draws)
@example(
    (
        [(0, 10, 200), (10, 100, 5)],
        dict(max_num_seqs=2, max_model_len=256, available_blocks=None, max_batch_tkv_limit=None),
    )
)
@example(
    ([(0, 64, 1), (0, 1, 64)], dict(max_num_seqs=1, max_model_len=64, available_blocks=None, max_batch_tkv_limit=None))
)
@example(([(0, 1, 1)] * 5, dict(max_num_seqs=3, max_model_len=64, available_blocks=1, max_batch_tkv_limit=1)))
@example(
    (
        [(0, 30, 30), (0, 63, 1), (1, 64, 64)],
        dict(max_num_seqs=4, max_model_len=128, available_blocks=2, max_batch_tkv_limit=130),
    )
)
def test_rust_core_equals_spec_model(case):
    reqs, limits = case
    compare(reqs, limits)


def test_spec_model_reproduces_the_published_scenarios():
    for sc in SCENARIOS:
        trace, rejected = spec_model.simulate(sc.requests, **sc.limits)
        assert rejected == [] and trace == sc.expected_steps(), sc.name
