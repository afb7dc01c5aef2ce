"""Tool calling on the chat endpoint: OpenAI's ``tools`` and ``tool_choice``,
with vLLM's behaviour.

- ``tool_choice`` ``"required"``: the output is constrained (a grammar) to a
  JSON array of calls ``[{"name": ..., "parameters": {...}}, ...]``, each
  naming one of the tools with arguments valid for its ``parameters`` schema;
- a named function (``{"type": "function", "function": {"name": N}}``): the
  output is constrained to ``N``'s arguments (a JSON object);
- ``"auto"`` (the default when tools are given): no constraint; the model's
  text is parsed into calls by the server's ``--tool-call-parser``
  (``hermes`` or ``granite``), which needs ``--enable-auto-tool-choice``,
  else the request is a 400 (as vLLM refuses it);
- ``"none"``: no constraint and no parsing.

Every call's ``function.arguments`` is the JSON text of its arguments: the
model's own text for a constrained call (a stream's argument deltas
concatenate to exactly it), ``json.dumps`` of the parsed arguments for a
parsed one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from spyre_cb.server.errors import APIError
from spyre_cb.server.options import TOOL_CALL_PARSERS
from spyre_cb.structured import StructuredOutputsParams

#: OpenAI's rule for function names.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

Mode = Literal["none", "auto", "required", "named"]


def _bad(message: str, param: str = "tools") -> APIError:
    return APIError(400, message, "invalid_request_error", param)


@dataclass(frozen=True)
class ToolChoice:
    """What a chat request's ``tools`` and ``tool_choice`` ask for (validated)."""

    mode: Mode
    #: name -> parameters schema, in the request's order
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the named function (mode ``named``)
    name: str | None = None
    #: the text format of ``auto`` calls (mode ``auto``)
    parser: str | None = None
    #: more than one call per message (OpenAI's ``parallel_tool_calls``)
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self, disable_any_whitespace: bool = False) -> StructuredOutputsParams | None:
        """The grammar the output must match (``required`` and named functions only)."""
        no_ws = disable_any_whitespace
        if self.mode == "named":
            assert self.name is not None
            return StructuredOutputsParams(json=self.functions[self.name], disable_any_whitespace=no_ws)
        if self.mode == "required":
            calls = [
                {
                    "type": "object",
                    # "name" first: the grammar keeps the schema's order, and the stream reads it first
                    "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, params in self.functions.items()
            ]
            schema: dict[str, Any] = {"type": "array", "minItems": 1}
            schema["items"] = calls[0] if len(calls) == 1 else {"anyOf": calls}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema, disable_any_whitespace=no_ws)
        return None

    def stream(self) -> ToolCallStream:
        """The per-choice reader of the model's text into calls."""
        if self.mode == "named":
            return _NamedStream(self)
        if self.mode == "required":
            return _RequiredStream(self)
        if self.mode == "auto":
            return _AutoStream(self)
        return ToolCallStream(self)


def tool_choice(
    tools: list[dict[str, Any]] | None, choice: Any, *, parser: str | None, parallel: bool = True
) -> ToolChoice | None:
    """Validates a request's ``tools`` and ``tool_choice`` (400 naming the field);
    ``parser``: the server's ``--tool-call-parser`` when ``--enable-auto-tool-choice``
    is on, else None; ``parallel``: OpenAI's ``parallel_tool_calls`` (False: at most
    one call). None: the request has no tools."""
    if not tools:
        if choice not in (None, "none"):
            raise _bad("tool_choice needs tools: set tools, or leave tool_choice out", "tool_choice")
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _bad(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in functions:
            raise _bad(f"tools[{i}]: the function name {name!r} is given twice")
        params = fn.get("parameters", _NO_PARAMETERS)
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object, got {type(params).__name__}")
        functions[name] = params or _NO_PARAMETERS
    if choice is None:
        choice = "auto"  # OpenAI's default when tools are given
    if choice == "none":
        return ToolChoice("none", functions)
    if choice == "required":
        return ToolChoice("required", functions, parallel=parallel)
    if choice == "auto":
        if parser is None:
            raise _bad(
                'tool_choice "auto" (the default with tools) needs the server started with '
                "--enable-auto-tool-choice and --tool-call-parser; or send tool_choice "
                '"required", "none" or a named function',
                "tool_choice",
            )
        return ToolChoice("auto", functions, parser=parser, parallel=parallel)
    if isinstance(choice, dict) and choice.get("type", "function") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise _bad(f"tool_choice names the function {name!r}, which is not among tools", "tool_choice")
        return ToolChoice("named", functions, name=name)
    raise _bad(
        f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
        f"got {choice!r}",
        "tool_choice",
    )


# ----- calls --------------------------------------------------------------------------


def call_json(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """One entry of ``message.tool_calls``."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


class ToolCallStream:
    """Reads one choice's text as it grows into content and tool calls.

    ``feed(text)`` takes the newest text and returns the delta to stream
    (``{"content": ...}`` and/or ``{"tool_calls": [...]}``, or None);
    ``finish()`` returns the last delta, and then ``content``, ``calls`` and
    ``called`` describe the whole message. This base class (``none``) passes
    the text through as content."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.text = ""
        self._calls: list[_Call] = []
        self._sent_content = 0

    def feed(self, text: str) -> dict[str, Any] | None:
        self.text += text
        return {"content": text} if text else None

    def finish(self) -> dict[str, Any] | None:
        return None

    @property
    def content(self) -> str | None:
        return self.text

    @property
    def called(self) -> bool:
        """The message holds at least one call (``finish_reason`` ``tool_calls``)."""
        return bool(self._calls)

    def calls(self) -> list[dict[str, Any]]:
        return [call_json(c.id, c.name, c.arguments) for c in self._calls]

    def message(self) -> dict[str, Any]:
        """The non-streamed ``message`` (after ``finish``)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.called:
            msg["tool_calls"] = self.calls()
        return msg

    def _call_deltas(self, start: int) -> list[dict[str, Any]]:
        """Whole calls ``start..`` as stream deltas (id, name and all arguments at once)."""
        out = []
        for i in range(start, len(self._calls)):
            c = self._calls[i]
            out.append(
                {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            )
        return out


class _NamedStream(ToolCallStream):
    """The whole text is the named function's arguments (streamed as they grow)."""

    def __init__(self, choice: ToolChoice) -> None:
        super().__init__(choice)
        assert choice.name is not None
        self._calls = [_Call(_call_id(), choice.name)]
        self._started = False

    def feed(self, text: str) -> dict[str, Any] | None:
        self.text += text
        self._calls[0].arguments = self.text
        if not self._started:
            self._started = True
            c = self._calls[0]
            head = {"index": 0, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": text}}
            return {"tool_calls": [head]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else None

    def finish(self) -> dict[str, Any] | None:
        if not self._started:  # nothing was generated: the call still has its header
            return self.feed("")
        return None

    @property
    def content(self) -> str | None:
        return None


# the array of calls ``required`` constrains the output to, read as it grows
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]*)"\s*,\s*"parameters"\s*:\s*(?=\{)')
_ARRAY_OPEN = re.compile(r"\s*\[")
_NEXT = re.compile(r"\s*\}\s*(,|\])")


def _object_end(text: str, start: int) -> int | None:
    """The index after the JSON object that starts at ``text[start]`` (``{``), or
    None while it is incomplete."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class _RequiredStream(ToolCallStream):
    """The text is ``[{"name": N, "parameters": {...}}, ...]`` (the grammar sees to
    it): each call's header streams once its name is complete, then its
    arguments as they grow."""

    def __init__(self, choice: ToolChoice) -> None:
        super().__init__(choice)
        self._pos = 0  # where the next unread part of the array starts
        self._args_at: int | None = None  # where the current call's arguments start
        self._opened = False

    def feed(self, text: str) -> dict[str, Any] | None:
        self.text += text
        deltas: list[dict[str, Any]] = []
        while True:
            if not self._opened:
                m = _ARRAY_OPEN.match(self.text, self._pos)
                if m is None:
                    break
                self._opened, self._pos = True, m.end()
            if self._args_at is None:  # a call's header
                m = _CALL_HEAD.match(self.text, self._pos)
                if m is None:
                    break
                call = _Call(_call_id(), m.group(1))
                self._calls.append(call)
                self._args_at = m.end()
                i = len(self._calls) - 1
                deltas.append(
                    {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
                )
            call, i = self._calls[-1], len(self._calls) - 1
            end = _object_end(self.text, self._args_at)
            args = self.text[self._args_at : end if end is not None else len(self.text)]
            if len(args) > len(call.arguments):
                deltas.append({"index": i, "function": {"arguments": args[len(call.arguments) :]}})
                call.arguments = args
            if end is None:
                break
            m = _NEXT.match(self.text, end)
            if m is None:
                break
            call.complete = True
            self._args_at, self._pos = None, m.end()
            if m.group(1) == "]":
                break
        return {"tool_calls": deltas} if deltas else None

    @property
    def content(self) -> str | None:
        # cut short (max_tokens) before any call: the text is all there is
        return None if self._calls else self.text


class _AutoStream(ToolCallStream):
    """Unconstrained text parsed by the server's tool-call parser: content streams
    until the text may start a call; from there it is held, and at the end
    parsed into calls (or, if it does not parse, sent as content)."""

    def __init__(self, choice: ToolChoice) -> None:
        super().__init__(choice)
        self.parse = PARSERS[choice.parser or "hermes"]
        self._held_from: int | None = None
        self._content: str | None = None

    def feed(self, text: str) -> dict[str, Any] | None:
        self.text += text
        if self._held_from is not None:
            return None
        start = self.parse.call_start(self.text, self._sent_content)
        if start is not None:
            self._held_from = start
        upto = start if start is not None else self.parse.safe_prefix(self.text)
        if upto <= self._sent_content:
            return None
        out = self.text[self._sent_content : upto]
        self._sent_content = upto
        return {"content": out}

    def finish(self) -> dict[str, Any] | None:
        content, calls = self.parse.parse(self.text)
        if not self.choice.parallel:
            calls = calls[:1]
        self._calls = [_Call(_call_id(), name, args, True) for name, args in calls]
        if self._calls:
            self._content = content
            rest = (content or "")[self._sent_content :]
            delta: dict[str, Any] = {"tool_calls": self._call_deltas(0)}
            if rest:
                delta["content"] = rest
            return delta
        self._content = self.text
        rest = self.text[self._sent_content :]
        self._sent_content = len(self.text)
        return {"content": rest} if rest else None

    @property
    def content(self) -> str | None:
        return self._content


# ----- parsers of the model's text (tool_choice "auto") ------------------------------------


class _Parser:
    """A text format of tool calls: where one may start, and the parse of a whole text."""

    markers: tuple[str, ...] = ()

    def call_start(self, text: str, after: int) -> int | None:
        at = [i for i in (text.find(m, max(0, after - len(m))) for m in self.markers) if i >= 0]
        return min(at) if at else None

    def safe_prefix(self, text: str) -> int:
        """How much of ``text`` cannot be the start of a marker still arriving."""
        for k in range(min(len(text), max(map(len, self.markers))), 0, -1):
            tail = text[-k:]
            if any(m.startswith(tail) for m in self.markers):
                return len(text) - k
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        raise NotImplementedError


def _call_of(obj: Any) -> tuple[str, str]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a call needs a name")
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], json.dumps(args, ensure_ascii=False)


class _Hermes(_Parser):
    """Hermes 2 Pro / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    any number of them, after optional text (the content)."""

    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        at = text.find("<tool_call>")
        if at < 0:
            return text, []
        try:
            calls = [_call_of(json.loads(m.group(1).strip())) for m in self._CALL.finditer(text, at)]
        except ValueError:
            return text, []
        return (text[:at] or None), calls


class _Granite(_Parser):
    """IBM Granite 3.x: ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]``
    (3.0) or ``<tool_call>[...]`` (3.1+), as the whole output."""

    markers = ("<|tool_call|>", "<tool_call>")

    def call_start(self, text: str, after: int) -> int | None:
        start = super().call_start(text, after)
        if start is None and text.strip().startswith("["):  # a bare array of calls
            start = len(text) - len(text.lstrip())
        if start is not None and not text[:start].strip():
            return 0  # the call is the whole output: no content, not even the whitespace before it
        return start

    def safe_prefix(self, text: str) -> int:
        if not text.strip():
            return 0  # leading whitespace may precede a call
        return super().safe_prefix(text)

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        body = text.strip()
        for m in self.markers:
            if body.startswith(m):
                body = body[len(m) :].strip()
                break
        if not body.startswith("["):
            return text, []
        try:
            calls = [_call_of(obj) for obj in json.loads(body)]
        except (ValueError, TypeError):
            return text, []
        return None, calls


PARSERS: dict[str, _Parser] = {"hermes": _Hermes(), "granite": _Granite()}
assert tuple(PARSERS) == TOOL_CALL_PARSERS


__all__ = ["ToolChoice", "ToolCallStream", "tool_choice", "TOOL_CALL_PARSERS", "PARSERS"]
