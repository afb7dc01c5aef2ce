"""Fleet sizing by simulation (``spyre_cb.fleet``): N exact schedulers behind a
routing rule. One replica is the plain simulation; the search finds the fewest
replicas meeting a target; prefix affinity sends shared system prompts where
they are cached; the CLI prints the fleet's table."""

from __future__ import annotations

import subprocess
import sys

import pytest

import spyre_cb
from spyre_cb import ConfigError, fleet_size, simulate_fleet, simulate_stats
from spyre_cb.workload import synthetic_workload


@pytest.fixture(scope="module")
def work():
    return synthetic_workload(
        120, seed=3, max_model_len=512, mean_interarrival=3.0, prompt_median=120, tokens_median=60
    )


def test_one_replica_is_the_plain_simulation(work):
    plain = simulate_stats(work, max_num_seqs=4, max_model_len=512)
    one = simulate_stats(work, max_num_seqs=4, max_model_len=512, replicas=1)
    assert isinstance(one, spyre_cb.FleetStats)
    assert one.latency == plain.latency
    assert one.replicas[0]["requests"] == len(work) - len(plain.rejected)


def test_more_replicas_meet_a_target_and_the_search_finds_the_fewest(work):
    one = simulate_fleet(work, max_num_seqs=4, max_model_len=512, replicas=1)
    three = simulate_fleet(work, max_num_seqs=4, max_model_len=512, replicas=3)
    assert three.latency["ttft_steps"]["p99"] < one.latency["ttft_steps"]["p99"]
    assert sum(r["requests"] for r in three.replicas) == len(work)
    assert sorted(set(three.assignment)) == [0, 1, 2]
    target = three.latency["ttft_steps"]["p99"]
    found = fleet_size(work, max_num_seqs=4, max_model_len=512, ttft_p99=target, max_replicas=6)
    assert found is not None
    n, stats = found
    assert n <= 3 and stats.latency["ttft_steps"]["p99"] <= target
    if n > 1:
        fewer = simulate_fleet(work, max_num_seqs=4, max_model_len=512, replicas=n - 1)
        assert fewer.latency["ttft_steps"]["p99"] > target
    assert fleet_size(work, max_num_seqs=4, max_model_len=512, ttft_p99=0, max_replicas=2) is None


def test_prefix_affinity_gains_cache_hits_on_shared_system_prompts():
    systems = [[1000 * s + t for t in range(320)] for s in range(3)]
    reqs = [
        {
            "arrival_step": 5 * i,
            "prompt_token_ids": systems[i % 3] + [50_000 + 16 * i + t for t in range(16)],
            "max_tokens": 24,
        }
        for i in range(60)
    ]
    limits = dict(max_num_seqs=4, max_model_len=1024, policy="chunked", chunk_size=64, prefix_caching=True)
    hits = {
        router: sum(
            r["counters"]["prefix_cached_blocks"]
            for r in simulate_fleet(reqs, replicas=2, router=router, **limits).replicas
        )
        for router in ("prefix-affinity", "round-robin", "least-loaded")
    }
    assert hits["prefix-affinity"] > hits["round-robin"] and hits["prefix-affinity"] > hits["least-loaded"], hits


def test_bad_fleet_options_name_the_choices(work):
    with pytest.raises(ConfigError, match="router must be one of least-loaded, round-robin, prefix-affinity"):
        simulate_fleet(work, max_num_seqs=4, max_model_len=512, router="random")
    with pytest.raises(ConfigError, match="replicas must be at least 1"):
        simulate_fleet(work, max_num_seqs=4, max_model_len=512, replicas=0)
    with pytest.raises(ConfigError, match="router needs replicas"):
        simulate_stats(work, max_num_seqs=4, max_model_len=512, router="round-robin")


def test_the_cli_prints_the_fleet_and_sizes_it():
    cmd = [sys.executable, "-m", "spyre_cb", "simulate", "--synthetic", "80", "--max-num-seqs", "4"]
    r = subprocess.run(
        [*cmd, "--replicas", "2", "--router", "round-robin"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "2 replicas, router round-robin" in r.stdout and "fleet: ttft p50" in r.stdout
    r = subprocess.run([*cmd, "--target-ttft-p99", "100000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "fewest replicas meeting the targets: 1" in r.stdout
