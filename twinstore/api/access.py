"""The request context of the logs, and the access log: one ASGI wrapper around the whole app.

Every HTTP request and WebSocket connection gets a correlation id in the log context
(:mod:`twinstore.logs`): Ditto's ``correlation-id`` header (or query parameter), else a new
UUID, which the handlers also answer with (:func:`~twinstore.api.headers.parse_headers`), so a
response and every log line it caused share one id. Authentication adds the ``subject``.

With ``access_log`` on, each request ends with one line on the ``twinstore.access`` logger:
``{"msg": "PUT /api/2/things/x 204", "method", "path", "route", "status", "duration_ms",
"correlation_id", "subject"}`` (a WebSocket session's line comes when it closes, with 101).
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
    """ASGI wrapper: binds the log context of each request, and writes its access log line."""

    def __init__(self, app: ASGIApp, *, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = bind(correlation_id=_correlation_id(scope))
        try:
            if self.access_log:
                await self._logged(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            unbind(token)

    async def _logged(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            method = str(scope.get("method", "WS"))  # a WebSocket scope has none
            path: str = scope["path"]
            status = status or 500  # nothing sent: the server answers 500
            extra: dict[str, Any] = {
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
            }
            route = scope.get("path_template")
            if route is not None and route != path:
                extra["route"] = route
            log.info("%s %s %d", method, path, status, extra=extra)
