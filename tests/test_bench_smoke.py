"""Smoke runs of the benchmark scripts (no timing assertions: CI machines are noisy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def run(script, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(BENCHES / script), *args], capture_output=True, text=True, timeout=timeout
    )


def test_rust_vs_python_traces_identical():
    r = run("rust_vs_python.py", "--requests", "300", "--repeat", "1", "--interarrival", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical traces: yes" in r.stdout and "steps/s" in r.stdout


@pytest.mark.slow
def test_e2e_quick():
    r = run("e2e.py", "--quick")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tokens identical to HF (a vs c): 12/12 requests" in r.stdout
    assert "tokens identical (a vs b): 12/12" in r.stdout
    assert "outside the model forward" in r.stdout
    assert "tokens identical (d vs c): 12/12" in r.stdout and "(a)/(d) throughput" in r.stdout


def test_decode_step_quick():
    r = run("decode_step.py", "--quick")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| 128 |" in r.stdout and "x |" in r.stdout, r.stdout


def test_policies_quick():
    r = run("policies.py", "--quick")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("| 6/6 |") == 6, r.stdout  # every policy, both workloads: the same tokens


def test_serve_load_quick():
    r = run("serve_load.py", "--quick")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " tokens in " in ln]
    # the server and the direct engine produced the same number of tokens
    assert len(lines) == 2 and lines[0].split(": ")[1].split()[0] == lines[1].split(": ")[1].split()[0], r.stdout
    assert "server / engine tokens/s" in r.stdout


def test_peer_vllm_spyre_cb_half_quick():
    """The spyre_cb half of the vLLM comparison (vLLM's virtualenv is not part of CI)."""
    import json

    r = run("peer_vllm.py", "--only", "spyre_cb", "--quick", "--cpus", "")
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)["spyre_cb"]
    assert got["tokens_per_s"] > 0 and got["tokens_per_cpu_s"] > 0 and got["peak_memory_mb"] > 100, got
    assert len(got["runs"]) == 1


def test_embed_quick():
    """spyre_cb's Embedder against transformers on the tiny encoder: same embeddings."""
    import json

    r = run("embed.py", "--quick")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["min_cosine"] > 1 - 1e-4, result
    assert result["spyre_cb"]["inputs_per_s"] > 0 and result["transformers"]["inputs_per_s"] > 0


def test_data_parallel_quick():
    """Two replicas and one engine on the tiny model: the same tokens."""
    import json

    r = run("data_parallel.py", "--quick")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(e["tokens_identical_to_one_engine"] for e in result["engines"].values()), result
    assert result["router_route_us"]["least-loaded"] > 0 and result["submit_latency_ms"]["dp2"] > 0


def test_weight_bandwidth_quick():
    """The decode-bandwidth measure on the tiny shape: its numbers are present and positive."""
    import json

    r = run(
        "weight_bandwidth.py",
        *("--shape", "tiny", "--stream-mib", "64", "--batch", "4", "--steps", "6", "--linear-ops", "auto", "torch"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["stream_gb_s"]["triad"] > 0, result
    for ops in ("auto", "torch"):
        batch = result["engines"][ops]["batches"]["4"]
        assert batch["weight_gb_s"] > 0 and batch["fraction_of_adjacent_triad"] > 0, result
    assert result["engines"]["torch"]["linear_ops"] == "torch"


def test_linear_ops_quick():
    """The linear-layer comparison on small shapes: every way that runs here is timed."""
    import json

    r = run("linear_ops.py", "--shapes", "64x96", "--rows", "1", "9", "--dtype", "float32")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for rows in ("1", "9"):
        timed = result["shapes"]["64x96"][rows]
        assert all(timed[name]["us"] > 0 for name in result["ops"]), result
