"""An OpenAI-compatible HTTP server over the async engine (FastAPI + uvicorn).

Routes: ``/v1/completions`` and ``/v1/chat/completions`` (streaming SSE or
not, ``stream_options.include_usage``), ``/v1/models``, ``/health``,
``/metrics`` (Prometheus text, names prefixed ``spyre_cb_``). Errors have
OpenAI's shape: 400 for an invalid request (the message names the limit it
broke), 401 for a missing or wrong API key when one is set, 404 for an
unknown model, 503 when more than ``max_waiting`` requests wait.

    spyre-cb serve tiny --port 8000

Modules: ``protocol`` (the request bodies and their conversion into prompts
and ``SamplingParams``), ``handlers`` (the endpoints' work: submitting the
choices, assembling responses, SSE streaming), ``errors`` (OpenAI-shaped
error bodies and the exception handlers), ``metrics`` (the Prometheus step
hook), ``app`` (the FastAPI app, its auth middleware and routes, ``serve``),
``options`` (:class:`ServerOptions`, from which the CLI's flags come),
``tools`` (tool calling: ``tools``/``tool_choice``, the hermes and granite
parsers), ``tokenize`` and ``access``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spyre_cb.server.options import ServerOptions

if TYPE_CHECKING:
    from spyre_cb.server.app import build_app, serve
    from spyre_cb.server.errors import APIError
    from spyre_cb.server.metrics import Metrics
    from spyre_cb.server.protocol import ChatMessage, ChatRequest, CompletionRequest, StreamOptions

# imported on first use: the server's options (and `spyre-cb serve --help`) need
# no FastAPI; everything else does (the `serve` extra)
_LAZY = {
    "build_app": "app",
    "serve": "app",
    "Metrics": "metrics",
    "APIError": "errors",
    "CompletionRequest": "protocol",
    "ChatRequest": "protocol",
    "ChatMessage": "protocol",
    "StreamOptions": "protocol",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"spyre_cb.server.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'spyre_cb.server' has no attribute {name!r}")


__all__ = [
    "build_app",
    "serve",
    "ServerOptions",
    "Metrics",
    "APIError",
    "CompletionRequest",
    "ChatRequest",
    "ChatMessage",
    "StreamOptions",
]
