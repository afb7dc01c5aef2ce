"""The OpenAI-compatible server, started as a user starts it (``spyre-cb serve``
in a subprocess on a free loopback port) and driven with the real ``openai``
client. Every wait is bounded; the server is stopped at the end."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

import spyre_cb  # noqa: E402
from spyre_cb import SamplingParams  # noqa: E402

API_KEY = "sk-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, key: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    def __init__(self, tmp_path, *extra: str, model: str = "tiny") -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, SPYRE_CB_CACHE=str(tmp_path))
        args = ["serve", model, "--port", str(self.port), "--api-key", API_KEY, "--max-num-seqs", "4"]
        #: the server's stdout and stderr (the access log among them): a file, never a pipe nobody reads
        self.log_path = tmp_path / f"server-{self.port}.log"
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spyre_cb", *args, *extra], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()}")
            try:
                if _get(self.base + "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("server did not come up in 120 s")

    def log(self) -> str:
        return self.log_path.read_text()

    def metric(self, name: str) -> float:
        _, text = _get(self.base + "/metrics")
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def wait_metric(self, name: str, value: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric(name) == value:
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} stayed {self.metric(name)}, expected {value}")

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=API_KEY, max_retries=0, timeout=60, **kw)

    def async_client(self):
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """LLM.generate on the same tiny model: what the server must answer."""
    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path_factory.mktemp("ref")))
    llm = spyre_cb.LLM("tiny", max_num_seqs=4)

    def run(prompt: str, n: int, **kw) -> str:
        p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)
        return llm.generate([prompt], p, use_tqdm=False)[0].outputs[0].text

    return run


PROMPTS = ["Hello there, how are", "The quick brown fox", "def add(a, b):"]
EXTRA = {"ignore_eos": True}


def test_completions_match_llm_generate(server, reference):
    c = server.client()
    for p in PROMPTS:
        r = c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, extra_body=EXTRA)
        assert r.choices[0].text == reference(p, 12)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_completion_and_usage(server, reference):
    c = server.client()
    stream = c.completions.create(
        model="tiny",
        prompt=PROMPTS[0],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXTRA,
    )
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert text == reference(PROMPTS[0], 10)
    assert reasons[-1] == "length" and usage.completion_tokens == 10


def test_chat_streaming_and_not(server, tmp_path_factory):
    c = server.client()
    msgs = [{"role": "user", "content": "Say something"}]
    full = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, extra_body=EXTRA)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 8
    parts = c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True, extra_body=EXTRA
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices)
    assert text == full.choices[0].message.content
    # the same as LLM.chat on the same model
    llm = spyre_cb.LLM("tiny", max_num_seqs=4)
    want = llm.chat(msgs, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert want[0].outputs[0].text == text


def test_stop_strings_never_leak(server, reference):
    c = server.client()
    base = reference(PROMPTS[1], 16)
    stop = base[5:8]  # a string the greedy output contains
    r = c.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop], extra_body=EXTRA
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    streamed = c.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop], stream=True, extra_body=EXTRA
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == r.choices[0].text


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        c.completions.create(model="tiny", prompt="x " * 10, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert _get(server.base + "/v1/models")[0] == 401  # no key at all
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="still here", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_client_disconnect_aborts_and_returns_blocks(server):
    c = server.client()
    stream = c.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=400, temperature=0, stream=True, extra_body=EXTRA
    )
    got = 0
    for _chunk in stream:
        got += 1
        if got == 3:
            break
    assert server.metric("spyre_cb_requests_running") >= 0
    stream.close()  # the client goes away mid-stream
    server.wait_metric("spyre_cb_requests_running", 0.0)
    server.wait_metric("spyre_cb_kv_blocks_used", 0.0)
    _, text = _get(server.base + "/metrics")
    assert 'spyre_cb_requests_finished_total{finish_reason="abort"}' in text


def test_32_concurrent_streams_complete_and_nothing_leaks(server):
    async def one(client, i):
        stream = await client.completions.create(
            model="tiny", prompt=f"request {i} says", max_tokens=6 + i % 5, temperature=0, stream=True, extra_body=EXTRA
        )
        n = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                n += 1
        return n

    async def main():
        client = server.async_client()
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(32))), 240)
        finally:
            await client.close()

    assert asyncio.run(main()) == [1] * 32
    server.wait_metric("spyre_cb_requests_running", 0.0)
    server.wait_metric("spyre_cb_requests_waiting", 0.0)
    server.wait_metric("spyre_cb_kv_blocks_used", 0.0)


def test_max_waiting_answers_503(tmp_path):
    s = Server(tmp_path, "--max-waiting", "0")
    try:
        with pytest.raises(openai.APIStatusError) as e:
            s.client().completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        s.stop()
