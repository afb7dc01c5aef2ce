"""The spyre-cb command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(*args, env_extra=None, timeout=300):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "spyre_cb", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("cmd", [[], ["demo"], ["generate"], ["simulate"]])
def test_help(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "usage: spyre-cb" in r.stdout


def test_demo_shows_batching(tmp_path):
    r = run("demo", env_extra={"SPYRE_CB_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = [ln.split() for ln in lines if ln[:5].strip().isdigit()]
    kinds = {row[1] for row in rows}
    assert {"prefill", "decode"} <= kinds
    # at some step several requests run together: continuous batching happened
    assert any(len(row) > 4 and "," in row[-2] for row in rows if row[1] == "decode")
    assert "generated:" in r.stdout and "[7]" in r.stdout


def test_simulate_synthetic_summary_json_and_plot(tmp_path):
    png, js = tmp_path / "sim.png", tmp_path / "sim.json"
    r = run("simulate", "--synthetic", "1000", "--seed", "3", "--plot", str(png), "--json", str(js))
    assert r.returncode == 0, r.stderr
    assert "requests          1000 (0 rejected)" in r.stdout
    for key in ("mean batch size", "padding share", "blocks high-water", "queueing delay"):
        assert key in r.stdout
    assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    assert doc["summary"]["requests"] == 1000 and len(doc["columns"]["tkv"]) == doc["summary"]["steps"] + 1


def test_simulate_file_prints_the_step_table(tmp_path):
    w = tmp_path / "w.jsonl"
    w.write_text('[0, 49, 10]\n{"arrival_step": 0, "prompt_len": 70, "max_tokens": 4}\n[1, 300, 5]\n')
    r = run("simulate", str(w), "--max-num-seqs", "2", "--max-model-len", "192", "--json", str(tmp_path / "o.json"))
    assert r.returncode == 0, r.stderr
    assert "rejected request 2: prompt of 300 tokens plus max_tokens 5 = 305 exceeds max_model_len 192" in r.stderr
    row2 = next(ln for ln in r.stdout.splitlines() if ln.split()[:1] == ["2"])
    assert row2.split()[:3] == ["2", "prefill", "128"]
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["steps"][2]["running"] == ["1", "0"]


def test_simulate_errors_exit_2(tmp_path):
    r = run("simulate", "--synthetic", "5", "--max-model-len", "100")
    assert r.returncode == 2 and "multiple of the block size 64, got 100" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('[[0, "x", 3]]')
    r = run("simulate", str(bad))
    assert r.returncode == 2 and "prompt_len must be an int >= 0, got 'x'" in r.stderr


def test_generate(tiny_model):
    r = run(
        "generate",
        "--model",
        str(tiny_model),
        "--prompt",
        "The river",
        "--prompt",
        "Good",
        "--max-tokens",
        "5",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    docs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [d["prompt"] for d in docs] == ["The river", "Good"]
    assert all(len(d["token_ids"]) == 5 for d in docs)


def test_demo_honours_the_limit_options(tmp_path):
    r = run(
        "demo",
        "--max-model-len",
        "256",  # the default 512 needs 8 blocks per sequence
        "--available-blocks",
        "6",
        "--max-batch-tkv-limit",
        "300",
        env_extra={"SPYRE_CB_CACHE": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    assert "blocks=6 max_batch_tkv_limit=300" in r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines() if ln[:5].strip().isdigit()]
    assert max(int(row[-1].split("/")[0]) for row in rows) <= 6


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"spyre-cb {__import__('spyre_cb').__version__}"


def test_generate_options_default_to_the_api():
    import dataclasses

    from spyre_cb.cli import SAMPLING_HELP, build_parser
    from spyre_cb.config import EngineConfig
    from spyre_cb.params import SamplingParams

    a = build_parser().parse_args(["generate", "--prompt", "x"])
    api = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    for name in SAMPLING_HELP:
        assert getattr(a, name) == api[name], name
    for f in dataclasses.fields(EngineConfig):
        assert getattr(a, f.name) == f.default, f.name
    help_text = run("generate", "--help").stdout
    for flag in (
        "--min-p",
        "--repetition-penalty",
        "--stop-token-ids",
        "--logprobs",
        "--dtype",
        "--chat",
        "--prompt-file",
    ):
        assert flag in help_text


def test_generate_json_logprobs_stop_ids_and_prompts_from_stdin(tmp_path):
    env = {"SPYRE_CB_CACHE": str(tmp_path)}
    greedy = ["generate", "--prompt", "The river", "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json"]
    r = run(*greedy, "--logprobs", "2", env_extra=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.splitlines()[0])
    assert len(doc["token_ids"]) == 6 and len(doc["logprobs"]) == 6 and doc["cumulative_logprob"] < 0
    stop_at = doc["token_ids"][2]
    r = run(*greedy, "--stop-token-ids", str(stop_at), env_extra=env)
    cut = json.loads(r.stdout.splitlines()[0])
    assert (
        cut["token_ids"] == doc["token_ids"][: doc["token_ids"].index(stop_at) + 1] and cut["finish_reason"] == "stop"
    )
    r = subprocess.run(
        [sys.executable, "-m", "spyre_cb", "generate", "--prompt-file", "-", "--max-tokens", "2", "--json"],
        input="first prompt\n\nsecond prompt\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["prompt"] for x in r.stdout.splitlines()] == ["first prompt", "second prompt"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate"], "give at least one --prompt"),
        (["generate", "--prompt-file", "/nonexistent/prompts.txt"], "cannot read prompts"),
        (["generate", "--prompt", "x", "--top-p", "0"], "top_p must be in"),
        (["generate", "--prompt", "x", "--max-tokens", "-3"], "max_tokens must be at least 1, got -3"),
        (["serve", "tiny", "--max-num-seqs", "-1"], "max_num_seqs must be at least 1, got -1"),
    ],
)
def test_generate_usage_errors_exit_2(tmp_path, args, needle):
    r = run(*args, env_extra={"SPYRE_CB_CACHE": str(tmp_path)})
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_compile_backend_announces_the_warm_up(tmp_path):
    r = run("generate", "--prompt", "x", "--backend", "inductor", "--model", str(tmp_path / "none"))
    assert "compiling the model with torch.compile" in r.stderr and r.returncode == 2


def test_simulate_summary_says_why_requests_waited():
    r = run("simulate", "--synthetic", "300", "--seed", "2", "--summary")
    assert r.returncode == 0, r.stderr
    assert "queue head waited" in r.stdout and "the batch is full" in r.stdout


def test_chunked_policy_from_the_command_line(tmp_path):
    """simulate and demo take the chunked policy's options; the summary reports its latencies."""
    wl = tmp_path / "w.json"
    wl.write_text(json.dumps([[0, 900, 20], [1, 30, 40], [2, 40, 10]]))
    r = run("simulate", str(wl), "--policy", "chunked", "--chunk-size", "128", "--max-num-seqs", "4", "--table")
    assert r.returncode == 0, r.stderr
    assert "time to 1st token" in r.stdout and "decode pauses" in r.stdout
    assert "chunk" in r.stdout or "prefill" in r.stdout
    r = run("simulate", str(wl), "--prefix-caching")  # a chunked option without the policy
    assert r.returncode == 2 and "policy='chunked'" in r.stderr
    r = run(
        "demo",
        "--policy",
        "chunked",
        "--chunk-size",
        "64",
        "--no-interleave",
        env_extra={"SPYRE_CB_CACHE": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    assert "generated:" in r.stdout


def test_generate_chat_on_the_tiny_model(tmp_path):
    """The offline model has a chat template, so --chat (and the server's chat endpoint) work on it."""
    r = run(
        "generate",
        "--prompt",
        "hello",
        "--chat",
        "--max-tokens",
        "3",
        "--json",
        env_extra={"SPYRE_CB_CACHE": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[0])
    assert len(out["token_ids"]) <= 3
