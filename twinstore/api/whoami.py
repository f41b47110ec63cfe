"""``GET /api/2/whoami``: the caller's subjects, as Ditto answers it."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler

from twinstore.api.auth import authenticate
from twinstore.api.headers import parse_headers
from twinstore.api.things import json_response

__all__ = ["whoami_handlers"]


async def whoami(request: Request[Any, Any, Any]) -> Response[bytes]:
    """GET /api/2/whoami: ``{"subjects": [...], "defaultSubject": ...}`` of the caller."""
    context = await authenticate(request)
    h = parse_headers(request)
    body = {"subjects": list(context.subjects), "defaultSubject": context.subject}
    return json_response(200, body, {"correlation-id": h.correlation_id})


def whoami_handlers() -> list[HTTPRouteHandler]:
    """Route handlers of the whoami resource."""
    return [
        get(
            "/api/2/whoami",
            operation_id="getWhoami",
            tags=["Policies"],
            summary="The subjects the request is authenticated with (the first is the default)",
        )(whoami)
    ]
