"""Tool calling on the chat endpoint: ``tool_choice`` "required" and a named
function constrain the output to calls whose arguments validate against the
tools' schemas; "auto" parses the model's text with the server's
``--tool-call-parser`` (hermes, granite); streamed tool-call deltas
concatenate to the non-streamed calls. Server tests drive ``spyre-cb serve``
(a subprocess on a free loopback port) with the real ``openai`` client."""

from __future__ import annotations

import json
import random

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")

from spyre_cb.server.errors import APIError  # noqa: E402
from spyre_cb.server.tools import PARSERS, tool_choice  # noqa: E402
from test_server import Server  # noqa: E402

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("tools"),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--disable-any-whitespace",
    )
    yield s
    s.stop()


def _valid_calls(calls) -> list[tuple[str, dict]]:
    out = []
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


# ----- constrained: required and named ------------------------------------------------


def test_required_gives_calls_that_validate(server):
    client = server.client()
    for seed in range(6):
        r = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=128,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        _valid_calls(choice.message.tool_calls)
    # parallel calls (the default): every complete call validates
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=192, seed=3, n=4
    )
    for choice in r.choices:
        calls = choice.message.tool_calls
        assert calls, choice
        if choice.finish_reason == "tool_calls":
            _valid_calls(calls)
        else:  # cut at max_tokens: every call but the last is complete
            assert choice.finish_reason == "length"
            _valid_calls(calls[:-1])


def test_a_named_function_is_called_with_valid_arguments(server):
    client = server.client()
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=64,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        [(name, args)] = _valid_calls(choice.message.tool_calls)
        assert name == "get_weather" and args["city"] in ("Paris", "Rome", "Oslo")


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "add"}}], ids=["required", "named"]
)
def test_streamed_tool_call_deltas_concatenate_to_the_call(server, choice):
    client = server.client()
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=128, seed=11, temperature=1)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    n_arg_deltas = 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            assert not c.delta.content
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert call["id"] is None, "a call's id and name come once"
                    call["id"], call["name"] = d.id, d.function.name
                call["arguments"] += d.function.arguments or ""
                n_arg_deltas += bool(d.function.arguments)
            finish = c.finish_reason or finish
    assert finish == whole.finish_reason
    got = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(calls[i]["id"].startswith("call_") for i in calls)
    assert n_arg_deltas > 1, "the arguments stream as they are generated, not in one piece"


# ----- auto: the model's text parsed ----------------------------------------------------


def test_auto_parses_hermes_calls_from_the_text(server):
    """The model's text is forced (a regex) into a hermes call after some content; the
    server's hermes parser turns it into tool_calls, streamed and not."""
    client = server.client()
    regex = (
        r'Sure\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "C"\}\}</tool_call>'
    )
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=96, seed=5, extra_body={"guided_regex": regex})
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure."
    [(name, args)] = _valid_calls(choice.message.tool_calls)
    assert name == "get_weather" and args["unit"] == "C"
    content, tool_deltas, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            tool_deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content == "Sure." and "<tool_call>" not in content and finish == "tool_calls"
    assert [(d.function.name, d.function.arguments) for d in tool_deltas] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_auto_without_a_call_is_plain_text_and_none_is_never_parsed(server):
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=8, seed=1)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    regex = r'<tool_call>\{"name": "add", "arguments": \{"a": 1, "b": 2\}\}</tool_call>'
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=64, extra_body={"guided_regex": regex}
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content.startswith("<tool_call>")


def test_a_conversation_with_calls_and_results_renders(server):
    client = server.client()
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].finish_reason == "length"


# ----- refused ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,words",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, ["nope", "not among"]),
        ({"tool_choice": "required"}, ["tool_choice needs tools"]),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, ["tool_choice must be"]),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"}, ["name"]),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, ["tools[0]"]),
        ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, ["twice"]),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            ["one output constraint", "tool_choice"],
        ),
    ],
)
def test_tool_requests_refused_with_a_400_naming_the_field(server, extra, words):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **extra)
    for w in words:
        assert w in str(e.value), e.value


# ----- the parsers and the stream readers (no server) ------------------------------------------


def _choice(mode, **kw):
    return tool_choice(TOOLS, mode, parser=kw.pop("parser", "hermes"), **kw)


def _stream(choice, text: str, seed: int):
    """Feeds ``text`` in random pieces; returns (streamed content, calls from the deltas, whole message)."""
    s = choice.stream()
    rng = random.Random(seed)
    deltas = []
    at = 0
    while at < len(text):
        k = rng.randint(1, 6)
        deltas.append(s.feed(text[at : at + k]))
        at += k
    deltas.append(s.finish())
    content = "".join(d.get("content", "") for d in deltas if d)
    calls: dict[int, dict] = {}
    for d in deltas:
        for t in (d or {}).get("tool_calls", []):
            c = calls.setdefault(t["index"], {"name": None, "arguments": ""})
            c["name"] = t.get("function", {}).get("name") or c["name"]
            c["arguments"] += t["function"].get("arguments", "")
    return content, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], s.message()


def test_hermes_parser_on_a_hand_written_output():
    text = (
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    )
    content, calls = PARSERS["hermes"].parse(text)
    assert content == "Let me check both.\n"
    assert calls == [("get_weather", '{"city": "Paris", "unit": "C"}'), ("add", '{"a": 1, "b": 2}')]
    for seed in range(20):  # streamed in any pieces: the same message
        streamed, deltas, message = _stream(_choice("auto"), text, seed)
        assert streamed == message["content"] == content
        assert deltas == calls == [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    # a call that does not parse leaves the text as content; no marker, no call
    assert PARSERS["hermes"].parse("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    streamed, deltas, message = _stream(_choice("auto"), "a <tool_c but no call", 3)
    assert streamed == message["content"] == "a <tool_c but no call" and deltas == []
    # parallel_tool_calls false keeps the first call
    _, deltas, _ = _stream(_choice("auto", parallel=False), text, 0)
    assert [name for name, _ in deltas] == ["get_weather"]


def test_granite_parser_both_formats():
    for prefix in ("<|tool_call|>", "<tool_call>", " "):
        text = prefix + '[{"name": "add", "arguments": {"a": 3, "b": 4}}]'
        assert PARSERS["granite"].parse(text) == (None, [("add", '{"a": 3, "b": 4}')])
        streamed, deltas, message = _stream(_choice("auto", parser="granite"), text, 1)
        assert streamed == "" and message["content"] is None and deltas == [("add", '{"a": 3, "b": 4}')]
    assert PARSERS["granite"].parse("It is sunny.") == ("It is sunny.", [])
    streamed, _, message = _stream(_choice("auto", parser="granite"), "It is [sunny].", 2)
    assert streamed == message["content"] == "It is [sunny]."


def test_required_stream_reads_the_array_as_it_grows():
    text = '[{"name": "add", "parameters": {"a": 1, "b": {"x": "}]\\""}}}, {"name": "get_weather", "parameters": {}}]'
    for seed in range(20):
        streamed, deltas, message = _stream(_choice("required"), text, seed)
        assert streamed == "" and message["content"] is None
        assert deltas == [("add", '{"a": 1, "b": {"x": "}]\\""}}'), ("get_weather", "{}")]
        assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]][1] == {}


def test_tool_choice_none_and_unknown_modes():
    assert tool_choice(None, None, parser=None) is None
    assert tool_choice(TOOLS, "none", parser=None).constraint() is None
    with pytest.raises(APIError, match="enable-auto-tool-choice"):
        tool_choice(TOOLS, None, parser=None)  # "auto", the default with tools, needs the flags


# ----- the openai client's own helpers: parse() with pydantic models ----------------------


def test_openai_parse_helpers_get_valid_objects(server):
    """``chat.completions.parse`` sends a pydantic model as response_format json_schema
    (strict) and parses the reply; ``pydantic_function_tool`` makes a tool whose call
    it parses into the model. Both succeed on every seed."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: Literal["Paris", "Rome", "Oslo"]
        unit: Literal["C", "F"]
        days: int = Field(ge=1, le=7)

    class GetWeather(BaseModel):
        city: Literal["Paris", "Rome"]

    client = server.client()
    if not hasattr(client.chat.completions, "parse"):
        pytest.skip("this openai client has no chat.completions.parse")
    for seed in range(4):
        r = client.chat.completions.parse(
            model="tiny", messages=ASK, response_format=Forecast, max_tokens=64, seed=seed
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Forecast), choice
        assert 1 <= choice.message.parsed.days <= 7
        r = client.chat.completions.parse(
            model="tiny",
            messages=ASK,
            tools=[openai.pydantic_function_tool(GetWeather)],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=64,
            seed=seed,
        )
        [call] = r.choices[0].message.tool_calls
        assert isinstance(call.function.parsed_arguments, GetWeather)
