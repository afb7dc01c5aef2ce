"""The work behind the OpenAI endpoints, over an :class:`~spyre_cb.async_engine.EngineClient`.

A request becomes choices (``n`` per prompt), all submitted at once so they
batch together; a refused one fails the whole request. A non-streamed
response reads every choice to its end; a streamed one (SSE) merges the
choices' output streams in arrival order and, when the client goes away,
closes them all, which aborts what still runs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from spyre_cb.async_engine import EngineClient, RequestStream
from spyre_cb.beam_search import BeamSearchParams
from spyre_cb.engine import StepOutput
from spyre_cb.errors import EngineDeadError, SpyreCBError
from spyre_cb.outputs import PositionLogprobs
from spyre_cb.sampling import SamplingParams
from spyre_cb.server import access
from spyre_cb.server.embeddings import ServedModel
from spyre_cb.server.errors import APIError, engine_dead
from spyre_cb.server.options import ServerOptions
from spyre_cb.server.protocol import (
    MAX_SEQUENCES_PER_REQUEST,
    ChatRequest,
    CompletionRequest,
    _beam_param,
    _Sampling,
    chat_prompt,
    completion_prompts,
    sampling_params,
)
from spyre_cb.server.responses import (
    CompletionLogprobs,
    chat_logprobs,
    merge_completion_logprobs,
    prompt_logprobs_json,
    usage,
)
from spyre_cb.server.tools import ToolCallStream

#: one submitted choice: its index in the response, its prompt ids, its outputs
Choice = tuple[int, list[int], RequestStream]


class OpenAIServing(ServedModel):
    """The endpoints' handlers for ``engine`` serving under ``served_model_name``."""

    def __init__(self, engine: EngineClient, options: ServerOptions) -> None:
        super().__init__(
            options, str(engine.config.model), engine.tokenizer, engine.config.max_model_len, engine.vocab_size
        )
        self.engine = engine
        self.max_waiting = options.max_waiting

    async def completions(self, body: CompletionRequest) -> Any:
        self.check(body, n_prompts=_n_prompts(body.prompt))
        # tokenizing is CPU work: off the event loop, so one large prompt never stalls the others
        prompts = await asyncio.to_thread(completion_prompts, body, self.tokenizer, self.max_model_len)
        base = f"cmpl-{uuid.uuid4().hex[:16]}"
        if body.use_beam_search:
            return await self._beam_search(body, base, prompts, "text_completion")
        jobs = [(i * body.n + k, p) for i, p in enumerate(prompts) for k in range(body.n)]
        return await self._respond(body, base, jobs, "text_completion", chat=False)

    async def chat(self, body: ChatRequest) -> Any:
        body.check_tools(self.options.auto_tool_parser)
        self.check(body, n_prompts=1)
        ids = await asyncio.to_thread(chat_prompt, body, self.tokenizer, self.max_model_len)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        base = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        if body.use_beam_search:
            return await self._beam_search(body, base, [list(ids)], "chat.completion")
        jobs = [(k, list(ids)) for k in range(body.n)]
        return await self._respond(body, base, jobs, "chat.completion", chat=True)

    def check(self, body: _Sampling, n_prompts: int) -> None:
        """Refuses a request before anything is queued: unknown model, what this server
        cannot do, bad ``n``, too many sequences, or (counting every sequence it would
        queue) more waiting than ``--max-waiting``."""
        self.check_model(body.model)
        body.use_server_defaults(self.options.disable_any_whitespace)
        body.refuse_unsupported()
        if body.n < 1 or body.n > 64:
            raise APIError(400, f"n must be in [1, 64], got {body.n}", "invalid_request_error", "n")
        per_prompt = body.beam_width if body.use_beam_search else body.n
        sequences = n_prompts * per_prompt
        if sequences > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(
                400,
                f"the request asks for {sequences} sequences ({n_prompts} prompts x {per_prompt}); "
                f"at most {MAX_SEQUENCES_PER_REQUEST} per request",
                "invalid_request_error",
                "prompt",
            )
        waiting = self.engine.n_waiting
        if self.max_waiting is not None and waiting + sequences > self.max_waiting:
            raise APIError(
                503,
                f"the server is busy: {waiting} sequences wait and this request adds {sequences} "
                f"(--max-waiting {self.max_waiting})",
                "server_busy",
            )

    async def _respond(
        self, body: _Sampling, base: str, jobs: list[tuple[int, list[int]]], obj: str, chat: bool
    ) -> Any:
        if body.truncate_prompt_tokens is not None:  # the prompt as the engine will run it (its last k tokens)
            jobs = [(index, p[-body.truncate_prompt_tokens :]) for index, p in jobs]
        streams = await self._sampled(body, base, jobs)
        prompt_tokens = sum(len(p) for _, p, _ in streams)
        if body.stream:
            events = sse_events(body, base, self.model_name, chat, streams, prompt_tokens, self._decode)
            return StreamingResponse(events, media_type="text/event-stream")
        return await self._complete(body, base, obj, chat, streams, prompt_tokens)

    async def _beam_search(self, body: _Sampling, base: str, prompts: list[list[int]], obj: str) -> dict[str, Any]:
        """``use_beam_search``: one beam search of ``beam_width`` beams per prompt (they
        batch together); its ``n`` best beams are the prompt's choices, best first."""
        # every search's params first: a refused one queues nothing
        params: list[SamplingParams | BeamSearchParams] = []
        for ids in prompts:
            if body.max_tokens is None and len(ids) >= self.max_model_len:
                raise APIError(
                    400,
                    f"prompt of {len(ids)} tokens leaves no room to generate within max_model_len {self.max_model_len}",
                    "invalid_request_error",
                    "prompt",
                )
            max_tokens = body.max_tokens if body.max_tokens is not None else self.max_model_len - len(ids)
            params.append(body.beam_search_params(max_tokens))
        streams = await self._submit(base, list(enumerate(prompts)), params, _beam_param)
        results = await _read_all(streams)
        choices: list[dict[str, Any]] = []
        n_tokens = 0
        for i, ids, outs in results:
            last = next(o for o in outs if o.finished)
            if last.error is not None or last.beams is None:
                raise APIError(500, f"the request failed: {last.error or last.finish_reason}", "internal_server_error")
            for j, beam in enumerate(last.beams[: body.n]):
                n_tokens += len(beam.output_token_ids)
                text = beam.text or ""
                choice: dict[str, Any] = {"index": i * body.n + j}
                if isinstance(body, ChatRequest):
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = (self._decode(ids) + text) if getattr(body, "echo", False) else text
                choice["logprobs"] = None
                choice["finish_reason"] = beam.finish_reason
                choice["stop_reason"] = beam.stop_reason
                choices.append(choice)
        prompt_tokens = sum(len(ids) for _, ids, _ in results)
        access.note_totals(prompt_tokens, n_tokens, [c["finish_reason"] for c in choices])
        return self._response(base, obj, choices, prompt_tokens, n_tokens)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        text: str = self.tokenizer.decode(ids)
        return text

    async def _sampled(self, body: _Sampling, base: str, jobs: list[tuple[int, list[int]]]) -> list[Choice]:
        """Queues every job with the body's sampling params (max_tokens None: as many as fit)."""
        params = [sampling_params(body, None, index) for index, _ in jobs]
        spec = params[0].structured_outputs if params else None
        if spec is not None:
            # compile off the event loop (a cold regex takes ~0.1 s); the engine then finds it cached
            try:
                await self.engine.compile_structured(spec)
            except SpyreCBError as e:
                raise APIError(400, str(e), "invalid_request_error", "structured_outputs") from None
        return await self._submit(base, jobs, list(params))

    async def _submit(
        self,
        base: str,
        jobs: list[tuple[int, list[int]]],
        params: list[SamplingParams | BeamSearchParams],
        param_of: Callable[[str], str | None] = lambda _: None,
    ) -> list[Choice]:
        """Queues every job at once (they batch together); a refused one fails the whole
        request and takes back the others (``param_of``: the field a refusal names)."""
        try:
            submitted = await self.engine.submit_all(
                [(prompt_ids, p, f"{base}-{index}") for (index, prompt_ids), p in zip(jobs, params)]
            )
        except SpyreCBError as e:
            if isinstance(e, EngineDeadError):
                raise engine_dead(str(e)) from None
            raise APIError(400, str(e), "invalid_request_error", param_of(str(e))) from None
        streams = [(index, prompt_ids, st) for (index, prompt_ids), st in zip(jobs, submitted)]
        access.note_request(base, streams)
        return streams

    async def _complete(
        self, body: _Sampling, base: str, obj: str, chat: bool, streams: list[Choice], prompt_tokens: int
    ) -> dict[str, Any]:
        """The non-streamed response: every choice read to its end."""
        results = await _read_all(streams)
        n_tokens = 0
        choices = []
        for index, prompt, outs in results:
            n_tokens += sum(len(o.new_token_ids) for o in outs)
            last = next(o for o in outs if o.finished)
            if last.error is not None:  # the engine ended it alone: say why, never a silent "abort"
                raise APIError(500, f"the request failed: {last.error}", "internal_server_error")
            choices.append(self._choice(body, index, prompt, outs, last, chat))
        return self._response(base, obj, choices, prompt_tokens, n_tokens)

    def _response(
        self, base: str, obj: str, choices: list[dict[str, Any]], prompt_tokens: int, n_tokens: int
    ) -> dict[str, Any]:
        """A non-streamed response's body."""
        return {
            "id": base,
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": usage(prompt_tokens, n_tokens),
        }

    def _choice(
        self, body: _Sampling, index: int, prompt: list[int], outs: list[StepOutput], last: StepOutput, chat: bool
    ) -> dict[str, Any]:
        text = "".join(o.text or "" for o in outs)
        ids = [t for o in outs for t in o.new_token_ids]
        positions = [p for o in outs for p in (o.logprobs or [])]
        prompt_lps = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
        choice: dict[str, Any] = {"index": index}
        finish_reason = last.finish_reason
        if isinstance(body, ChatRequest):
            tools = body.tool_calls()
            if tools is None:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                tools.feed(text)
                tools.finish()
                choice["message"] = tools.message()
                finish_reason = _tool_finish(tools, finish_reason)
            choice["logprobs"] = (
                {"content": chat_logprobs(ids, positions, body.top_logprobs or 0, self._decode)}
                if body.logprobs
                else None
            )
        else:
            assert isinstance(body, CompletionRequest)
            parts = []
            lps = CompletionLogprobs(self._decode) if body.logprobs is not None else None
            if body.echo:
                text = self._decode(prompt) + text
                if lps is not None:
                    parts.append(lps.part(prompt, list(prompt_lps or [None] * len(prompt)), first_is_none=True))
            if lps is not None:
                parts.append(lps.part(ids, list(positions)))
            choice["text"] = text
            choice["logprobs"] = merge_completion_logprobs(parts)
        choice["finish_reason"] = finish_reason
        choice["stop_reason"] = last.stop_reason
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_json(prompt_lps)
        return choice


async def _read_all(streams: list[Choice]) -> list[tuple[int, list[int], list[StepOutput]]]:
    """Every choice read to its end (closed whatever happens)."""
    try:
        return [(index, prompt, [o async for o in s]) for index, prompt, s in streams]
    except EngineDeadError as e:
        raise engine_dead(str(e)) from None
    finally:
        for _, _, s in streams:
            await s.aclose()


def _tool_finish(tools: ToolCallStream, finish_reason: str | None) -> str | None:
    """``tool_calls`` when the message holds calls and was not cut short by a length limit."""
    return "tool_calls" if tools.called and finish_reason != "length" else finish_reason


def _n_prompts(prompt: Any) -> int:
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        return 1
    return max(1, len(prompt))


# ----- streaming (SSE) -----------------------------------------------------------------


async def sse_events(
    body: _Sampling,
    base: str,
    model: str,
    chat: bool,
    streams: list[Choice],
    prompt_tokens: int,
    decode: Any = None,
) -> AsyncIterator[str]:
    """The server-sent events of a streamed response; leaving early (the client
    went away) closes every choice's stream, which aborts what still runs."""
    chunks = _Chunks(base, model, chat, body, prompt_tokens, decode)
    tasks, merged = _merge(streams)
    try:
        if chat:
            for index, _, _ in streams:
                yield chunks.role(index)
        elif isinstance(body, CompletionRequest) and body.echo:
            for index, prompt, _ in streams:
                yield chunks.echo(index, prompt)
        try:
            async for index, o in merged:
                if o.error is not None:  # the engine ended this request alone: an error the client can read
                    yield chunks.error(f"the request failed: {o.error}")
                    return
                event = chunks.delta(index, o)
                if event is not None:
                    yield event
        except EngineDeadError as e:  # an error event, no [DONE]
            yield f"data: {json.dumps(engine_dead(str(e)).body())}\n\n"
            return
        if body.include_usage:
            yield chunks.usage()
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop every stream, which aborts what still runs
        for t in tasks:
            t.cancel()
        for _, _, s in streams:
            await s.aclose()


class _Chunks:
    """The ``data:`` events of one streamed response."""

    def __init__(
        self, base: str, model: str, chat: bool, body: _Sampling, prompt_tokens: int, decode: Any = None
    ) -> None:
        self.base, self.model, self.chat, self.body = base, model, chat, body
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.n_tokens = 0
        self.decode = decode or (lambda ids: "")
        # per choice: the legacy logprobs' running text offset
        self._lps: dict[int, CompletionLogprobs] = {}
        # per choice (chat with tools): the reader of its text into tool calls
        self._tools: dict[int, ToolCallStream] = {}

    def role(self, index: int) -> str:
        """A chat choice's first event: the assistant role, no text yet."""
        return self._event({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def echo(self, index: int, prompt: list[int]) -> str:
        """A completion choice's first event with ``echo``: the prompt's text."""
        return self._event({"index": index, "text": self.decode(prompt), "finish_reason": None, "logprobs": None})

    def delta(self, index: int, o: StepOutput) -> str | None:
        """The text one output adds to its choice (and why it ended, with the last);
        None when there is nothing to send yet (text held back as a possible tool call)."""
        self.n_tokens += len(o.new_token_ids)
        body = self.body
        choice: dict[str, Any]
        finish_reason = o.finish_reason
        if isinstance(body, ChatRequest):
            delta: dict[str, Any] | None = {"content": o.text or ""}
            tools = self._tools.get(index) or body.tool_calls()
            if tools is not None:
                self._tools[index] = tools
                delta = _merge_deltas(tools.feed(o.text or ""), tools.finish() if o.finished else None)
                finish_reason = _tool_finish(tools, finish_reason)
                if delta is None and not o.finished and not body.logprobs:
                    return None
            choice = {"index": index, "delta": delta or {}, "finish_reason": None}
            if body.logprobs:
                content = chat_logprobs(o.new_token_ids, o.logprobs or [], body.top_logprobs or 0, self.decode)
                choice["logprobs"] = {"content": content}
        else:
            choice = {"index": index, "text": o.text or "", "finish_reason": None, "logprobs": None}
            if isinstance(body, CompletionRequest) and body.logprobs is not None:
                lps = self._lps.setdefault(index, CompletionLogprobs(self.decode))
                positions: list[PositionLogprobs | None] = (
                    list(o.logprobs) if o.logprobs is not None else [None] * len(o.new_token_ids)
                )
                choice["logprobs"] = lps.part(o.new_token_ids, positions)
        if o.prompt_logprobs is not None and body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_json(o.prompt_logprobs)
        if o.finished:
            choice["finish_reason"] = finish_reason
            choice["stop_reason"] = o.stop_reason
        return self._event(choice)

    def usage(self) -> str:
        """The last event before ``[DONE]`` with ``stream_options.include_usage``."""
        payload = self._payload([])
        payload["usage"] = usage(self.prompt_tokens, self.n_tokens)
        return f"data: {json.dumps(payload)}\n\n"

    def error(self, message: str, status: int = 500, type_: str = "internal_server_error") -> str:
        """An OpenAI-shaped error event (the stream ends after it, without ``[DONE]``)."""
        return f"data: {json.dumps({'error': {'message': message, 'type': type_, 'param': None, 'code': status}})}\n\n"

    def _event(self, choice: dict[str, Any]) -> str:
        payload = self._payload([choice])
        if self.body.continuous_usage:
            payload["usage"] = usage(self.prompt_tokens, self.n_tokens)
        elif self.body.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    def _payload(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.base, "object": self.obj, "created": self.created, "model": self.model, "choices": choices}


def _merge_deltas(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two chat deltas as one (content concatenated, tool-call entries in order)."""
    if a is None or b is None:
        return a if b is None else b
    out = dict(a)
    if "content" in b:
        out["content"] = out.get("content", "") + b["content"]
    if "tool_calls" in b:
        out["tool_calls"] = out.get("tool_calls", []) + b["tool_calls"]
    return out


def _merge(
    streams: list[Choice],
) -> tuple[list[asyncio.Task[None]], AsyncIterator[tuple[int, StepOutput]]]:
    """The choices' outputs as one stream in arrival order, with the tasks that
    feed it (the caller cancels them): one pump task per stream into a queue,
    or none for a single choice, whose stream is read directly."""
    if len(streams) == 1:
        index, _, only = streams[0]
        return [], _read_one(index, only)
    queue: asyncio.Queue[tuple[int, StepOutput | EngineDeadError | None]] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(index, s, queue)) for index, _, s in streams]
    return tasks, _read_queue(queue, len(tasks))


async def _read_one(index: int, stream: RequestStream) -> AsyncIterator[tuple[int, StepOutput]]:
    async for o in stream:
        yield index, o


async def _pump(
    index: int, stream: RequestStream, queue: asyncio.Queue[tuple[int, StepOutput | EngineDeadError | None]]
) -> None:
    try:
        async for o in stream:
            await queue.put((index, o))
    except EngineDeadError as e:  # the reader raises it
        await queue.put((index, e))
        return
    await queue.put((index, None))


async def _read_queue(
    queue: asyncio.Queue[tuple[int, StepOutput | EngineDeadError | None]], left: int
) -> AsyncIterator[tuple[int, StepOutput]]:
    while left:
        at, item = await queue.get()
        if item is None:
            left -= 1
            continue
        if isinstance(item, EngineDeadError):
            raise item
        yield at, item


__all__ = ["OpenAIServing", "sse_events"]
