"""The access log: one structured line per ``/v1/`` request on the logger
``spyre_cb.access``, written when its response has ended (a stream's last
event, an error, a client that went away).

The line is a JSON object: ``id`` (the response id, ``cmpl-...``; null when
refused before anything was queued), ``method``, ``path``, ``status`` (the
HTTP status; 499 when the client went away before a non-streamed response),
``finish_reason`` (each choice's, comma-separated in order: ``length``,
``stop``, ``abort`` for a client that went away, ``error`` when the engine
died), ``prompt_tokens``, ``completion_tokens``, and the timings in seconds:
``queue_s`` (the longest any choice waited for its prefill), ``ttft_s``
(arrival to the first token of any choice), ``total_s`` (the HTTP request's
arrival to the end of its response). The same fields are on the record as
``record.access`` for a handler that formats them itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spyre_cb.async_engine import RequestStream

log = logging.getLogger("spyre_cb.access")


@dataclass
class _Record:
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    status: int | None = None
    request_id: str | None = None
    streams: list[RequestStream] = field(default_factory=list)
    #: what the response counted, where its streams do not say it (beam searches, embeddings)
    totals: tuple[int, int, str | None] | None = None

    def fields(self) -> dict[str, Any]:
        ss = self.streams
        queues = [m.queue_time for m in (s.metrics for s in ss) if m.queue_time is not None]
        ttfts = [m.time_to_first_token for m in (s.metrics for s in ss) if m.time_to_first_token is not None]
        prompt, completion = sum(s.n_prompt_tokens for s in ss), sum(s.n_tokens for s in ss)
        finish = ",".join(s.finish_reason or "abort" for s in ss) or None
        if self.totals is not None:
            prompt, completion, finish = self.totals
        return {
            "id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "finish_reason": finish,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "queue_s": _round(max(queues)) if queues else None,
            "ttft_s": _round(min(ttfts)) if ttfts else None,
            "total_s": _round(time.monotonic() - self.start),
        }


def _round(x: float) -> float:
    return round(x, 6)


_current: contextvars.ContextVar[_Record | None] = contextvars.ContextVar("spyre_cb_access", default=None)


def note_request(request_id: str, choices: Sequence[tuple[int, list[int], RequestStream]]) -> None:
    """Called by the handlers once a request's choices are queued: what its line reports."""
    rec = _current.get()
    if rec is not None:
        rec.request_id = request_id
        rec.streams = [s for _, _, s in choices]


def note_totals(
    prompt_tokens: int, completion_tokens: int, finish_reasons: Sequence[str | None] = (), request_id: str | None = None
) -> None:
    """What a response counted, when its streams do not (a beam search returns its
    best beams, an embedding request has no stream): the line reports these."""
    rec = _current.get()
    if rec is not None:
        if request_id is not None:
            rec.request_id = request_id
        finish = ",".join(f or "abort" for f in finish_reasons) or None
        rec.totals = (prompt_tokens, completion_tokens, finish)


class AccessLog:
    """ASGI middleware writing one ``spyre_cb.access`` line per ``/v1/`` request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        rec = _Record(scope["method"], scope["path"])
        token = _current.set(rec)

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                rec.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except asyncio.CancelledError:
            # only the server cancels a request's task at this level: its graceful shutdown
            # timed out (the choices were closed, hence aborted, on the way out). The
            # request ends here, logged, instead of as a traceback of the ASGI application.
            if rec.status is None:
                rec.status = 503
        except BaseException:
            if rec.status is None:
                rec.status = 500
            raise
        finally:
            _current.reset(token)
            if rec.status is None:  # no response was started: the client went away
                rec.status = 499
            doc = rec.fields()
            log.info(json.dumps(doc), extra={"access": doc})


__all__ = ["AccessLog", "note_request"]
