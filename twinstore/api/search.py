"""Ditto's search API: ``GET|POST /api/2/search/things`` and ``GET|POST /api/2/search/things/count``.

Parameters (query string, or for POST an ``application/x-www-form-urlencoded`` body):
``filter`` (RQL), ``namespaces`` (comma-separated), ``fields`` (for things), ``option``
(``sort(+a,-b)``, ``size(n)``, ``cursor(c)``). The answer holds only things, and parts of
things, that the caller may read.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler

from twinstore.api.auth import authenticate
from twinstore.api.headers import parse_headers
from twinstore.api.things import _options, json_response
from twinstore.model.errors import InvalidInputError, UnsupportedMediaTypeError
from twinstore.model.fields import parse_fields
from twinstore.model.ids import validate_namespace
from twinstore.model.rql import parse_options
from twinstore.search import SearchService
from twinstore.service import view_of

__all__ = ["search_handlers"]

FORM = "application/x-www-form-urlencoded"


#: Parameters that may be repeated (Swagger UI sends one ``option`` per line): values are joined by commas.
REPEATABLE = ("option", "namespaces")


def _collect(pairs: list[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in pairs:
        params[key] = f"{params[key]},{value}" if key in REPEATABLE and key in params else value
    return params


async def _parameters(request: Request[Any, Any, Any]) -> dict[str, str]:
    """Query parameters, and for POST the form body (which wins)."""
    params = _collect(list(request.query_params.items()))
    if request.method == "POST":
        body = await request.body()
        if body.strip():
            media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
            if media != FORM:
                raise UnsupportedMediaTypeError(
                    f"The Media-Type '{media or '<none>'}' is not supported for a search; use {FORM}."
                )
            params.update(_collect(parse_qsl(body.decode(errors="replace"), keep_blank_values=True)))
    return params


def _namespaces(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [validate_namespace(n.strip()) for n in text.split(",") if n.strip()]
    if not names:
        raise InvalidInputError("The 'namespaces' parameter must name at least one namespace.")
    return names


def _service(request: Request[Any, Any, Any]) -> SearchService:
    service: SearchService = request.app.state.runtime.search
    return service


async def search_things(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Things matching ``filter`` that the caller may read, a page at a time."""
    auth = await authenticate(request)
    h = parse_headers(request)
    params = await _parameters(request)
    fields = parse_fields(params["fields"]) if params.get("fields") else None
    options = parse_options(params.get("option"))
    page = await _service(request).search(
        auth, params.get("filter"), _namespaces(params.get("namespaces")), options
    )
    body: dict[str, Any] = {"items": [view_of(state, fields) for state in page.states]}
    if page.cursor is not None:
        body["cursor"] = page.cursor
    if page.next_offset is not None:
        body["nextPageOffset"] = page.next_offset
    return json_response(200, body, {"correlation-id": h.correlation_id})


async def count_things(request: Request[Any, Any, Any]) -> Response[bytes]:
    """How many things matching ``filter`` the caller may read."""
    auth = await authenticate(request)
    h = parse_headers(request)
    params = await _parameters(request)
    total = await _service(request).count(auth, params.get("filter"), _namespaces(params.get("namespaces")))
    return json_response(200, total, {"correlation-id": h.correlation_id})


def search_handlers() -> list[HTTPRouteHandler]:
    """Routes of the search API (GET and POST for both)."""
    handlers: list[HTTPRouteHandler] = []
    for path, handler, noun in (
        ("/api/2/search/things", search_things, "Search things"),
        ("/api/2/search/things/count", count_things, "Count things"),
    ):
        name = "Count" if path.endswith("count") else ""
        handlers += [
            _options(path, ("GET", "POST")),
            get(path, operation_id=f"getSearchThings{name}", tags=["Things-Search"], summary=noun)(handler),
            post(
                path,
                operation_id=f"postSearchThings{name}",
                tags=["Things-Search"],
                summary=noun,
                status_code=200,
            )(handler),
        ]
    return handlers
