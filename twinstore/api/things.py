"""The Ditto HTTP API v2 for things: ``/api/2/things`` and every sub-resource.

Every Ditto thing resource is a JSON pointer into the thing (``/attributes/a`` or
``/features/f/properties/x``), so one set of handlers serves all of them; the table
``RESOURCES`` gives each Ditto route its pointer, methods and documentation.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, cast

import orjson
from litestar import Request, Response, delete, get, patch, post, put, route
from litestar.handlers import HTTPRouteHandler

from twinstore.api import sse
from twinstore.api.auth import authenticate
from twinstore.api.headers import DittoHeaders, header_value, parse_headers
from twinstore.model.errors import (
    InvalidInputError,
    JsonInvalidError,
    UnsupportedMediaTypeError,
)
from twinstore.model.ids import parse_pointer, validate_namespace, validate_thing_id
from twinstore.model.limits import check_depth
from twinstore.model.thing import Command, Create, Delete, Event, JsonPatch, Merge, Modify
from twinstore.service import ThingService
from twinstore.store.journal import Committed, WriteRequest

__all__ = ["RESOURCES", "resource_handlers", "thing_handlers"]

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
LIST_LIMIT = 200

T = "/api/2/things/{thingId:str}"
F = T + "/features/{featureId:str}"

# (route, pointer template, methods, noun for docs)
RESOURCES: list[tuple[str, str, tuple[str, ...], str]] = [
    (T, "", ("GET", "PUT", "PATCH", "DELETE"), "thing"),
    (T + "/policyId", "/policyId", ("GET", "PUT", "PATCH"), "policy ID of a thing"),
    (T + "/definition", "/definition", ("GET", "PUT", "PATCH", "DELETE"), "definition of a thing"),
    (T + "/attributes", "/attributes", ("GET", "PUT", "PATCH", "DELETE"), "attributes of a thing"),
    (
        T + "/attributes/{attributePath:path}",
        "/attributes{attributePath}",
        ("GET", "PUT", "PATCH", "DELETE"),
        "attribute of a thing",
    ),
    (T + "/features", "/features", ("GET", "PUT", "PATCH", "DELETE"), "features of a thing"),
    (F, "/features/{featureId}", ("GET", "PUT", "PATCH", "DELETE"), "feature"),
    (
        F + "/definition",
        "/features/{featureId}/definition",
        ("GET", "PUT", "PATCH", "DELETE"),
        "definition of a feature",
    ),
    (
        F + "/properties",
        "/features/{featureId}/properties",
        ("GET", "PUT", "PATCH", "DELETE"),
        "properties of a feature",
    ),
    (
        F + "/properties/{propertyPath:path}",
        "/features/{featureId}/properties{propertyPath}",
        ("GET", "PUT", "PATCH", "DELETE"),
        "property of a feature",
    ),
    (
        F + "/desiredProperties",
        "/features/{featureId}/desiredProperties",
        ("GET", "PUT", "PATCH", "DELETE"),
        "desired properties of a feature",
    ),
    (
        F + "/desiredProperties/{propertyPath:path}",
        "/features/{featureId}/desiredProperties{propertyPath}",
        ("GET", "PUT", "PATCH", "DELETE"),
        "desired property of a feature",
    ),
]


def json_response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Response[bytes]:
    content = b"" if body is None and status in (202, 204, 304) else orjson.dumps(body)
    return Response(content=content, status_code=status, media_type=JSON, headers=headers or {})


def _media_type(request: Request[Any, Any, Any]) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


async def read_json(
    request: Request[Any, Any, Any], allowed: tuple[str, ...], *, optional: bool = False
) -> Any:
    """The request body as JSON, after checking its media type (415) and syntax (400)."""
    body = await request.body()
    if optional and not body.strip():
        return None
    media = _media_type(request)
    if not media and not body.strip():  # nothing sent: a missing body, not an unsupported one
        raise JsonInvalidError(
            f"The request has no body; this resource and method need a JSON body ({', '.join(allowed)})."
        )
    if media not in allowed:
        raise UnsupportedMediaTypeError(
            f"The Media-Type '{media or '<none>'}' is not supported for this resource and "
            f"method; use one of: {', '.join(allowed)}."
        )
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise JsonInvalidError(
            f"Failed to parse JSON string '{body[:200].decode(errors='replace')}': {exc}"
        ) from None
    check_depth(value)  # before anything walks it; a write checks its path's levels too
    return value


def _pointer(template: str, params: dict[str, Any]) -> str:
    return template.format(**params) or "/"


def _base_headers(h: DittoHeaders) -> dict[str, str]:
    return {"correlation-id": h.correlation_id}


def historical_headers(event: Event) -> dict[str, str]:
    """Response headers of a historical read: the revision and time shown and who made that change."""
    return {
        "at-historical-revision": str(event.revision),
        "at-historical-timestamp": event.timestamp.isoformat().replace("+00:00", "Z"),
        # ASCII-escaped JSON: an HTTP header value is Latin-1
        "historical-headers": json.dumps(
            {
                "ditto-originator": event.originator,
                "correlation-id": event.correlation_id,
                **(event.headers or {}),  # kept with the event, e.g. source-timestamp / source-quality
            },
            separators=(",", ":"),
        ),
    }


def _service(request: Request[Any, Any, Any]) -> ThingService:
    service: ThingService = request.app.state.runtime.service
    return service


def _write_response(
    request: Request[Any, Any, Any],
    h: DittoHeaders,
    done: Committed,
    location: str | None = None,
    pointer: str = "/",
) -> Response[bytes]:
    event = done.event
    # The ETag of the resource the request addressed (a JSON patch's event may lie deeper).
    parts = parse_pointer(pointer)
    headers = _base_headers(h)
    tag = done.tag(parts)
    if tag is not None:
        headers["etag"] = tag
    if not h.response_required:
        return json_response(202, headers=headers)
    # PATCH of a whole thing that did not exist creates it (as Ditto's ModifyToCreateThingTransformer).
    creates = request.method in ("PUT", "POST") or (request.method == "PATCH" and event.path == "/")
    if event.action == "created" and creates:
        headers["location"] = header_value(location or str(request.url).split("?")[0])
        body = event.value
        return json_response(201, body, headers)
    return json_response(204, headers=headers)


def _command(method: str, media: str, pointer: str, body: Any) -> Command:
    if method == "PUT":
        return Modify(path=pointer, value=body)
    if method == "DELETE":
        return Delete(path=pointer)
    if media == JSON_PATCH:
        return JsonPatch(path=pointer, value=body)
    return Merge(path=pointer, value=body)


def _make(
    method: str, template: str
) -> Callable[[Request[Any, Any, Any]], Coroutine[Any, Any, Response[bytes]]]:
    async def handler(request: Request[Any, Any, Any]) -> Response[bytes]:
        auth = await authenticate(request)
        h = parse_headers(request)
        thing_id = validate_thing_id(request.path_params["thingId"])
        pointer = _pointer(template, request.path_params)
        # An empty key ('//') is not addressable in Ditto; litestar collapses it in the path,
        # so look at the raw one (it would otherwise silently alias another resource).
        raw_path: bytes = request.scope.get("raw_path", b"")
        if b"//" in raw_path:
            raise InvalidInputError(
                f"The path '{raw_path.decode(errors='replace')}' contains an empty key ('//').",
                error="json.pointer.invalid",
            )
        service = _service(request)
        if method == "GET" and sse.wants_sse(request):
            return cast(Response[bytes], sse.thing_stream(request, auth, h, thing_id, pointer))
        if method == "GET":
            got = await service.retrieve(
                auth,
                thing_id,
                pointer,
                fields=h.fields,
                if_match=h.if_match,
                if_none_match=h.if_none_match,
                condition=h.condition,
                at_revision=h.at_historical_revision,
                at_timestamp=h.at_historical_timestamp,
            )
            headers = {**_base_headers(h), "etag": got.etag}
            if got.event is not None:
                headers.update(historical_headers(got.event))
            return json_response(200, got.value, headers)
        body = None
        if method == "PUT":
            body = await read_json(request, (JSON,))
        elif method == "PATCH":
            body = await read_json(request, (MERGE_PATCH, JSON_PATCH))
        command = _command(method, _media_type(request), pointer, body)
        done = await service.write(
            auth,
            WriteRequest(
                thing_id=thing_id,
                command=command,
                originator=auth.subject,
                correlation_id=h.correlation_id,
                if_match=h.if_match,
                if_none_match=h.if_none_match,
            ),
            allow_lockout=h.allow_policy_lockout,
            condition=h.condition,
        )
        return _write_response(request, h, done, pointer=pointer)

    return handler


_DECORATORS = {"GET": get, "PUT": put, "PATCH": patch, "DELETE": delete}
_VERBS = {"GET": "Retrieve", "PUT": "Create or replace", "PATCH": "Merge or JSON-patch", "DELETE": "Delete"}


def _operation_id(method: str, route: str) -> str:
    """``PUT /api/2/things/{thingId:str}/attributes`` -> ``putThingsThingIdAttributes``."""
    words = [w.strip("{}").split(":")[0] for w in route.replace("/api/2/", "").split("/") if w]
    return method.lower() + "".join(w[0].upper() + w[1:] for w in words)


async def list_things(request: Request[Any, Any, Any]) -> Response[bytes]:
    """GET /api/2/things: the things named by ``ids`` (in that order) or all, sorted by id."""
    auth = await authenticate(request)
    h = parse_headers(request)
    if sse.wants_sse(request):
        return cast(Response[bytes], sse.things_stream(request, auth, h))
    ids_param = request.query_params.get("ids")
    service = _service(request)
    if ids_param is not None:
        ids = [i.strip() for i in ids_param.split(",") if i.strip()]
        if not ids:
            raise InvalidInputError("The 'ids' parameter must name at least one Thing ID.")
        things = await service.retrieve_many(auth, ids, h.fields)
    else:
        things = await service.list_things(auth, h.fields, LIST_LIMIT)
    return json_response(200, things, _base_headers(h))


async def create_thing(request: Request[Any, Any, Any]) -> Response[bytes]:
    """POST /api/2/things: create a thing with a generated id in ``namespace``."""
    auth = await authenticate(request)
    h = parse_headers(request)
    # No body at all creates an empty thing; a JSON ``null`` is not a thing.
    body = await read_json(request, (JSON,)) if (await request.body()).strip() else {}
    if not isinstance(body, dict):
        raise InvalidInputError(
            "The body of a new Thing must be a JSON object.", error="things:thing.invalid"
        )
    body.pop("thingId", None)  # "any thingId specified in the request body will be ignored"
    namespace = validate_namespace(request.query_params.get("namespace", request.app.state.default_namespace))
    thing_id = f"{namespace}:{uuid.uuid4()}"
    done = await _service(request).write(
        auth,
        WriteRequest(
            thing_id=thing_id,
            command=Create(value=body),
            originator=auth.subject,
            correlation_id=h.correlation_id,
        ),
        allow_lockout=h.allow_policy_lockout,
    )
    base = str(request.url).split("?")[0].rstrip("/")
    return _write_response(request, h, done, location=f"{base}/{thing_id}")


def _options(path: str, methods: tuple[str, ...]) -> HTTPRouteHandler:
    """OPTIONS with the resource's ``Allow`` header.

    Declared explicitly: litestar's automatic OPTIONS handler only lists the methods of the
    first handler registered for a path (here one handler per method), e.g. ``GET, OPTIONS``.
    """
    allow = ", ".join([*methods, "OPTIONS"])

    async def handler() -> Response[bytes]:
        return Response(content=b"", status_code=204, headers={"allow": allow})

    return route(
        path, http_method=["OPTIONS"], include_in_schema=False, name=f"OPTIONS {path}", status_code=200
    )(handler)


def resource_handlers(
    path: str,
    methods: tuple[str, ...],
    noun: str,
    tags: list[str],
    make: Callable[[str], Callable[[Request[Any, Any, Any]], Coroutine[Any, Any, Response[bytes]]]],
) -> list[HTTPRouteHandler]:
    """OPTIONS and one handler per method (``make(method)``) of one Ditto resource."""
    handlers = [_options(path, methods)]
    for method in methods:
        handlers.append(
            _DECORATORS[method](
                path,
                operation_id=_operation_id(method, path),
                summary=f"{_VERBS[method]} the {noun}",
                tags=tags,
                name=f"{method} {path}",
                status_code=200,
            )(make(method))
        )
    return handlers


def thing_handlers() -> list[HTTPRouteHandler]:
    """Route handlers for every thing resource of the Ditto API."""
    handlers: list[HTTPRouteHandler] = [
        _options("/api/2/things", ("GET", "POST")),
        get(
            "/api/2/things",
            operation_id="getThings",
            tags=["Things"],
            summary="Retrieve things by ids (or all visible things)",
        )(list_things),
        post(
            "/api/2/things",
            operation_id="postThings",
            tags=["Things"],
            summary="Create a thing with a generated id",
            status_code=201,
        )(create_thing),
    ]
    for path, template, methods, noun in RESOURCES:
        tags = ["Features" if "/features" in path else "Things"]
        handlers += resource_handlers(path, methods, noun, tags, functools.partial(_make, template=template))
    return handlers
