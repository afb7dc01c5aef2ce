"""The FastAPI application: construction, the API-key and access-log
middlewares, the routes, and :func:`serve` (uvicorn, with a bounded graceful
shutdown). The routes are thin: each hands its body to the app's
:class:`~spyre_cb.server.handlers.OpenAIServing`; a non-streamed one is
cancelled (its choices aborted) when its client goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from spyre_cb.async_engine import AsyncEngine
from spyre_cb.data_parallel import DataParallelEngine
from spyre_cb.embedding import AsyncEmbedder, Embedder, is_embedding_model
from spyre_cb.engine import Engine
from spyre_cb.errors import ConfigError
from spyre_cb.launched import launched_rank
from spyre_cb.server.access import AccessLog
from spyre_cb.server.embeddings import EmbeddingRequest, EmbeddingServing
from spyre_cb.server.errors import BodyLimit, engine_dead, error_response, install_error_handlers
from spyre_cb.server.handlers import OpenAIServing
from spyre_cb.server.metrics import Metrics
from spyre_cb.server.options import ServerOptions
from spyre_cb.server.protocol import ChatRequest, CompletionRequest
from spyre_cb.server.tokenize import router as tokenize_router

router = APIRouter()


def build_app(
    engine: AsyncEngine | DataParallelEngine | AsyncEmbedder, options: ServerOptions | None = None, **fields: Any
) -> FastAPI:
    """The FastAPI application serving ``engine`` as ``options`` say (``fields``:
    :class:`ServerOptions` fields that replace those of ``options``): a generative
    engine's (or data-parallel replicas') completions and chat, or an embedding
    model's ``/v1/embeddings``."""
    opts = dataclasses.replace(options or ServerOptions(), **fields)
    # no /docs: its page loads assets from a CDN (nothing leaves this server)
    app = FastAPI(title="spyre_cb", version="1", docs_url=None, redoc_url=None)
    metrics = Metrics(replicas=len(engine.replicas) if isinstance(engine, DataParallelEngine) else None)
    metrics.watch(engine)
    app.state.metrics = metrics
    app.state.serving = (
        EmbeddingServing(engine, opts) if isinstance(engine, AsyncEmbedder) else OpenAIServing(engine, opts)
    )
    install_error_handlers(app)
    app.middleware("http")(_require_key(opts.api_key))
    app.add_middleware(BodyLimit)  # 413 before a body over the limit is read
    app.add_middleware(AccessLog)  # the outermost: it sees every response, 401s and 413s too
    app.include_router(router)
    app.include_router(tokenize_router)
    return app


def _require_key(api_key: str | None) -> Callable[[Request, Any], Awaitable[Any]]:
    """The middleware that answers 401 to a ``/v1/`` request without ``Bearer <api_key>`` (when set)."""

    async def auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)

    return auth


def _serving(request: Request) -> Any:
    """The app's handlers: :class:`OpenAIServing` or :class:`EmbeddingServing`."""
    return request.app.state.serving


# ----- routes --------------------------------------------------------------------------


@router.get("/health", response_model=None)
async def health(request: Request) -> dict[str, Any] | JSONResponse:
    """200 while the engine runs; 503 (OpenAI's error body, saying why) once it is dead.
    A data-parallel server lists its replicas and says ``degraded`` (still 200: it
    serves) while one is down or restarting."""
    engine = _serving(request).engine
    if engine.dead is not None:
        e = engine_dead(f"the engine is dead: {engine.dead}")
        return error_response(e.status, e.message, e.type)
    if isinstance(engine, DataParallelEngine):
        replicas = [dataclasses.asdict(r) for r in engine.status()]
        up = sum(r["state"] == "up" for r in replicas)
        if up == 0:  # every one restarting: nothing can be served now
            return error_response(503, "no data-parallel replica is up (restarting)", "engine_dead_error")
        return {"status": "ok" if up == len(replicas) else "degraded", "replicas": replicas}
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus(request: Request) -> PlainTextResponse:
    metrics: Metrics = request.app.state.metrics
    return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return _serving(request).models()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await _unless_disconnected(request, _serving(request).completions(body))


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request) -> Any:
    return await _unless_disconnected(request, _serving(request).chat(body))


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    return await _unless_disconnected(request, _serving(request).embeddings(body))


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """Runs the handler; if the client goes away first, cancels it, which closes
    (aborts) every choice it queued. A streamed response returns at once: its
    stream watches the client itself."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return error_response(499, "the client closed the connection", "client_disconnected")
    finally:
        for t in (gone, task):  # (task: when this request is cancelled itself, at shutdown)
            if not t.done():
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (its body was read: the next ASGI message
    is the disconnect). Waiting on ``receive`` itself, not polling ``is_disconnected()``:
    through the API-key middleware (Starlette's ``BaseHTTPMiddleware``) that never sees it."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----- running it ----------------------------------------------------------------------


def serve(config: Any, options: ServerOptions | None = None, **fields: Any) -> None:
    """Builds the engine from an EngineConfig and serves it until SIGINT or SIGTERM
    (``options``: :class:`ServerOptions`; ``fields`` replace some of its fields).

    Shutting down stops accepting connections, lets the requests in flight
    finish for up to ``shutdown_timeout_s`` seconds, then cancels what still
    runs (which aborts it) and returns; SIGTERM then exits with status 0.
    ``access_log`` writes the ``spyre_cb.access`` lines to stderr."""
    import uvicorn

    opts = dataclasses.replace(options or ServerOptions(), **fields)
    if opts.access_log:
        _log_access_to_stderr()
    # uvicorn re-raises the signal it stopped on once it has shut down: SIGTERM then
    # ends the process with status 0 (after this function's cleanup), not killed by it
    main_thread = threading.current_thread() is threading.main_thread()  # (signals: only there)
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if main_thread else None
    if opts.served_model_name is None:  # the name given ("tiny"), not the directory it stands for
        opts = dataclasses.replace(opts, served_model_name=str(config.model))
    config = config.with_model_path()
    engine: AsyncEngine | DataParallelEngine | AsyncEmbedder
    if is_embedding_model(config):
        if opts.data_parallel_size > 1:
            raise ConfigError("--data-parallel-size serves generative models; an embedding model runs as one engine")
        engine = AsyncEmbedder(Embedder(config=config))
    elif opts.data_parallel_size > 1:
        engine = DataParallelEngine(
            config, opts.data_parallel_size, router=opts.router, max_restarts=opts.max_replica_restarts
        )
    else:
        engine = AsyncEngine(Engine(config=config))
    if isinstance(engine, AsyncEngine) and launched_rank() is not None:
        # ranks a launcher started: a dead engine ends this rank (status 1), so the launcher sees it
        engine.on_death.append(_stop_for_the_launcher)
    app = build_app(engine, opts)
    try:
        uvicorn.run(
            app,
            host=opts.host,
            port=opts.port,
            log_level=opts.log_level,
            timeout_graceful_shutdown=opts.shutdown_timeout_s,
        )
    finally:
        engine.shutdown()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


#: set when a launched rank 0's engine died: the server stops and exits with status 1
_engine_died = threading.Event()


def _stop_for_the_launcher(reason: str) -> None:
    _engine_died.set()
    print(f"spyre-cb serve: the engine died ({reason}); stopping so the launcher sees it", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(1 if _engine_died.is_set() else 0)


def _log_access_to_stderr() -> None:
    access = logging.getLogger("spyre_cb.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


__all__ = ["build_app", "serve", "router"]
