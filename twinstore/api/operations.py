"""Operations endpoints of the API (``/metrics``, ``/health``, ``/ready``) and the HTTP metrics.

The endpoints answer without authentication, as Ditto's and Kubernetes' probes expect (the
Helm chart's NetworkPolicy restricts who reaches them); what they answer is
:mod:`twinstore.operations`, shared with the worker processes' listener.

:class:`HttpMetrics` wraps the whole ASGI app (routing and the error handler included, so a
404 is counted too): per request it counts ``(method, route template, status)`` and observes
the seconds until the status line, when the response starts (an SSE stream is not timed for
its whole life). It also keeps the open WebSocket sessions (accepted ones) and SSE streams
(responses of type ``text/event-stream``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, get
from litestar.enums import ScopeType
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send, WebSocketScope

from twinstore import operations

if TYPE_CHECKING:
    from twinstore.metrics import Metrics
    from twinstore.runtime import Runtime

__all__ = ["HttpMetrics", "operations_handlers"]

OTHER = "other"  # the route label of requests no route matched


def _response(found: operations.Answer) -> Response[bytes]:
    status, content_type, body = found
    # litestar adds the charset of text/* itself
    media_type = content_type.removesuffix("; charset=utf-8")
    return Response(content=body, status_code=status, media_type=media_type)


@get(
    "/health",
    operation_id="getHealth",
    tags=["Operations"],
    summary='Liveness: 200 {"status": "UP"} while the process runs (no database or NATS check)',
    media_type="application/json",
)
async def health(request: Request[Any, Any, Any]) -> Response[bytes]:
    return _response(await operations.health(request.app.state.runtime))


@get(
    "/ready",
    operation_id="getReady",
    tags=["Operations"],
    summary="Readiness: database reachable with the current schema and NATS connected (200 / 503)",
    media_type="application/json",
)
async def ready(request: Request[Any, Any, Any]) -> Response[bytes]:
    return _response(await operations.ready(request.app.state.runtime))


@get(
    "/metrics",
    operation_id="getMetrics",
    tags=["Operations"],
    summary="Prometheus metrics of this process (text exposition format)",
    media_type="text/plain",
)
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return _response(await operations.metrics(request.app.state.runtime))


def operations_handlers() -> list[HTTPRouteHandler]:
    return [health, ready, metrics]


class HttpMetrics:
    """ASGI wrapper counting requests and live sessions into the runtime's :class:`Metrics`.

    ``metrics`` is set once the runtime is known (``create_app`` or its lifespan); until
    then requests pass through uncounted.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.metrics: Metrics | None = None

    def bind(self, runtime: Runtime) -> None:
        self.metrics = runtime.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics
        if metrics is None:
            await self.app(scope, receive, send)
        elif scope["type"] == ScopeType.HTTP:
            await self._http(metrics, scope, receive, send)
        elif scope["type"] == ScopeType.WEBSOCKET:
            await self._websocket(metrics, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, metrics: Metrics, scope: HTTPScope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        stream = False

        async def counted(message: Message) -> None:
            nonlocal stream
            if message["type"] == "http.response.start":
                status: int = message["status"]
                metrics.observe_request(
                    scope["method"], scope.get("path_template") or OTHER, status, time.perf_counter() - start
                )
                for name, value in message.get("headers") or ():
                    if name == b"content-type":
                        if value.startswith(b"text/event-stream"):
                            stream = True
                            metrics.sse_sessions += 1
                        break
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            if stream:
                metrics.sse_sessions -= 1

    async def _websocket(self, metrics: Metrics, scope: WebSocketScope, receive: Receive, send: Send) -> None:
        accepted = False

        async def counted(message: Message) -> None:
            nonlocal accepted
            if message["type"] == "websocket.accept" and not accepted:
                accepted = True
                metrics.ws_sessions += 1
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            if accepted:
                metrics.ws_sessions -= 1
