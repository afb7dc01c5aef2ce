"""The 12 published scenarios through ``spyre_cb.simulate``, every step."""

from __future__ import annotations

import pickle

import pytest

import spyre_cb
from scenarios import IDS, KEYS, SCENARIOS


def test_there_are_twelve_scenarios():
    assert len(SCENARIOS) == 12


@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_scenario_matches_every_step(sc):
    trace = spyre_cb.simulate(sc.requests, **sc.limits)
    expected = sc.expected_steps()
    assert trace.rejected == {}
    assert [r.step for r in trace] == list(range(len(trace)))
    got = [r.to_dict() for r in trace]
    for g, e in zip(got, expected):
        assert g == e, f"step {e['step']}"
    assert len(got) == len(expected)
    # the run ends with the pool whole and tkv back to 0
    last = trace[-1]
    assert (last.tkv, last.n_reserved_blocks, last.n_used_blocks, last.running, last.waiting) == (0, 0, 0, [], [])


def test_record_keys_are_the_spec_keys():
    trace = spyre_cb.simulate([(0, 10, 2)], max_num_seqs=1, max_model_len=64)
    assert tuple(trace[0].to_dict()) == KEYS


def test_records_pickle_and_compare():
    trace = spyre_cb.simulate([(0, 49, 10), (0, 70, 4)], max_num_seqs=2, max_model_len=192)
    again = pickle.loads(pickle.dumps(list(trace)))
    assert again == list(trace)
    assert trace[1] != trace[2]


def test_steps_argument_limits_the_trace():
    trace = spyre_cb.simulate([(0, 49, 60)], max_num_seqs=2, max_model_len=192, steps=5)
    assert [r.step for r in trace] == [0, 1, 2, 3, 4, 5]
    assert trace[-1].tkv == 68 and trace[-1].running == ["0"]


def test_defaults_follow_the_design():
    c = spyre_cb.Scheduler(max_num_seqs=3, max_model_len=192).config
    assert c.available_blocks == 3 * 192 // 64
    assert c.max_batch_tkv_limit == 3 * 192
    assert c.n_physical_blocks == c.available_blocks + 1  # the null block
    assert c == spyre_cb.SchedulerConfig(3, 192, available_blocks=9, max_batch_tkv_limit=576)


def test_late_arrival_after_idle_steps():
    trace = spyre_cb.simulate([(3, 10, 2)], max_num_seqs=1, max_model_len=128)
    assert [r.tkv for r in trace] == [0, 0, 0, 0, 64, 65, 0]
    assert trace[3].waiting == ["0"]


def test_request_finishing_at_prefill():
    trace = spyre_cb.simulate([(0, 10, 1)], max_num_seqs=2, max_model_len=128)
    assert trace[1].to_dict() == dict(
        step=1,
        tkv=64,
        waiting=[],
        running=[],
        request_outputs=["0"],
        finished_requests=["0"],
        n_reserved_blocks=1,
        n_used_blocks=1,
    )
    assert trace[2].n_reserved_blocks == 0 and trace[2].tkv == 0 and len(trace) == 3


def test_new_batch_starts_unaligned_when_alignment_leaves_no_room():
    # 70 rounded up is 128, and 128 + 58 > 128: the batch starts at tkv 70,
    # the prefill right-padded to 128; no write ever reaches 128.
    trace = spyre_cb.simulate([(0, 70, 50)], max_num_seqs=1, max_model_len=192)
    assert trace[1].tkv == 128  # 128 + 50 <= 192: aligned
    trace = spyre_cb.simulate([(0, 10, 2)], max_num_seqs=1, max_model_len=64)
    assert [r.tkv for r in trace] == [0, 10, 11, 0]  # 64 + 2 > 64: unaligned
    s = spyre_cb.Scheduler(max_num_seqs=1, max_model_len=128)
    s.add_request("x", list(range(1, 71)), 58)
    plan = s.schedule()
    assert plan.tkv == 70 and plan.left_padding == 0 and plan.right_padding == 58
    s.update([1])
    positions = []
    while s.has_unfinished_requests():
        p = s.schedule()
        positions.append(p.tkv)
        s.update([1])
    assert max(positions) == 70 + 58 - 2 < 128


def test_admission_uses_state_after_this_steps_frees():
    # Request 1 fits only once request 0's blocks are back. It is admitted in
    # the very step that frees them, not one step later.
    trace = spyre_cb.simulate([(0, 10, 65), (0, 10, 65)], max_num_seqs=2, max_model_len=128, available_blocks=2)
    finished = next(r.step for r in trace if r.finished_requests == ["0"])
    assert trace[finished + 1].request_outputs == ["1"]
    assert trace[finished + 1].running == ["1"]
