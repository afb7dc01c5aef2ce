"""The server as a front door: every field a client sends has its effect (checked
against LLM.generate on the same model, not just a 200) or is refused with a
400 naming it, and one client's input cannot hurt the others. The server runs
as users start it (``spyre-cb serve`` in a subprocess on a free loopback
port), driven with the real ``openai`` client and ``httpx``; every wait is
bounded."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import spyre_cb  # noqa: E402
from spyre_cb import SamplingParams  # noqa: E402
from test_server import API_KEY, Server  # noqa: E402

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("front"), "--max-waiting", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path_factory.mktemp("ref")))
    return spyre_cb.LLM("tiny", max_num_seqs=4)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def _error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status
    for w in words:
        assert w in body["error"]["message"], body
    return body["error"]


# ----- logprobs, echo, prompt logprobs ---------------------------------------------


def test_completion_logprobs_equal_llm_generate(server, llm):
    prompt = "The quick brown fox"
    r = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    ref = llm.generate([prompt], SamplingParams(max_tokens=6, logprobs=3, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for got, tok, pos, top in zip(lp.token_logprobs, ref.token_ids, ref.logprobs, lp.top_logprobs):
        assert abs(got - pos[tok].logprob) < 1e-4
        assert len(top) >= 3 and max(top.values()) >= got - 1e-6  # the top-k and the chosen token
    assert lp.text_offset == sorted(lp.text_offset) and "".join(lp.tokens) == r.choices[0].text


def test_echo_returns_the_prompt_and_its_logprobs(server, llm, http):
    ids = llm.get_tokenizer()("Hello there, how are you").input_ids
    # lm-eval's loglikelihood request, as it sends it
    body = {"model": "tiny", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(llm.get_tokenizer().decode(ids))
    assert len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1, **GREEDY), use_tqdm=False)[
        0
    ].prompt_logprobs
    for got, tok, pos in zip(lp["token_logprobs"][1 : len(ids)], ids[1:], ref[1:]):
        assert abs(got - pos[tok].logprob) < 1e-4
    # what lm-eval then computes: the continuation's logprob and whether it is greedy
    ctxlen = 3
    cont = lp["token_logprobs"][ctxlen : len(ids)]
    assert all(isinstance(x, float) and x <= 0 for x in cont) and math.isfinite(sum(cont))
    for tok, top in zip(lp["tokens"][ctxlen : len(ids)], lp["top_logprobs"][ctxlen : len(ids)]):
        assert tok in top or len(top) >= 1


def test_prompt_logprobs_extra(server, llm, http):
    ids = llm.get_tokenizer()("def add(a, b):").input_ids
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 2, "prompt_logprobs": 2, **GREEDY})
    got = r.json()["choices"][0]["prompt_logprobs"]
    ref = llm.generate([ids], SamplingParams(max_tokens=2, prompt_logprobs=2, **GREEDY), use_tqdm=False)[
        0
    ].prompt_logprobs
    assert got[0] is None and len(got) == len(ids)
    for g, tok, pos in zip(got[1:], ids[1:], ref[1:]):
        assert abs(g[str(tok)]["logprob"] - pos[tok].logprob) < 1e-4


def test_chat_logprobs_streamed_and_not(server, llm):
    c = server.client()
    msgs = [{"role": "user", "content": "Name a colour"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-6 and bytes(e.bytes).decode() == e.token
    ref = llm.chat(msgs, SamplingParams(max_tokens=5, logprobs=2, **GREEDY), use_tqdm=False)[0].outputs[0]
    for e, tok, pos in zip(content, ref.token_ids, ref.logprobs):
        assert abs(e.logprob - pos[tok].logprob) < 1e-4
    stream = c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=5, logprobs=True, top_logprobs=2, stream=True, **GREEDY
    )
    streamed = [e for ch in stream for choice in ch.choices if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


# ----- fields that change the output --------------------------------------------------


def test_logit_bias_forces_a_token(server):
    r = server.client().completions.create(
        model="tiny", prompt="Hello", max_tokens=4, logit_bias={"300": 100}, **GREEDY
    )
    tok = server.client().completions.create(model="tiny", prompt="Hello", max_tokens=4, **GREEDY)
    assert r.choices[0].text != tok.choices[0].text
    ids = httpx.post(server.base + "/tokenize", json={"prompt": r.choices[0].text, "add_special_tokens": False}).json()
    assert set(ids["tokens"]) == {300}


def test_skip_special_tokens_false_shows_them(server, llm):
    eos = llm.get_tokenizer().eos_token_id
    kw = dict(model="tiny", prompt="Hi", max_tokens=2, **GREEDY)
    extra = {"logit_bias": {str(eos): 100}, "ignore_eos": True}
    hidden = server.client().completions.create(**kw, extra_body=extra)
    shown = server.client().completions.create(**kw, extra_body={**extra, "skip_special_tokens": False})
    assert hidden.choices[0].text == "" and shown.choices[0].text == llm.get_tokenizer().eos_token * 2


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, llm):
    c = server.client()
    r = c.completions.create(
        model="tiny",
        prompt="one two three four five six",
        max_tokens=3,
        extra_body={"truncate_prompt_tokens": 3},
        **GREEDY,
    )
    assert r.usage.prompt_tokens == 3
    ids = llm.get_tokenizer()("one two three four five six").input_ids[-3:]
    assert r.choices[0].text == c.completions.create(model="tiny", prompt=ids, max_tokens=3, **GREEDY).choices[0].text


def test_continuous_usage_stats_in_every_chunk(server):
    stream = server.client().completions.create(
        model="tiny",
        prompt="Count",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        **GREEDY,
    )
    chunks = list(stream)
    with_choice = [c for c in chunks if c.choices]
    assert with_choice and all(c.usage is not None for c in with_choice)
    assert [c.usage.completion_tokens for c in with_choice] == sorted(c.usage.completion_tokens for c in with_choice)
    assert chunks[-1].usage.completion_tokens == 5


def test_chat_content_parts_render_like_the_same_text(server, http):
    as_text = {"messages": [{"role": "user", "content": "Hello\nworld"}]}
    as_parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}
        ]
    }
    a = http.post("/tokenize", json=as_text).json()
    b = http.post("/tokenize", json=as_parts).json()
    assert a["tokens"] == b["tokens"] and a["count"] < 40
    r = http.post("/v1/chat/completions", json={**as_parts, "max_tokens": 3, **GREEDY})
    assert r.json()["usage"]["prompt_tokens"] == a["count"]
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    _error(http.post("/v1/chat/completions", json=bad), 400, "only text parts", "image_url")


def test_chat_template_options(server, http):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    base = http.post("/tokenize", json={"messages": msgs[:1]}).json()["tokens"]
    no_prompt = http.post("/tokenize", json={"messages": msgs[:1], "add_generation_prompt": False}).json()["tokens"]
    assert len(no_prompt) < len(base) and base[: len(no_prompt)] == no_prompt
    cont = http.post(
        "/tokenize", json={"messages": msgs, "add_generation_prompt": False, "continue_final_message": True}
    ).json()["tokens"]
    closed = http.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()["tokens"]
    assert len(cont) < len(closed)  # the final message is left open
    custom = http.post("/tokenize", json={"messages": msgs[:1], "chat_template": "{{ messages[0]['content'] }}"}).json()
    assert custom["count"] <= 2
    kw = http.post(
        "/v1/chat/completions",
        json={
            "messages": msgs[:1],
            "max_tokens": 1,
            "chat_template": "{{ prefix }}{{ messages[0]['content'] }}",
            "chat_template_kwargs": {"prefix": "System says: "},
        },
    )
    assert kw.json()["usage"]["prompt_tokens"] > custom["count"]
    both = {"messages": msgs, "add_generation_prompt": True, "continue_final_message": True}
    _error(http.post("/v1/chat/completions", json=both), 400, "continue_final_message")


# ----- refused, never ignored ----------------------------------------------------------


@pytest.mark.parametrize(
    "path,extra,words",
    [
        ("/v1/completions", {"best_of": 2}, ["best_of"]),
        ("/v1/completions", {"suffix": "x"}, ["suffix"]),
        ("/v1/completions", {"use_beam_search": True, "stream": True}, ["stream", "use_beam_search"]),
        ("/v1/completions", {"use_beam_search": True, "top_p": 0.5, "logprobs": 2}, ["top_p, logprobs"]),
        (
            "/v1/chat/completions",
            {"use_beam_search": True, "response_format": {"type": "json_object"}},
            ["response_format"],
        ),
        ("/v1/completions", {"use_beam_search": True, "n": 3, "best_of": 2}, ["best_of 2", "n 3"]),
        ("/v1/completions", {"length_penalty": 2.0}, ["length_penalty", "use_beam_search"]),
        ("/v1/completions", {"logprobs": 21}, ["logprobs", "20"]),
        ("/v1/completions", {"guided_regex": "a+", "guided_choice": ["x"]}, ["one output constraint"]),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, ["json_schema.schema"]),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, ["response_format", "xml"]),
        ("/v1/completions", {"guided_regex": "(unclosed"}, ["regex"]),
        ("/v1/completions", {"structured_outputs": {"colour": "red"}}, ["structured_outputs"]),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            ["enable-auto-tool-choice"],
        ),
        ("/v1/chat/completions", {"top_logprobs": 2}, ["logprobs"]),
        ("/v1/completions", {"prompt": [1, True, 3]}, ["JSON integers"]),
        ("/v1/completions", {"prompt": [1, 2.0]}, ["JSON integers"]),
        ("/v1/completions", {"stop_token_ids": [True]}, ["stop_token_ids"]),
        ("/v1/completions", {"stop": ["a"] * 65}, ["64"]),
        ("/v1/completions", {"stop": ["x" * 2000]}, ["1024"]),
        ("/v1/completions", {"repetition_penalty": 1e-300}, ["repetition_penalty", "0.01"]),
        ("/v1/completions", {"max_tokens": None, "min_tokens": 600}, ["min_tokens 600", "fit"]),
        ("/v1/completions", {"logit_bias": {"99999999": 5}}, ["logit_bias", "vocabulary"]),
        ("/v1/completions", {"prompt": "ab\ud800"}, ["not valid Unicode", "character 2"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\udfff"}]}, ["not valid Unicode"]),
    ],
)
def test_refused_with_a_400_naming_the_field(http, path, extra, words):
    body = {"prompt": "Hi", "max_tokens": 2} if "completions" in path and "chat" not in path else {}
    if "chat" in path:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    # as JSON text with \u escapes (a lone surrogate is valid JSON, though not valid UTF-8)
    payload = json.dumps({**body, **extra}).encode()
    _error(http.post(path, content=payload, headers={"content-type": "application/json"}), 400, *words)


def test_accepted_as_vllm_accepts_them(server, http):
    ok = [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),  # no model: the served one
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "frobnicate": 1, "user": "u1"}),  # logged, unused
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 2, "seed": 2**64 - 1}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "best_of": 1}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "text"}},
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "none",
            },
        ),
    ]
    for path, body in ok:
        r = http.post(path, json={"max_tokens": 2, **body})
        assert r.status_code == 200, (path, body, r.text)
    deadline = time.monotonic() + 10
    while "frobnicate, user" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "fields this server does not use, ignored: frobnicate, user" in server.log()
    seeds = http.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 2, "seed": 2**64 - 1, "temperature": 1}
    )
    assert len(seeds.json()["choices"]) == 2


def test_every_http_error_is_openai_shaped(server, http):
    _error(http.get("/nope"), 404, "Not Found")
    _error(http.delete("/v1/completions"), 405)
    _error(http.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"}), 400, "JSON")
    _error(http.post("/v1/completions", json={"max_tokens": 2}), 400, "prompt")
    _error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "gpt-4")
    _error(httpx.post(server.base + "/v1/completions", json={"prompt": "x"}), 401)
    assert http.get("/docs").status_code == 404  # no page that loads assets from a CDN


def test_tokenizer_endpoints(server, llm, http):
    tok = llm.get_tokenizer()
    t = http.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True}).json()
    assert t["tokens"] == tok("Hello there").input_ids and t["count"] == len(t["tokens"]) and t["max_model_len"] == 512
    assert t["token_strs"] == tok.convert_ids_to_tokens(t["tokens"])
    assert http.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": tok.decode(t["tokens"])}
    _error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "vocabulary")
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] and info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert http.get("/version").json() == {"version": spyre_cb.__version__}


# ----- one client cannot hurt the others -------------------------------------------------


def test_a_huge_body_or_prompt_is_refused_fast_while_others_are_served(server, http):
    stop = threading.Event()
    worst = []

    def probe():
        while not stop.is_set():
            t = time.monotonic()
            assert httpx.get(server.base + "/health", timeout=10).status_code == 200
            worst.append(time.monotonic() - t)
            time.sleep(0.02)

    th = threading.Thread(target=probe)
    th.start()
    try:
        t = time.monotonic()
        _error(http.post("/v1/completions", json={"prompt": "x" * 10_000_000, "max_tokens": 2}), 413, "8388608")
        _error(http.post("/v1/completions", json={"prompt": "word " * 200_000, "max_tokens": 2}), 400, "characters")
        assert time.monotonic() - t < 10
    finally:
        stop.set()
        th.join(15)
    assert worst and max(worst) < 2.0, max(worst)


def test_max_waiting_counts_every_sequence(tmp_path):
    s = Server(tmp_path, "--max-waiting", "4")
    try:
        with httpx.Client(base_url=s.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            # 3 prompts x n=2 = 6 sequences: more than 4 may wait, refused whole
            _error(c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}), 503, "6")
            assert c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2}).status_code == 200
            _error(c.post("/v1/completions", json={"prompt": ["a"] * 300, "max_tokens": 1}), 400, "256")
    finally:
        s.stop()


def test_lm_eval_generate_until_shape(http):
    body = {
        "model": "tiny",
        "prompt": ["Question: 2+2?\nAnswer:", "Question: 3+3?\nAnswer:"],
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["\n\n", "Question:"],
        "seed": 1234,
    }
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for c in out["choices"]:
        assert isinstance(c["text"], str) and "Question:" not in c["text"] and c["finish_reason"] in ("stop", "length")
    json.dumps(out)  # plain JSON all the way down


def test_llm_refuses_a_lone_surrogate(llm):
    with pytest.raises(spyre_cb.InvalidRequestError, match="not valid Unicode"):
        llm.generate(["ab\ud800"], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(spyre_cb.InvalidRequestError, match="not valid Unicode"):
        llm.chat([{"role": "user", "content": "\udfff"}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.generate(["ab"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_a_request_the_engine_ends_alone_is_an_error_the_client_reads(tmp_path):
    """In process (the app over ASGI): one request's sampling fails; the client gets
    an OpenAI error naming why (500, or an error event when streamed), the other
    request of the same batch its text."""
    import asyncio

    from spyre_cb.async_engine import AsyncEngine
    from spyre_cb.server import build_app

    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path))
    engine = AsyncEngine(spyre_cb.Engine("tiny", max_num_seqs=4))
    real = engine.engine.sampler.sample

    def failing(logits, rows):
        out = real(logits, rows)
        for i, r in enumerate(rows):
            if r.params.seed == 666:
                out.errors[i] = "sampling failed: injected for this test"
        return out

    engine.engine.sampler.sample = failing
    app = build_app(engine, served_model_name="tiny")

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            bad = {"prompt": "Hi", "max_tokens": 4, "seed": 666}
            good = {"prompt": "Hi", "max_tokens": 4, "seed": 1}
            rb, rg = await asyncio.gather(c.post("/v1/completions", json=bad), c.post("/v1/completions", json=good))
            _error(rb, 500, "injected for this test")
            assert rg.status_code == 200 and rg.json()["choices"][0]["finish_reason"] == "length"
            r = await c.post("/v1/completions", json={**bad, "stream": True})
            events = [line for line in r.text.splitlines() if line.startswith("data: ")]
            assert "injected for this test" in events[-1] and "[DONE]" not in r.text

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_structured_outputs_through_every_body_field(http):
    """response_format, vLLM's structured_outputs and guided_* fields constrain the output."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    chat = {"messages": [{"role": "user", "content": "Give JSON"}], "max_tokens": 96}
    for seed in range(4):
        body = {**chat, "seed": seed, "structured_outputs": {"json": schema, "disable_any_whitespace": True}}
        r = http.post("/v1/chat/completions", json=body).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        obj = json.loads(choice["message"]["content"])
        assert set(obj) == {"name", "n"} and isinstance(obj["n"], int) and len(obj["name"]) <= 8
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    r = http.post("/v1/chat/completions", json={**chat, "response_format": fmt, "temperature": 0}).json()["choices"][0]
    if r["finish_reason"] == "stop":  # free whitespace may not end within max_tokens on a random model
        assert set(json.loads(r["message"]["content"])) == {"name", "n"}
    r = http.post("/v1/completions", json={"prompt": "Pick", "max_tokens": 16, "guided_choice": ["red", "blue"]})
    assert r.json()["choices"][0]["text"] in ("red", "blue")
    r = http.post("/v1/completions", json={"prompt": "Code", "max_tokens": 16, "guided_regex": "[a-c]{3}-[0-9]{2}"})
    import re

    assert re.fullmatch("[a-c]{3}-[0-9]{2}", r.json()["choices"][0]["text"])


def test_grammars_compile_off_the_event_loop(tmp_path):
    """The handler compiles a request's grammar in a worker thread first; the
    engine's add_request (on the event loop) then finds it cached."""
    import asyncio

    from spyre_cb.async_engine import AsyncEngine
    from spyre_cb.server import build_app

    os.environ.setdefault("SPYRE_CB_CACHE", str(tmp_path))
    engine = AsyncEngine(spyre_cb.Engine("tiny", max_num_seqs=2))
    app = build_app(engine, served_model_name="tiny")
    loop_threads: set[int] = set()
    compiled_in: set[int] = set()
    grammars = engine.engine.grammars
    real = grammars._compile

    def spy(key):
        compiled_in.add(threading.get_ident())
        return real(key)

    grammars._compile = spy

    async def run():
        loop_threads.add(threading.get_ident())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            body = {"prompt": "Code", "max_tokens": 12, "guided_regex": "[x-z]{2}[0-9]{3}"}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    assert compiled_in and not (compiled_in & loop_threads), "compiled on the event loop"
    assert grammars.misses == 1 and grammars.hits >= 1  # the engine's own compile was a cache hit
