"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

A handler raises :class:`APIError`; the exception handlers installed by
:func:`install_error_handlers` turn it, pydantic's validation errors and
bodies that are not JSON (as 400s naming the field), and every HTTP error of
the framework (404 unknown route, 405 wrong method, ...) into that body —
never ``{"detail": ...}``. :class:`BodyLimit` answers 413 to a body larger
than :data:`MAX_BODY_BYTES` before it is read whole.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

#: Largest request body accepted (bytes): far above any prompt that fits a
#: model's context, so one client cannot make the server parse gigabytes.
MAX_BODY_BYTES = 8 * 1024 * 1024

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    503: "server_busy",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict[str, Any]:
        """OpenAI's error body (also the ``data:`` of an SSE error event)."""
        return error_body(self.status, self.message, self.type, self.param)


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param), status_code=status)


def engine_dead(reason: str) -> APIError:
    """The 503 of a server whose engine is dead (``reason`` says why)."""
    return APIError(503, reason, "engine_dead_error")


async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param)


async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('msg', e)}", "invalid_request_error")
    return error_response(
        400, f"invalid request: {where}: {first.get('msg', e)}", "invalid_request_error", where or None
    )


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = _TYPES.get(e.status_code, "internal_server_error" if e.status_code >= 500 else "invalid_request_error")
    response = error_response(e.status_code, str(e.detail), type_)
    for k, v in (e.headers or {}).items():
        response.headers[k] = v
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]


class BodyLimit:
    """ASGI middleware: 413 (OpenAI-shaped) for a body over ``limit`` bytes, by its
    Content-Length or, without one, as soon as that many bytes have arrived."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        response = error_response(413, f"the request body is larger than {self.limit} bytes", "request_too_large", None)
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


__all__ = [
    "APIError",
    "error_body",
    "error_response",
    "engine_dead",
    "install_error_handlers",
    "BodyLimit",
    "MAX_BODY_BYTES",
]
