"""Intra-op threads from the CPUs a process may use, settable per engine."""

from __future__ import annotations

import os

import pytest
import torch

import spyre_cb
from spyre_cb import _core, cpus
from spyre_cb.config import EngineConfig
from spyre_cb.errors import ConfigError


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpus._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus._cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus._cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus._cgroup_quota(v1) is None
    assert cpus._cgroup_quota(tmp_path / "missing") is None


def test_available_cpus_follow_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    assert cpus.available_cpus() == 4
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 2.5)
    assert cpus.available_cpus() == 3
    assert cpus.intra_op_threads(None, ranks=2) == 1
    assert cpus.intra_op_threads(None) == 3
    assert cpus.intra_op_threads(5, ranks=2) == 5
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 0.2)
    assert cpus.available_cpus() == 1
    assert cpus.intra_op_threads(None, ranks=4) == 1


def test_engine_runs_with_its_threads_and_gives_them_back(tiny_model):
    before = torch.get_num_threads()
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128, num_threads=1)
    assert torch.get_num_threads() == 1
    eng.add_request("a", [1, 2, 3], spyre_cb.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    eng.shutdown()
    assert torch.get_num_threads() == before
    spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128).shutdown()
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, 5000])
def test_num_threads_is_checked(bad):
    with pytest.raises(ConfigError, match="num_threads must be None or an int in \\[1, 1024\\]"):
        EngineConfig(num_threads=bad)


class _Clock:
    def __init__(self):
        self.wall = 100.0
        self.own = 5.0

    def monotonic(self):
        return self.wall

    def process_time(self):
        return self.own


def test_governor_gives_up_threads_other_processes_hold(monkeypatch):
    clock = _Clock()
    ticks = {"busy": 0}
    monkeypatch.setattr(cpus, "time", clock)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(cpus, "_cpu_jiffies", lambda which: (ticks["busy"], 10**9))
    before = torch.get_num_threads()
    try:
        gov = cpus.ThreadGovernor(interval_s=1.0)
        gov.tick = 100
        assert gov.enabled
        torch.set_num_threads(2)
        # 2 s: both CPUs busy, this process used one of them -> another process holds one
        clock.wall += 2.0
        clock.own += 2.0
        ticks["busy"] += 400
        gov.maybe_adjust()
        assert torch.get_num_threads() == 1
        # within the interval nothing is re-read
        ticks["busy"] += 10**6
        clock.wall += 0.5
        gov.maybe_adjust()
        assert torch.get_num_threads() == 1
        gov._mark()
        # the other process left: all the busy time is this process's
        clock.wall += 1.5
        clock.own += 1.4
        ticks["busy"] += 140
        gov.maybe_adjust()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_governor_stays_off_under_a_cgroup_quota_or_a_fixed_count(monkeypatch, tiny_model):
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 2.0)
    assert not cpus.ThreadGovernor().enabled
    eng = spyre_cb.Engine(tiny_model, max_num_seqs=2, max_model_len=128, num_threads=1)
    assert eng.executor._governor is None
    eng.shutdown()


def test_the_openmp_runtime_is_torchs_own():
    """The kernels share the OpenMP runtime torch runs on, found in the memory map:
    torch's own where it ships one, else the only one mapped, never a guess."""
    row = "7f3a1c000000-7f3a1c020000 r-xp 00000000 08:01 4242 {}"

    def maps(*paths):
        anon = "7ffd0000-7ffd1000 rw-p 00000000 00:00 0 "
        return "\n".join([anon, *(row.format(p) for p in paths), "7ffe0000-7ffe1000 r--p 00000000 00:00 0 [vvar]"])

    torch_dir, system = "/venv/site-packages/torch", "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    ours = f"{torch_dir}/lib/libgomp.so.1"
    wheel = f"{torch_dir}.libs/libgomp-a34b3233.so.1"  # the CPU wheels' vendored copy
    assert cpus._loaded_libgomp(maps(f"{torch_dir}/lib/libtorch_cpu.so", ours, system), torch_dir) == ours
    assert cpus._loaded_libgomp(maps(wheel, system), torch_dir) == wheel
    assert cpus._loaded_libgomp(maps(system), torch_dir) == system
    assert cpus._loaded_libgomp(maps(system, "/opt/other/libgomp.so.1"), torch_dir) is None
    assert cpus._loaded_libgomp(maps("/usr/lib/libiomp5.so"), torch_dir) is None


def test_a_runtime_not_loaded_is_refused_and_changes_nothing(tmp_path):
    shared = _core.openmp_workers_shared()
    assert _core.share_openmp_workers(str(tmp_path / "libgomp.so.1")) is False
    assert _core.openmp_workers_shared() == shared


@pytest.mark.skipif(not cpus.share_torch_workers(), reason="torch does not run on a GNU OpenMP runtime found here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_split_over_torchs_workers_give_the_same_numbers(dtype):
    """Split by output features over torch's OpenMP workers, a product is the one
    thread's bit for bit; so is decode attention, split by sequence."""
    from spyre_cb.attention import _native_decode
    from spyre_cb.linear import NativeLinear

    assert _core.openmp_workers_shared()
    torch.manual_seed(0)
    dense = torch.nn.Linear(640, 1000).to(dtype)  # 640K weights: split on the workers
    w, b = dense.weight.detach().float().clone(), dense.bias.detach().float().clone()
    layer = NativeLinear(dense)
    x = torch.randn(5, 640).to(dtype)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 1, 8, 64, generator=g).to(dtype)
    kc, vc = (torch.randn(40, 64, 4, 64, generator=g).to(dtype) for _ in range(2))
    kw = {
        "block_table": torch.randint(0, 40, (6, 5), generator=g),
        "current_tkv_mask": torch.full((6,), 300),
        "left_padded_prompt_mask": torch.tensor([0, 3, 17, 64, 100, 250]),
    }
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert cpus.kernel_threads() == threads
            got[threads] = (layer(x), _native_decode(q, kc, vc, 8, 4, 0.0, None, **kw))
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(got[1], got[threads])), threads
    torch.testing.assert_close(got[1][0].float(), torch.nn.functional.linear(x.float(), w, b), rtol=2e-2, atol=2e-2)
