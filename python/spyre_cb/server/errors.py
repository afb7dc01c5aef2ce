"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

A handler raises :class:`APIError`; the exception handlers installed by
:func:`install_error_handlers` turn it, and pydantic's validation errors (as
400s naming the field), into that body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
    return error_response(
        400, f"invalid request: {where}: {first.get('msg', e)}", "invalid_request_error", where or None
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]


__all__ = ["APIError", "error_body", "error_response", "engine_dead", "install_error_handlers"]
