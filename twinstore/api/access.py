"""The request context of the logs, and the access log: one ASGI wrapper around the whole app.

Every HTTP request and WebSocket connection gets a correlation id in the log context
(:mod:`twinstore.logs`): Ditto's ``correlation-id`` header (or query parameter), else a new
UUID, which the handlers also answer with (:func:`~twinstore.api.headers.parse_headers`), so a
response and every log line it caused share one id. Authentication adds the ``subject``.

With ``access_log`` on, each request ends with one line on the ``twinstore.access`` logger:
``{"msg": "PUT /api/2/things/x 204", "method", "path", "route", "status", "duration_ms",
"correlation_id", "subject"}`` (a WebSocket session's line comes when it closes, with 101).
It is off by default: a JSON line costs ~15 µs, 5-10 % of the CPU of a write; off, only
requests answered 5xx or slower than :data:`SLOW_SECONDS` (and so every WebSocket and SSE
session) get their line, at warning level.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from twinstore.logs import bind, unbind

__all__ = ["RequestContext"]

log = logging.getLogger("twinstore.access")

MAX_ID = 256  # longer correlation ids are cut in the log context (the handlers validate them)
SLOW_SECONDS = 1.0  # with access_log off, requests taking longer are still logged (and 5xx)


def _correlation_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"correlation-id":
            return value.decode("latin-1")[:MAX_ID] or str(uuid.uuid4())
    query: bytes = scope.get("query_string", b"")
    if b"correlation-id" in query:
        found = dict(parse_qsl(query.decode("latin-1"))).get("correlation-id")
        if found:
            return found[:MAX_ID]
    return str(uuid.uuid4())


class RequestContext:
    """ASGI wrapper: binds the log context of each request, and writes its access log line
    (every request with ``access_log``; else only those answered 5xx or taking over
    :data:`SLOW_SECONDS`, at warning level)."""

    def __init__(self, app: ASGIApp, *, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = bind(correlation_id=_correlation_id(scope))
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                status = message["status"]  # type: ignore[typeddict-item]
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and not status:
                status = 403  # closed before accepting: the server answers 403
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            duration = time.perf_counter() - start
            status = status or 500  # nothing sent: the server answers 500
            if self.access_log or status >= 500 or duration >= SLOW_SECONDS:
                _log(scope, status, duration, logging.INFO if self.access_log else logging.WARNING)
            unbind(token)


def _log(scope: Scope, status: int, duration: float, level: int) -> None:
    method = str(scope.get("method", "WS"))  # a WebSocket scope has none
    path: str = scope["path"]
    extra: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration * 1000, 2),
    }
    route = scope.get("path_template")
    if route is not None and route != path:
        extra["route"] = route
    log.log(level, "%s %s %d", method, path, status, extra=extra)
