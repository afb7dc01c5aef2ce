"""An OpenAI-compatible HTTP server over the async engine (FastAPI + uvicorn).

Routes: ``/v1/completions`` and ``/v1/chat/completions`` (streaming SSE or
not, ``stream_options.include_usage``), ``/v1/models``, ``/health``,
``/metrics`` (Prometheus text, names prefixed ``spyre_cb_``). Errors have
OpenAI's shape: 400 for an invalid request (the message names the limit it
broke), 401 for a missing or wrong API key when one is set, 404 for an
unknown model, 503 when more than ``max_waiting`` requests wait.

    spyre-cb serve tiny --port 8000
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from spyre_cb.async_engine import AsyncEngine, RequestStream
from spyre_cb.engine import Engine, StepOutput
from spyre_cb.errors import SpyreCBError
from spyre_cb.sampling import SamplingParams

# ----- request bodies -------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields both endpoints take (OpenAI's, plus vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def params(self, default_max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


# ----- errors -----------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


# ----- metrics ------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics, updated on the engine thread after every step."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("spyre_cb_requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge("spyre_cb_requests_waiting", "requests waiting for admission", registry=r)
        self.blocks_used = Gauge("spyre_cb_kv_blocks_used", "KV blocks held by requests", registry=r)
        self.blocks_reserved = Gauge(
            "spyre_cb_kv_blocks_reserved", "KV blocks reserved by admitted requests", registry=r
        )
        self.tkv = Gauge("spyre_cb_batch_tkv", "tkv after the last step", registry=r)
        self.tokens = Counter("spyre_cb_generation_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("spyre_cb_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.finished = Counter(
            "spyre_cb_requests_finished", "requests finished, by reason", ["finish_reason"], registry=r
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            "spyre_cb_time_to_first_token_seconds", "arrival to first token", buckets=buckets, registry=r
        )
        self.itl = Histogram(
            "spyre_cb_inter_token_latency_seconds", "between consecutive tokens", buckets=buckets, registry=r
        )
        self.queue = Histogram("spyre_cb_queue_time_seconds", "arrival to first scheduled", buckets=buckets, registry=r)
        self._last_token: dict[str, float] = {}

    def on_step(self, engine: Engine, outs: list[StepOutput]) -> None:
        snap = engine.snapshot()
        self.running.set(len(snap.running))
        self.waiting.set(len(snap.waiting))
        self.blocks_used.set(snap.n_used_blocks)
        self.blocks_reserved.set(snap.n_reserved_blocks)
        self.tkv.set(snap.tkv)
        now = time.time()
        for o in outs:
            n = len(o.new_token_ids)
            if n:
                self.tokens.inc(n)
                last = self._last_token.get(o.request_id)
                if last is not None:
                    self.itl.observe(now - last)
                self._last_token[o.request_id] = now
            state = engine.requests.get(o.request_id)
            if state is not None and n and len(state.output_token_ids) == 1:
                m = state.metrics
                if m.time_to_first_token is not None:
                    self.ttft.observe(m.time_to_first_token)
                if m.queue_time is not None:
                    self.queue.observe(m.queue_time)
            if o.finished:
                self._last_token.pop(o.request_id, None)
                self.finished.labels(o.finish_reason or "abort").inc()
                if state is not None:
                    self.prompt_tokens.inc(len(state.prompt_token_ids))


# ----- the app ---------------------------------------------------------------------------


def build_app(
    engine: AsyncEngine,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_waiting: int | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine`` under ``served_model_name``."""
    app = FastAPI(title="spyre_cb", version="1")
    metrics = Metrics()
    engine.on_step.append(metrics.on_step)
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.config.max_model_len
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"invalid request: {where}: {first.get('msg', e)}", "invalid_request_error", where or None)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "spyre_cb"}
        card["max_model_len"] = max_model_len
        return {"object": "list", "data": [card]}

    def check(body: _Sampling) -> None:
        if body.model != served_model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {served_model_name!r}",
                "not_found_error",
                "model",
            )
        if max_waiting is not None and engine.n_waiting >= max_waiting:
            raise APIError(
                503,
                f"the server is busy: {engine.n_waiting} requests wait (--max-waiting {max_waiting})",
                "server_busy",
            )
        if body.n < 1 or body.n > 64:
            raise APIError(400, f"n must be in [1, 64], got {body.n}", "invalid_request_error", "n")

    def params_of(body: _Sampling, default_max: int | None, n_index: int) -> SamplingParams:
        try:
            p = body.params(default_max)
            if body.n > 1 and p.seed is not None:
                p = dataclasses.replace(p, seed=p.seed + n_index)
            p.validate()
            return p
        except SpyreCBError as e:
            raise APIError(400, str(e), "invalid_request_error") from None

    def prompts_of(body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            return [_encode(p)]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        out = []
        for x in p:
            out.append(_encode(x) if isinstance(x, str) else list(x))  # type: ignore[arg-type]
        if not out:
            raise APIError(400, "prompt must not be empty", "invalid_request_error", "prompt")
        return out

    def _encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompt token ids", "invalid_request_error", "prompt")
        return list(tokenizer(text).input_ids)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check(body)
        prompts = prompts_of(body)
        base = f"cmpl-{uuid.uuid4().hex[:16]}"
        jobs = [(i * body.n + k, p) for i, p in enumerate(prompts) for k in range(body.n)]
        return await _respond(body, request, base, jobs, "text_completion", chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        check(body)
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template", "invalid_request_error", "messages")
        msgs = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise APIError(
                400, f"could not apply the chat template: {e}", "invalid_request_error", "messages"
            ) from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        base = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        jobs = [(k, list(ids)) for k in range(body.n)]
        return await _respond(body, request, base, jobs, "chat.completion", chat=True)

    async def _respond(
        body: _Sampling, request: Request, base: str, jobs: list[tuple[int, list[int]]], obj: str, chat: bool
    ) -> Any:
        params = [params_of(body, None, index) for index, _ in jobs]  # max_tokens None: as many as fit
        # queue every job at once (they batch together); a refused one fails the whole request
        streams: list[tuple[int, list[int], RequestStream]] = []
        try:
            for (index, prompt_ids), p in zip(jobs, params):
                streams.append((index, prompt_ids, engine.submit(prompt_ids, p, f"{base}-{index}")))
        except SpyreCBError as e:
            for _, _, s in streams:
                await s.aclose()
            raise APIError(400, str(e), "invalid_request_error") from None
        prompt_tokens = sum(len(p) for _, p, _ in streams)
        if body.stream:
            return StreamingResponse(
                _sse(body, base, obj, chat, streams, prompt_tokens), media_type="text/event-stream"
            )
        texts: dict[int, list[str]] = {i: [] for i, _, _ in streams}
        n_tokens = 0
        reasons: dict[int, tuple[str | None, Any]] = {}
        try:
            results = [(index, [o async for o in s]) for index, _, s in streams]
        finally:
            for _, _, s in streams:
                await s.aclose()
        for index, outs in results:
            for o in outs:
                texts[index].append(o.text or "")
                n_tokens += len(o.new_token_ids)
                if o.finished:
                    reasons[index] = (o.finish_reason, o.stop_reason)
        choices = []
        for index, _, _ in streams:
            text = "".join(texts[index])
            why, stop_reason = reasons[index]
            if chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": why,
                        "stop_reason": stop_reason,
                    }
                )
            else:
                choices.append(
                    {"index": index, "text": text, "finish_reason": why, "stop_reason": stop_reason, "logprobs": None}
                )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_tokens,
            "total_tokens": prompt_tokens + n_tokens,
        }
        return {
            "id": base,
            "object": obj,
            "created": int(time.time()),
            "model": served_model_name,
            "choices": choices,
            "usage": usage,
        }

    async def _sse(
        body: _Sampling,
        base: str,
        obj: str,
        chat: bool,
        streams: list[tuple[int, list[int], RequestStream]],
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        n_tokens = 0

        def chunk(index: int, o: StepOutput | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = (
                    {"role": "assistant", "content": ""} if role else {"content": (o.text or "") if o else ""}
                )
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": index, "text": (o.text or "") if o else "", "finish_reason": None, "logprobs": None}
            if o is not None and o.finished:
                choice["finish_reason"] = o.finish_reason
                choice["stop_reason"] = o.stop_reason
            payload = {
                "id": base,
                "object": chunk_obj,
                "created": created,
                "model": served_model_name,
                "choices": [choice],
            }
            if body.stream_options and body.stream_options.include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        queue: asyncio.Queue[tuple[int, StepOutput | None]] = asyncio.Queue()

        async def pump(index: int, s: RequestStream) -> None:
            async for o in s:
                await queue.put((index, o))
            await queue.put((index, None))

        async def merged() -> AsyncIterator[tuple[int, StepOutput]]:
            if len(streams) == 1:  # one choice: read its stream directly (no task, no extra queue hop)
                index, _, only = streams[0]
                async for o in only:
                    yield index, o
                return
            left = len(tasks)
            while left:
                at, item = await queue.get()
                if item is None:
                    left -= 1
                    continue
                yield at, item

        tasks = [asyncio.create_task(pump(i, s)) for i, _, s in streams] if len(streams) > 1 else []
        try:
            if chat:
                for index, _, _ in streams:
                    yield chunk(index, None, role=True)
            async for index, o in merged():
                n_tokens += len(o.new_token_ids)
                yield chunk(index, o)
            if body.stream_options and body.stream_options.include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n_tokens,
                    "total_tokens": prompt_tokens + n_tokens,
                }
                payload = {
                    "id": base,
                    "object": chunk_obj,
                    "created": created,
                    "model": served_model_name,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop every stream, which aborts what still runs
            for t in tasks:
                t.cancel()
            for _, _, s in streams:
                await s.aclose()

    return app


def serve(
    config: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_waiting: int | None = None,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Builds the engine from an EngineConfig and serves it until interrupted."""
    import uvicorn

    engine = AsyncEngine(Engine(config=config))
    name = served_model_name or str(config.model)
    app = build_app(engine, served_model_name=name, api_key=api_key, max_waiting=max_waiting)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.shutdown()


__all__ = ["build_app", "serve", "Metrics"]
