"""The litestar application: routes, the one error handler, operations endpoints, OpenAPI.

``create_app(settings, runtime=None)``: the lifespan opens a :class:`Runtime` unless one is
passed in (tests pass their own).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

import twinstore
from twinstore.api.access import RequestContext
from twinstore.api.anomaly import anomaly_handlers
from twinstore.api.docs import OPENAPI_PATH, LocalScalarPlugin, docs_handlers
from twinstore.api.headers import HeaderLimit, correlation_id
from twinstore.api.messages import message_handlers
from twinstore.api.operations import HttpMetrics, operations_handlers
from twinstore.api.policies import policy_handlers
from twinstore.api.search import search_handlers
from twinstore.api.things import json_response, thing_handlers
from twinstore.api.whoami import whoami_handlers
from twinstore.api.ws import ws_handlers
from twinstore.logs import context_field
from twinstore.model.errors import (
    DittoError,
    PreconditionFailedError,
    PreconditionNotModifiedError,
    UnavailableError,
)
from twinstore.runtime import Runtime
from twinstore.settings import Settings
from twinstore.store import is_unavailable

__all__ = ["create_app"]

log = logging.getLogger("twinstore.api")

_HTTP_ERRORS = {
    400: ("things:request.invalid", "Check the request."),
    404: ("gateway:routing.notfound", "Check the URL: this resource does not exist in the API."),
    405: ("gateway:method.notallowed", "Check the HTTP method: the resource does not support it."),
    413: ("things:thing.tooLarge", "Reduce the size of the request body."),
}


def ditto_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Map every exception to Ditto's error body; unknown ones are logged and become 500."""
    try:  # none given: the one its log lines carry
        correlation = correlation_id(request) or context_field("correlation_id")
    except DittoError:  # not echoed when it is not a valid header value
        correlation = None
    headers = {"correlation-id": correlation} if correlation else {}
    if not isinstance(exc, DittoError) and is_unavailable(exc):
        # A database restarting or gone: 503 like the rest of the outage (no driver text).
        log.warning("database unavailable", extra={"error": type(exc).__name__, "path": request.url.path})
        exc = UnavailableError("The database is not reachable; retry later.")
    if isinstance(exc, PreconditionNotModifiedError):
        return json_response(304, headers={**headers, "etag": exc.etag})
    if isinstance(exc, DittoError):
        body = exc.to_dict()
        if exc.status == 401:
            headers["www-authenticate"] = 'Basic realm="twinstore"'
        retry_after = getattr(exc, "retry_after", None)  # TooManyRequestsError: whole seconds, rounded up
        if retry_after is not None:
            headers["retry-after"] = str(max(1, -int(-retry_after // 1)))
        if isinstance(exc, PreconditionFailedError) and exc.etag is not None:
            headers["etag"] = exc.etag  # as Ditto: a 412 names the current entity tag
        return Response(
            content=orjson.dumps(body), status_code=exc.status, media_type="application/json", headers=headers
        )
    if isinstance(exc, HTTPException):
        status = exc.status_code
        code, description = _HTTP_ERRORS.get(status, ("gateway:request.invalid", "Check the request."))
        body = {"status": status, "error": code, "message": str(exc.detail), "description": description}
        headers.update(exc.headers or {})  # e.g. the Allow header a 405 must carry (RFC 9110)
        return Response(
            content=orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
        )
    log.exception("unhandled error", extra={"correlation_id": correlation, "path": request.url.path})
    body = {
        "status": 500,
        "error": "things:internalerror",
        "message": "An unexpected error occurred; it was logged.",
        "description": "Report this with the correlation id if it persists.",
    }
    return Response(
        content=orjson.dumps(body), status_code=500, media_type="application/json", headers=headers
    )


def create_app(settings: Settings, runtime: Runtime | None = None) -> Litestar:
    """The ASGI app; opens (and closes) a runtime unless one is given."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if runtime is not None:
            app.state.runtime = runtime
            yield
            return
        own = Runtime(settings)
        await own.open()
        app.state.runtime = own
        http_metrics.bind(own)
        try:
            yield
        finally:
            await own.close()

    app = Litestar(
        route_handlers=[
            *operations_handlers(),
            *thing_handlers(),
            *message_handlers(),
            *anomaly_handlers(),
            *policy_handlers(),
            *search_handlers(),
            *whoami_handlers(),
            *ws_handlers(),
            *docs_handlers(),
        ],
        lifespan=[lifespan],
        exception_handlers={Exception: ditto_error_handler},
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="twinstore",
            version=twinstore.__version__,
            description="Eclipse Ditto HTTP API v2 compatible digital-twin service.",
            path=OPENAPI_PATH,
            render_plugins=[LocalScalarPlugin()],  # shipped in the package: no CDN
        ),
        debug=False,
        logging_config=None,
    )
    app.state.default_namespace = "org.eclipse.ditto"
    # Innermost of the wrappers: an oversized request is still counted and logged, then answered 431.
    app.asgi_handler = HeaderLimit(app.asgi_handler, settings.max_header_bytes)
    # Around routing and the error handler: every request is counted (404s as route "other").
    app.asgi_handler = http_metrics = HttpMetrics(app.asgi_handler)
    # Around routing and the error handler: every request (404s included) gets its log context.
    app.asgi_handler = RequestContext(app.asgi_handler, access_log=settings.access_log)
    if runtime is not None:
        app.state.runtime = runtime
        http_metrics.bind(runtime)
    return app


def app_from_environment() -> Litestar:
    """App factory for multi-worker serving: settings come from ``TWINSTORE_*``."""
    from twinstore.logs import configure_logging
    from twinstore.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
