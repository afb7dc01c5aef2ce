"""The FastAPI application: construction, the API-key middleware, the routes,
and :func:`serve` (uvicorn). The routes are thin: each hands its body to the
app's :class:`~spyre_cb.server.handlers.OpenAIServing`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse

from spyre_cb.async_engine import AsyncEngine
from spyre_cb.engine import Engine
from spyre_cb.server.errors import BodyLimit, error_response, install_error_handlers
from spyre_cb.server.handlers import OpenAIServing
from spyre_cb.server.metrics import Metrics
from spyre_cb.server.protocol import ChatRequest, CompletionRequest
from spyre_cb.server.tokenize import router as tokenize_router

router = APIRouter()


def build_app(
    engine: AsyncEngine,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_waiting: int | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine`` under ``served_model_name``."""
    # no /docs: its page loads assets from a CDN (nothing leaves this server)
    app = FastAPI(title="spyre_cb", version="1", docs_url=None, redoc_url=None)
    metrics = Metrics()
    engine.on_step.append(metrics.on_step)
    app.state.metrics = metrics
    app.state.serving = OpenAIServing(engine, served_model_name=served_model_name, max_waiting=max_waiting)
    install_error_handlers(app)
    app.middleware("http")(_require_key(api_key))
    app.include_router(router)
    app.include_router(tokenize_router)
    app.add_middleware(BodyLimit)
    return app


def _require_key(api_key: str | None) -> Callable[[Request, Any], Awaitable[Any]]:
    """The middleware that answers 401 to a ``/v1/`` request without ``Bearer <api_key>`` (when set)."""

    async def auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)

    return auth


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


# ----- routes --------------------------------------------------------------------------


@router.get("/health")
async def health() -> dict[str, str]:
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
    return await _serving(request).completions(body)


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request) -> Any:
    return await _serving(request).chat(body)


# ----- running it ----------------------------------------------------------------------


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


__all__ = ["build_app", "serve", "router"]
