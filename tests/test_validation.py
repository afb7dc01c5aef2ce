"""Bad input at add_request: typed errors naming the limit, state untouched."""

from __future__ import annotations

import pytest

import spyre_cb
from spyre_cb import ConfigError, InvalidRequestError, SchedulerStateError, UnknownRequestError


def sched(**kw):
    kw.setdefault("max_num_seqs", 2)
    kw.setdefault("max_model_len", 192)
    return spyre_cb.Scheduler(**kw)


@pytest.mark.parametrize(
    "prompt, max_tokens, kw, needle",
    [
        ([], 5, {}, "prompt is empty"),
        ([1, 2], 0, {}, "max_tokens must be at least 1"),
        ([1] * 150, 43, {}, "exceeds max_model_len 192"),
        ([1] * 100, 100, dict(max_model_len=256, max_batch_tkv_limit=200), "max_batch_tkv_limit 200"),
        ([1, 2], -1, {}, "max_tokens must not be negative"),
        ([1, 2], 2**40, {}, "max_tokens"),
        ([1, 2], "3", {}, "max_tokens must be an int"),
        ("hello", 3, {}, "prompt_token_ids must be a sequence of ints"),
        ([1, None], 3, {}, "prompt_token_ids[1] must be an int"),
    ],
)
def test_invalid_requests_raise_and_leave_state_untouched(prompt, max_tokens, kw, needle):
    s = sched(**kw)
    s.add_request("ok", [1, 2, 3], 2)
    before = s.snapshot()
    with pytest.raises(InvalidRequestError) as err:
        s.add_request("bad", prompt, max_tokens)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)
    assert s.snapshot() == before
    assert not s.contains("bad")


def test_too_long_message_names_values_and_limit():
    s = sched()
    with pytest.raises(
        InvalidRequestError, match=r"prompt of 150 tokens plus max_tokens 43 = 193 exceeds max_model_len 192"
    ):
        s.add_request("x", [1] * 150, 43)


def test_every_valid_request_fits_the_smallest_allowed_pool():
    # The pool must hold one full-length sequence (else ConfigError), and a
    # fresh batch never reserves more than that, so a request that passes the
    # length check always fits the pool alone.
    s = sched(max_num_seqs=4, max_model_len=256, available_blocks=4)
    for pl, mt in [(1, 255), (64, 192), (65, 191), (200, 56), (255, 1)]:
        s.validate("x", pl, mt)


def test_duplicate_id_rejected_until_the_first_is_gone():
    s = sched()
    s.add_request("a", [1], 1)
    with pytest.raises(InvalidRequestError, match="already in use"):
        s.add_request("a", [1], 1)
    s.schedule()
    s.update([5])  # finished at prefill
    s.schedule()
    s.update([])  # idle step frees it
    s.add_request("a", [1], 1)  # the id is free again


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(max_num_seqs=0, max_model_len=128), "max_num_seqs must be at least 1"),
        (dict(max_num_seqs=2, max_model_len=100), "multiple of the block size 64, got 100"),
        (dict(max_num_seqs=2, max_model_len=256, available_blocks=3), "fewer than one sequence"),
        (dict(max_num_seqs=2, max_model_len=128, max_batch_tkv_limit=0), "max_batch_tkv_limit must be at least 1"),
        (dict(max_num_seqs=-1, max_model_len=128), "max_num_seqs must be at least 1, got -1"),
        (dict(max_num_seqs=2.5, max_model_len=128), "max_num_seqs must be an int"),
    ],
)
def test_bad_config(kw, needle):
    with pytest.raises(ConfigError) as err:
        spyre_cb.Scheduler(**kw)
    assert needle in str(err.value)
    with pytest.raises(ConfigError):
        spyre_cb.simulate([(0, 1, 1)], **kw)


def test_simulation_with_rejected_requests_runs_the_others():
    reqs = [(0, 49, 10), (0, 0, 5), (0, 150, 43), (0, 70, 4), (1, 10, 0)]
    trace = spyre_cb.simulate(reqs, max_num_seqs=2, max_model_len=192)
    assert set(trace.rejected) == {"1", "2", "4"}
    assert "max_model_len 192" in trace.rejected["2"]
    clean = spyre_cb.simulate([(0, 49, 10), (0, 70, 4)], max_num_seqs=2, max_model_len=192)
    # same decisions; only the ids of the surviving requests differ ("3" for "1")
    rename = lambda ids: [{"3": "1"}.get(i, i) for i in ids]  # noqa: E731
    for a, b in zip(trace, clean):
        da, db = a.to_dict(), b.to_dict()
        for k in ("waiting", "running", "request_outputs", "finished_requests"):
            da[k] = rename(da[k])
        assert da == db
    assert len(trace) == len(clean)


def test_protocol_misuse_is_a_typed_error():
    s = sched()
    with pytest.raises(SchedulerStateError, match="without a pending plan"):
        s.update([])
    s.add_request("a", [1, 2], 3)
    s.schedule()
    with pytest.raises(SchedulerStateError, match="schedule called twice"):
        s.schedule()
    with pytest.raises(SchedulerStateError, match="expects 1 tokens"):
        s.update([1, 2])
    s.update([4])  # the pending plan survived the bad call


def test_abort_waiting_and_running_frees_blocks_next_step():
    s = sched(max_num_seqs=2, max_model_len=128)
    s.add_request("a", [1] * 10, 20)
    s.add_request("b", [1] * 10, 20)
    s.add_request("c", [1] * 10, 20)
    s.schedule()  # prefill a
    s.update([1])
    s.abort("c")  # waiting: gone at once
    assert s.snapshot().waiting == ["b"]
    s.abort("a")  # running: leaves now, blocks back at the next step
    snap = s.snapshot()
    assert snap.running == [] and snap.n_reserved_blocks == 2 and snap.n_used_blocks == 1
    with pytest.raises(UnknownRequestError):
        s.abort("a")
    plan = s.schedule()
    assert plan.kind == "prefill" and plan.request_id == "b" and plan.new_batch
    s.update([1])
    assert s.snapshot().n_reserved_blocks == 2 and s.snapshot().n_used_blocks == 1
    with pytest.raises(UnknownRequestError, match="nope"):
        s.abort("nope")


@pytest.mark.parametrize("bad", [[5], [(0, 1)], 7, [(0, "x", 2)]])
def test_simulate_stats_bad_requests_are_typed_errors(bad):
    with pytest.raises(InvalidRequestError):
        spyre_cb.simulate_stats(bad, max_num_seqs=2, max_model_len=128)


def test_simulate_stats_accepts_a_generator():
    st = spyre_cb.simulate_stats(((0, 10, 3) for _ in range(2)), max_num_seqs=2, max_model_len=128)
    assert st.summary()["tokens"] == 6
