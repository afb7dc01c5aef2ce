"""Tensor parallelism: 2 ranks over gloo on CPU, started by the engine.

The same step records as ``simulate()`` and the same tokens as one process
and as transformers' greedy output, for checkpoints with fewer KV heads than
ranks (Granite, 1 KV head) and more (Llama, 4); a worker killed mid-run is a
clear ExecutorError within seconds and leaves no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import transformers

import spyre_cb
from conftest import random_prompts, spawned_children
from engine_harness import run_engine
from scenarios import IDS, SCENARIOS
from spyre_cb import ExecutorError, SamplingParams
from spyre_cb.models import make_tiny_checkpoint
from spyre_cb.workload import synthetic_workload

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        "granite-kv1": make_tiny_checkpoint(root / "granite", seed=5, num_heads=4, num_kv_heads=1),
        "llama-kv4": make_tiny_checkpoint(root / "llama", seed=6, arch="llama", num_heads=4, num_kv_heads=4),
    }


def hf_reference(path, prompts, max_tokens) -> dict[str, list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        x = torch.tensor([p])
        with torch.inference_mode():
            y = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        out[str(i)] = y[0, len(p) :].tolist()
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def assert_workers_gone(pids: list[int]) -> None:
    """Within 10 s no worker process is left and the process group is gone."""
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("sc", SCENARIOS[:6], ids=IDS[:6])
def test_published_scenarios_under_tp2(models, sc):
    path = models["granite-kv1"]
    with spyre_cb.Engine(path, tensor_parallel_size=2, **sc.limits) as eng:
        records, prompts, outputs = run_engine(eng, sc.requests, seed=11)
    assert [r.to_dict() for r in records] == sc.expected_steps()
    ref = hf_reference(path, prompts, [mt for _, _, mt in sc.requests])
    assert outputs == ref


@pytest.mark.parametrize("sc", SCENARIOS[6:], ids=IDS[6:])
def test_more_published_scenarios_under_tp2_llama(models, sc):
    path = models["llama-kv4"]
    with spyre_cb.Engine(path, tensor_parallel_size=2, **sc.limits) as eng:
        records, prompts, outputs = run_engine(eng, sc.requests, seed=12)
    assert [r.to_dict() for r in records] == sc.expected_steps()
    assert outputs == hf_reference(path, prompts, [mt for _, _, mt in sc.requests])


@pytest.mark.parametrize("name", ["granite-kv1", "llama-kv4"])
def test_random_workload_tp2_equals_tp1_and_hf(models, name):
    path = models[name]
    reqs = synthetic_workload(14, seed=3, max_model_len=256, mean_interarrival=2.0, prompt_median=40, tokens_median=12)
    limits = dict(max_num_seqs=3, max_model_len=256)
    with spyre_cb.Engine(path, tensor_parallel_size=2, **limits) as eng:
        rec2, prompts, out2 = run_engine(eng, reqs, seed=13)
    with spyre_cb.Engine(path, **limits) as eng:
        rec1, _, out1 = run_engine(eng, reqs, seed=13)
    assert rec2 == rec1 == list(spyre_cb.simulate(reqs, **limits))
    assert out2 == out1 == hf_reference(path, prompts, [mt for _, _, mt in reqs])


def test_beam_search_under_tp2_equals_one_process(models):
    """Beam searches fork blocks and the ranks copy them (``block_copies`` travel on the
    wire): every rank's cache stays the same, so the beams equal one process's."""
    from spyre_cb.beam_search import BeamSearchParams

    path = models["llama-kv4"]
    prompts = random_prompts([70, 9, 130], 500, seed=4)  # 70: a partly filled block is copied
    params = [
        BeamSearchParams(beam_width=3, max_tokens=20, ignore_eos=True, length_penalty=lp) for lp in (1.0, 0.0, 2.0)
    ]

    def run(**kw):
        # one thread per rank, and in the single process: whatever the affinity earlier tests left
        eng = spyre_cb.Engine(path, max_num_seqs=9, max_model_len=256, num_threads=1, **kw)
        try:
            for i, (p, bp) in enumerate(zip(prompts, params)):
                eng.add_beam_search(str(i), p, bp)
            outs = {}
            while eng.has_unfinished_requests():
                for o in eng.step():
                    if o.finished:
                        outs[o.request_id] = [b.output_token_ids for b in o.beams]
            return outs
        finally:
            eng.shutdown()

    one = run()
    assert run(tensor_parallel_size=2) == one


def test_an_engine_idle_longer_than_tp_timeout_still_serves(models):
    """Idle workers wait for the next plan on a channel of their own (the model's
    collectives keep tp_timeout_s): a server with no requests for a while was dead."""
    path = models["granite-kv1"]
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def run(**kw):
        with spyre_cb.Engine(path, max_num_seqs=2, max_model_len=256, num_threads=1, **kw) as eng:
            if kw:
                time.sleep(6.5)  # idle for longer than tp_timeout_s
                assert eng.executor.failure() is None
            eng.add_request("0", [5, 6, 7, 8], p)
            out = []
            while eng.has_unfinished_requests():
                out += [t for o in eng.step() for t in o.new_token_ids]
            return out

    assert run(tensor_parallel_size=2, tp_timeout_s=5.0) == run()


def test_a_killed_worker_is_a_clear_error_and_leaves_nothing(models):
    path = models["granite-kv1"]
    eng = spyre_cb.Engine(path, tensor_parallel_size=2, max_num_seqs=2, max_model_len=128)
    pids = eng.executor.worker_pids
    try:
        p = random_prompts([20, 30], eng.vocab_size, seed=1)
        for i, ids in enumerate(p):
            eng.add_request(str(i), ids, SamplingParams(max_tokens=40, **GREEDY))
        for _ in range(4):
            eng.step()
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ExecutorError, match="died|failed"):
            for _ in range(50):
                eng.step()
        assert time.monotonic() - t0 < 10
        assert all(eng.get_request(r).finish_reason == "abort" for r in ("0", "1"))
        with pytest.raises(ExecutorError):
            eng.add_request("x", p[0], SamplingParams(max_tokens=2, **GREEDY))
            eng.step()
    finally:
        eng.shutdown()
    assert_workers_gone(pids)


def test_a_rank_that_cannot_load_fails_start_up_cleanly(models):
    # 4 query heads do not split over 3 ranks: every rank fails to load its shard
    with pytest.raises((spyre_cb.ConfigError, ExecutorError)):
        spyre_cb.Engine(models["llama-kv4"], tensor_parallel_size=3, max_num_seqs=1, max_model_len=128)
    assert not torch.distributed.is_initialized()
    with spyre_cb.Engine(models["llama-kv4"], max_num_seqs=1, max_model_len=128) as eng:  # the process is usable
        eng.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2, **GREEDY))
        while eng.has_unfinished_requests():
            eng.step()


def test_keyboard_interrupt_in_a_step_stops_the_workers(models, monkeypatch):
    eng = spyre_cb.Engine(models["granite-kv1"], tensor_parallel_size=2, max_num_seqs=2, max_model_len=128)
    pids = eng.executor.worker_pids
    try:
        eng.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=20, **GREEDY))
        eng.step()

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(eng.runner, "execute", interrupted)
        with pytest.raises(KeyboardInterrupt):
            eng.step()
        assert eng.get_request("a").finish_reason == "abort"
        with pytest.raises(ExecutorError, match="shut down"):
            eng.add_request("b", [1, 2], SamplingParams(max_tokens=2, **GREEDY))
            eng.step()
    finally:
        eng.shutdown()
    assert_workers_gone(pids)


def test_a_worker_killed_while_the_ranks_connect_fails_start_up_at_once(models, monkeypatch):
    """Rank 1 joined the store, then dies before the process group is connected:
    rank 0, connecting, sees it at once rather than after tp_timeout_s."""
    from spyre_cb import executor

    real = executor._init_group
    killed: list[int] = []

    def kill_then_connect(backend, rank, world, store, timeout_s):
        if rank == 0:  # every worker has joined by now
            for pid in spawned_children(os.getpid()):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return real(backend, rank, world, store, timeout_s)

    monkeypatch.setattr(executor, "_init_group", kill_then_connect)
    t0 = time.monotonic()
    # (whether the backend's connect is still running or already returned when it is seen)
    phase = r"(while the ranks connected|during start-up)"
    with pytest.raises(ExecutorError, match=r"rank 1 \(pid \d+, exit code -9\) exited " + phase):
        spyre_cb.Engine(
            models["granite-kv1"], tensor_parallel_size=2, max_num_seqs=1, max_model_len=128, tp_timeout_s=30
        )
    assert killed and time.monotonic() - t0 < 20, f"ExecutorError after {time.monotonic() - t0:.1f} s"
    assert_workers_gone(killed)


@pytest.mark.parametrize("after_s", [0.0, 1.0], ids=["at-spawn", "importing"])
def test_a_worker_killed_before_the_rendezvous_fails_start_up_at_once(models, after_s):
    killed: list[int] = []
    at: list[float] = []

    def killer() -> None:  # kills rank 1 once it exists (it takes seconds to import torch and join)
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for pid in spawned_children(os.getpid()):
                time.sleep(after_s)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                at.append(time.monotonic())
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match=r"rank 1 \(pid \d+, exit code -9\) exited before the rendezvous"):
        # a long tp_timeout_s: the error must come from seeing the dead worker, not from a timeout
        spyre_cb.Engine(
            models["granite-kv1"], tensor_parallel_size=2, max_num_seqs=1, max_model_len=128, tp_timeout_s=120
        )
    done = time.monotonic()
    t.join(5)
    assert killed and done - at[0] < 3, f"ExecutorError {done - at[0]:.1f} s after the kill"
    assert done - t0 < 30
    assert_workers_gone(killed)


NO_MAIN_GUARD = """
import spyre_cb
eng = spyre_cb.Engine({path!r}, tensor_parallel_size=2, max_num_seqs=1, max_model_len=128, tp_timeout_s=120)
print("engine started")
"""


def test_a_script_without_main_guard_gets_an_executor_error_with_the_hint(models, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(NO_MAIN_GUARD.format(path=str(models["granite-kv1"])))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.match(r"spyre_cb\.\w+\.ExecutorError: tensor-parallel worker rank 1 ", last), r.stderr
    assert "exited before the rendezvous" in last and 'if __name__ == "__main__":' in last
    assert "AssertionError" not in r.stderr and "engine started" not in r.stdout
    assert took < 60  # the worker's imports and the parent's, not tp_timeout_s (120 s)
