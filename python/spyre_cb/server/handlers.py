"""The work behind the OpenAI endpoints, over one :class:`AsyncEngine`.

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
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from spyre_cb.async_engine import AsyncEngine, RequestStream
from spyre_cb.engine import StepOutput
from spyre_cb.errors import EngineDeadError, SpyreCBError
from spyre_cb.server import access
from spyre_cb.server.errors import APIError, engine_dead
from spyre_cb.server.protocol import (
    ChatRequest,
    CompletionRequest,
    _Sampling,
    chat_prompt,
    completion_prompts,
    sampling_params,
)

#: one submitted choice: its index in the response, its prompt ids, its outputs
Choice = tuple[int, list[int], RequestStream]


class OpenAIServing:
    """The endpoints' handlers for ``engine`` serving under ``served_model_name``."""

    def __init__(self, engine: AsyncEngine, *, served_model_name: str, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.model_name = served_model_name
        self.max_waiting = max_waiting
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.max_model_len
        self.created = int(time.time())

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "spyre_cb",
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest) -> Any:
        self.check(body)
        prompts = completion_prompts(body, self.tokenizer)
        base = f"cmpl-{uuid.uuid4().hex[:16]}"
        jobs = [(i * body.n + k, p) for i, p in enumerate(prompts) for k in range(body.n)]
        return await self._respond(body, base, jobs, "text_completion", chat=False)

    async def chat(self, body: ChatRequest) -> Any:
        self.check(body)
        ids = chat_prompt(body, self.tokenizer)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        base = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        jobs = [(k, list(ids)) for k in range(body.n)]
        return await self._respond(body, base, jobs, "chat.completion", chat=True)

    def check(self, body: _Sampling) -> None:
        """Refuses a request before anything is queued: unknown model, too many waiting, bad ``n``."""
        if body.model != self.model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
                "model",
            )
        if self.max_waiting is not None and self.engine.n_waiting >= self.max_waiting:
            raise APIError(
                503,
                f"the server is busy: {self.engine.n_waiting} requests wait (--max-waiting {self.max_waiting})",
                "server_busy",
            )
        if body.n < 1 or body.n > 64:
            raise APIError(400, f"n must be in [1, 64], got {body.n}", "invalid_request_error", "n")

    async def _respond(
        self, body: _Sampling, base: str, jobs: list[tuple[int, list[int]]], obj: str, chat: bool
    ) -> Any:
        streams = await self._submit(body, base, jobs)
        prompt_tokens = sum(len(p) for _, p, _ in streams)
        if body.stream:
            events = sse_events(body, base, self.model_name, chat, streams, prompt_tokens)
            return StreamingResponse(events, media_type="text/event-stream")
        return await self._complete(base, obj, chat, streams, prompt_tokens)

    async def _submit(self, body: _Sampling, base: str, jobs: list[tuple[int, list[int]]]) -> list[Choice]:
        """Queues every job at once (they batch together); a refused one fails the whole request."""
        params = [sampling_params(body, None, index) for index, _ in jobs]  # max_tokens None: as many as fit
        streams: list[Choice] = []
        try:
            for (index, prompt_ids), p in zip(jobs, params):
                streams.append((index, prompt_ids, self.engine.submit(prompt_ids, p, f"{base}-{index}")))
        except SpyreCBError as e:
            for _, _, s in streams:
                await s.aclose()
            if isinstance(e, EngineDeadError):
                raise engine_dead(str(e)) from None
            raise APIError(400, str(e), "invalid_request_error") from None
        access.note_request(base, streams)
        return streams

    async def _complete(
        self, base: str, obj: str, chat: bool, streams: list[Choice], prompt_tokens: int
    ) -> dict[str, Any]:
        """The non-streamed response: every choice read to its end."""
        try:
            results = [(index, [o async for o in s]) for index, _, s in streams]
        except EngineDeadError as e:
            raise engine_dead(str(e)) from None
        finally:
            for _, _, s in streams:
                await s.aclose()
        n_tokens = 0
        choices = []
        for index, outs in results:
            n_tokens += sum(len(o.new_token_ids) for o in outs)
            last = next(o for o in outs if o.finished)
            text = "".join(o.text or "" for o in outs)
            choices.append(_choice(index, text, last.finish_reason, last.stop_reason, chat))
        return {
            "id": base,
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(prompt_tokens, n_tokens),
        }


def _choice(index: int, text: str, why: str | None, stop_reason: Any, chat: bool) -> dict[str, Any]:
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": why,
            "stop_reason": stop_reason,
        }
    return {"index": index, "text": text, "finish_reason": why, "stop_reason": stop_reason, "logprobs": None}


def _usage(prompt_tokens: int, n_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens, "total_tokens": prompt_tokens + n_tokens}


# ----- streaming (SSE) -----------------------------------------------------------------


async def sse_events(
    body: _Sampling, base: str, model: str, chat: bool, streams: list[Choice], prompt_tokens: int
) -> AsyncIterator[str]:
    """The server-sent events of a streamed response; leaving early (the client
    went away) closes every choice's stream, which aborts what still runs."""
    chunks = _Chunks(base, model, chat, body.include_usage)
    n_tokens = 0
    tasks, merged = _merge(streams)
    try:
        if chat:
            for index, _, _ in streams:
                yield chunks.role(index)
        try:
            async for index, o in merged:
                n_tokens += len(o.new_token_ids)
                yield chunks.delta(index, o)
        except EngineDeadError as e:  # an error event, no [DONE]
            yield f"data: {json.dumps(engine_dead(str(e)).body())}\n\n"
            return
        if body.include_usage:
            yield chunks.usage(prompt_tokens, n_tokens)
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop every stream, which aborts what still runs
        for t in tasks:
            t.cancel()
        for _, _, s in streams:
            await s.aclose()


class _Chunks:
    """The ``data:`` events of one streamed response."""

    def __init__(self, base: str, model: str, chat: bool, include_usage: bool) -> None:
        self.base, self.model, self.chat, self.include_usage = base, model, chat, include_usage
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.created = int(time.time())

    def role(self, index: int) -> str:
        """A chat choice's first event: the assistant role, no text yet."""
        return self._event({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def delta(self, index: int, o: StepOutput) -> str:
        """The text one output adds to its choice (and why it ended, with the last)."""
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": index, "delta": {"content": o.text or ""}, "finish_reason": None}
        else:
            choice = {"index": index, "text": o.text or "", "finish_reason": None, "logprobs": None}
        if o.finished:
            choice["finish_reason"] = o.finish_reason
            choice["stop_reason"] = o.stop_reason
        return self._event(choice)

    def usage(self, prompt_tokens: int, n_tokens: int) -> str:
        """The last event before ``[DONE]`` with ``stream_options.include_usage``."""
        payload = self._payload([])
        payload["usage"] = _usage(prompt_tokens, n_tokens)
        return f"data: {json.dumps(payload)}\n\n"

    def _event(self, choice: dict[str, Any]) -> str:
        payload = self._payload([choice])
        if self.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    def _payload(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.base, "object": self.obj, "created": self.created, "model": self.model, "choices": choices}


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
