"""The server as a production front door (issue 21): one client cannot hurt the
others. Real servers (``spyre-cb serve`` subprocesses on free loopback ports),
real clients (httpx, raw sockets), every wait bounded:

- a non-streamed request whose client goes away is aborted (the engine goes idle);
- SIGTERM with a client that never reads exits within ``--shutdown-timeout``;
- a dead tensor-parallel worker makes ``/health`` and new requests 503, ends a
  stream in flight with an SSE error event, a non-streamed one with a 503;
- the latency and size histograms, the dead gauge and the access log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")

from conftest import spawned_children  # noqa: E402
from test_server import API_KEY, EXTRA, Server  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("robust"))
    yield s
    s.stop()


def _metrics(server: Server) -> str:
    return httpx.get(server.base + "/metrics", timeout=5).text


def _sample(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _wait_idle(server: Server, timeout: float) -> float:
    """Seconds until nothing runs, waits or holds a block (AssertionError after ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        text = _metrics(server)
        if all(
            _sample(text, m) == 0
            for m in ("spyre_cb_requests_running", "spyre_cb_requests_waiting", "spyre_cb_kv_blocks_used")
        ):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy {timeout} s later:\n{_metrics(server)}")


def test_non_streamed_requests_are_aborted_when_their_clients_go_away(server):
    _wait_idle(server, 30)
    before = _sample(_metrics(server), "spyre_cb_generation_tokens_total")
    # 8 clients, each asking for 16 choices of 480 tokens: ~15 s of steps for the tiny model
    # (4 sequences at a time, ~1 ms a step); each client gives up after 1 s
    clients, n, max_tokens = 8, 16, 480
    body = {"model": "tiny", "prompt": "The river", "max_tokens": max_tokens, "n": n, "temperature": 0, **EXTRA}

    async def one() -> None:  # gives up after 1 s: httpx closes the connection
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=1.0) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/completions", json=body)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), 30)

    asyncio.run(main())
    gone = time.monotonic()
    idle_after = _wait_idle(server, 20)
    generated = _sample(_metrics(server), "spyre_cb_generation_tokens_total") - before
    # all of them would be 61,440 tokens; the requests are aborted within a poll interval
    # (0.25 s) and a step of their clients leaving
    assert generated < clients * n * max_tokens / 4, f"{generated:.0f} tokens generated for clients that left"
    assert idle_after < 3, f"idle {idle_after:.2f} s after the clients left"
    assert time.monotonic() - gone < 5
    text = _metrics(server)
    # (a few choices of 480 tokens finish in the second before their client leaves)
    assert _sample(text, 'spyre_cb_requests_finished_total{finish_reason="abort"}') >= clients * n * 3 / 4
    print(f"{generated:.0f} tokens generated, idle {idle_after:.2f} s after the clients left")
    # the access log says so: one line per request, status 499, its choices aborted
    lines = _access_lines(server, lambda d: d["status"] == 499 and "abort" in d["finish_reason"])
    assert len(lines) == clients


def _access_lines(server: Server, keep=lambda d: True, timeout: float = 5.0) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = []
        for line in server.log().splitlines():
            if " spyre_cb.access " in line:
                d = json.loads(line.split(" spyre_cb.access ", 1)[1])
                if keep(d):
                    out.append(d)
        if out:
            return out
        time.sleep(0.1)
    return out


def test_request_histograms_and_the_access_log(server):
    _wait_idle(server, 30)
    text = _metrics(server)
    count0 = _sample(text, "spyre_cb_e2e_request_latency_seconds_count")
    gen0 = _sample(text, "spyre_cb_request_generation_tokens_sum")
    prompt0 = _sample(text, "spyre_cb_request_prompt_tokens_sum")
    assert _sample(text, "spyre_cb_engine_dead") == 0
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 7, "n": 2, "temperature": 0, **EXTRA}
    t0 = time.monotonic()
    r = httpx.post(server.base + "/v1/completions", json=body, headers=AUTH, timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 200
    rid = r.json()["id"]
    _wait_idle(server, 10)
    text = _metrics(server)
    assert _sample(text, "spyre_cb_e2e_request_latency_seconds_count") == count0 + 2
    assert _sample(text, "spyre_cb_request_generation_tokens_sum") == gen0 + 14
    assert _sample(text, "spyre_cb_request_prompt_tokens_sum") == prompt0 + 10
    assert _sample(text, 'spyre_cb_request_generation_tokens_bucket{le="8.0"}') >= 2
    (line,) = _access_lines(server, lambda d: d["id"] == rid)
    assert line["status"] == 200 and line["path"] == "/v1/completions" and line["method"] == "POST"
    assert line["finish_reason"] == "length,length"
    assert line["prompt_tokens"] == 10 and line["completion_tokens"] == 14
    assert 0 <= line["queue_s"] <= line["total_s"] <= took and 0 < line["ttft_s"] <= line["total_s"]
    # a refused request is logged too, without an id
    bad = httpx.post(server.base + "/v1/completions", json={**body, "model": "gpt-4"}, headers=AUTH, timeout=10)
    assert bad.status_code == 404
    assert _access_lines(server, lambda d: d["status"] == 404 and d["id"] is None)


def test_sigterm_with_a_client_that_never_reads_exits_within_the_shutdown_timeout(tmp_path):
    s = Server(tmp_path, "--shutdown-timeout", "2")
    sock = socket.create_connection(("127.0.0.1", s.port))
    try:
        # 64 choices of 480 tokens with 4 sequences at a time: far longer than the timeout
        body = json.dumps(
            {"model": "tiny", "prompt": "x", "max_tokens": 480, "n": 64, "stream": True, "ignore_eos": True}
        ).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)  # and never reads a byte
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _sample(_metrics(s), "spyre_cb_requests_running") == 0:
            time.sleep(0.05)
        assert _sample(_metrics(s), "spyre_cb_requests_running") > 0
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(2 + 10)
        took = time.monotonic() - t0
        assert code == 0, s.log()
        assert took < 2 + 5, f"exited {took:.1f} s after SIGTERM"
        assert "Traceback" not in s.log()
    finally:
        sock.close()
        s.stop()


def test_sigterm_lets_a_request_in_flight_finish(tmp_path):
    s = Server(tmp_path, "--shutdown-timeout", "30")
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 400, "n": 8, "temperature": 0, **EXTRA}

        async def main() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(base_url=s.base, headers=AUTH, timeout=60) as c:
                pending = asyncio.ensure_future(c.post("/v1/completions", json=body))
                while _sample(_metrics(s), "spyre_cb_requests_running") == 0:
                    await asyncio.sleep(0.02)
                t0 = time.monotonic()
                s.proc.send_signal(signal.SIGTERM)  # mid-request (~1 s of steps)
                return await asyncio.wait_for(pending, 30), t0

        r, t0 = asyncio.run(main())
        assert r.status_code == 200
        assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 8
        assert r.json()["usage"]["completion_tokens"] == 8 * 400
        assert s.proc.wait(15) == 0
        assert time.monotonic() - t0 < 15  # it ended when its last request did, not at the timeout
    finally:
        s.stop()


def _tp_worker(server_pid: int) -> int:
    """The pid of the server's spawned tensor-parallel worker."""
    workers = spawned_children(server_pid)
    assert workers, "no tensor-parallel worker found"
    return workers[0]


def test_a_dead_engine_is_visible_health_503_and_requests_in_flight_end_with_an_error(tmp_path):
    s = Server(tmp_path, "--tensor-parallel-size", "2", "--max-model-len", "512")
    try:
        worker = _tp_worker(s.proc.pid)

        async def streamed() -> list[str]:
            body = {"model": "tiny", "prompt": "a", "max_tokens": 400, "stream": True, **EXTRA}
            events = []
            async with httpx.AsyncClient(base_url=s.base, headers=AUTH, timeout=60) as c:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 3:
                                os.kill(worker, signal.SIGKILL)  # mid-stream
            return events

        async def plain() -> httpx.Response:
            body = {"model": "tiny", "prompt": "b", "max_tokens": 400, **EXTRA}
            async with httpx.AsyncClient(base_url=s.base, headers=AUTH, timeout=60) as c:
                return await c.post("/v1/completions", json=body)

        async def main() -> tuple[list[str], httpx.Response]:
            return await asyncio.wait_for(asyncio.gather(streamed(), plain()), 60)

        t0 = time.monotonic()
        events, response = asyncio.run(main())
        assert time.monotonic() - t0 < 30
        assert "[DONE]" not in events
        err = json.loads(events[-1])["error"]
        assert err["code"] == 503 and err["type"] == "engine_dead_error"
        assert "rank 1" in err["message"] and "died" in err["message"], err
        assert response.status_code == 503
        assert "engine is dead" in response.json()["error"]["message"]
        health = httpx.get(s.base + "/health", timeout=5)
        assert health.status_code == 503
        assert set(health.json()["error"]) == {"message", "type", "param", "code"}
        assert "rank 1" in health.json()["error"]["message"]
        new = httpx.post(
            s.base + "/v1/completions", json={"model": "tiny", "prompt": "c", "max_tokens": 2}, headers=AUTH, timeout=10
        )
        assert new.status_code == 503 and new.json()["error"]["type"] == "engine_dead_error"
        assert _sample(_metrics(s), "spyre_cb_engine_dead") == 1
    finally:
        s.stop()


def test_a_worker_dying_while_the_server_is_idle_fails_health(tmp_path):
    s = Server(tmp_path, "--tensor-parallel-size", "2", "--max-model-len", "256")
    try:
        os.kill(_tp_worker(s.proc.pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(s.base + "/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.base + "/health", timeout=5).status_code == 503
        assert _sample(_metrics(s), "spyre_cb_engine_dead") == 1
    finally:
        s.stop()
