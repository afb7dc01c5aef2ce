"""Tensor-parallel ranks started by torchrun on two "hosts" (issue 24): two
launcher agents on 127.0.0.1 (``--nnodes 2 --node-rank K``, static
rendezvous), each starting one rank with the same ``spyre-cb`` command.

- ``generate``: rank 0 prints the tokens a single process prints; both agents exit 0;
- ``serve``: rank 0 serves the ``openai`` client; the rank on the other "host"
  killed mid-stream gives an ExecutorError within seconds (the stream fails),
  the server exits with status 1, both agents end and nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import spyre_cb
from spyre_cb.launched import launched_rank

openai = pytest.importorskip("openai")

from conftest import children  # noqa: E402
from test_server import _free_port, _get  # noqa: E402


def _children(pid: int) -> list[int]:
    """Pids of ``pid``'s children (the ranks an agent started)."""
    return [c for c, _ in children(pid)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


GEN = ["--prompt", "The quick brown fox", "--prompt", "Hello", "--max-tokens", "12", "--temperature", "0"]
GEN += ["--ignore-eos", "--json"]


def test_launched_rank_reads_torchruns_environment(monkeypatch):
    for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert launched_rank() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_rank() is None  # not started by torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert launched_rank() == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_rank() is None  # one rank: nothing to coordinate


def test_a_world_that_is_not_the_tensor_parallel_size_is_refused(monkeypatch, tmp_path):
    from spyre_cb.launched import run_worker

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(spyre_cb.ConfigError, match="started 2 ranks .* tensor_parallel_size is 1"):
        run_worker(spyre_cb.EngineConfig())


class Agents:
    """Two torchrun agents ("hosts"), one rank each, running ``spyre_cb ARGS``."""

    def __init__(self, tmp_path, *args: str) -> None:
        port = _free_port()
        env = dict(os.environ, SPYRE_CB_CACHE=str(tmp_path))
        self.logs = [tmp_path / f"agent{k}.log" for k in (0, 1)]
        self.procs = []
        for k in (0, 1):
            with open(self.logs[k], "w") as out:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
                cmd += ["--node-rank", str(k), "--master-addr", "127.0.0.1", "--master-port", str(port)]
                cmd += ["--max-restarts", "0", "--monitor-interval", "0.2", "-m", "spyre_cb", *args]
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))

    def log(self, k: int) -> str:
        return self.logs[k].read_text()

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            for c in _children(p.pid):
                try:
                    os.kill(c, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_two_hosts_generate_what_one_process_generates(tmp_path):
    env = dict(os.environ, SPYRE_CB_CACHE=str(tmp_path))
    one = subprocess.run(
        [sys.executable, "-m", "spyre_cb", "generate", *GEN], env=env, capture_output=True, text=True, timeout=120
    )
    assert one.returncode == 0, one.stderr
    want = [json.loads(line)["token_ids"] for line in one.stdout.splitlines() if line.startswith("{")]
    agents = Agents(tmp_path, "generate", *GEN, "--tensor-parallel-size", "2", "--num-threads", "1")
    try:
        codes = agents.wait(180)
        assert codes == [0, 0], agents.log(0) + agents.log(1)
        got = [json.loads(line)["token_ids"] for line in agents.log(0).splitlines() if line.startswith("{")]
        assert got == want and len(want) == 2
        assert not any(line.startswith("{") for line in agents.log(1).splitlines())  # rank 1 only computes
    finally:
        agents.kill()


def test_a_rank_lost_on_the_other_host_ends_the_job_within_seconds(tmp_path):
    port = _free_port()
    agents = Agents(tmp_path, "serve", "tiny", "--port", str(port), "--tensor-parallel-size", "2", "--num-threads", "1")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert all(p.poll() is None for p in agents.procs), agents.log(0) + agents.log(1)
            assert time.monotonic() < deadline, "the launched server did not come up"
            try:
                if _get(base + "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
        r = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True}
        )
        assert len(r.choices[0].text) > 0
        # the rank on "host" 1: the only child of agent 1
        (rank0,) = _children(agents.procs[0].pid)
        (rank1,) = _children(agents.procs[1].pid)
        stream = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=480, temperature=0.0, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        os.kill(rank1, signal.SIGKILL)
        t0 = time.monotonic()
        failed: BaseException | None = None
        try:
            for _ in chunks:  # the step in flight fails: an SSE error event, or the server goes away
                if time.monotonic() - t0 > 30:
                    break
        except Exception as e:  # noqa: BLE001 (openai.APIError, or the connection closing)
            failed = e
        assert failed is not None, "the stream went on although a rank was lost"
        codes = agents.wait(30)
        took = time.monotonic() - t0
        assert codes[0] not in (None, 0) and codes[1] not in (None, 0), (codes, agents.log(0))
        assert took < 30
        log0 = agents.log(0)
        assert "the engine is dead: tensor-parallel rank 1" in log0 and "lost" in log0, log0
        assert not _running(rank0) and not _running(rank1)  # nothing left running
    finally:
        agents.kill()
