"""Ditto's HTTP messages API: ``POST /api/2/things/{thingId}[/features/{f}]/<box>/messages/{subject}``.

``<box>`` is ``inbox`` (to the thing) or ``outbox`` (from it). The body is the payload (its
``Content-Type`` says what it is: JSON, text, or anything else, carried base64-encoded as
Ditto's protocol adapter does). The request waits up to ``timeout`` seconds (query parameter
or header; default 10, at most 60) for the first response of a receiver, whose ``status``,
``content-type`` and value become the HTTP response (a 204 has no body); ``timeout=0`` or
``response-required=false`` answers 202 at once; no response in time is 408
``messages:message.timeout``. See :mod:`twinstore.messages` for permissions.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler

from twinstore.api.auth import authenticate
from twinstore.api.headers import header, parse_headers
from twinstore.messages import Message, decode_payload, encode_payload, parse_timeout, validate_subject
from twinstore.model.ids import validate_thing_id
from twinstore.runtime import Runtime

__all__ = ["message_handlers"]

T = "/api/2/things/{thingId:str}"
F = T + "/features/{featureId:str}"


def _status(envelope: dict[str, Any]) -> int:
    status = envelope.get("status")
    return status if isinstance(status, int) and 100 <= status <= 599 else 200


async def _send(request: Request[Any, Any, Any], direction: str) -> Response[bytes]:
    auth = await authenticate(request)
    h = parse_headers(request)
    runtime: Runtime = request.app.state.runtime
    assert runtime.messages is not None
    thing_id = validate_thing_id(request.path_params["thingId"])
    feature_id = request.path_params.get("featureId")
    subject = validate_subject(str(request.path_params["messageSubject"]).lstrip("/"))
    timeout = parse_timeout(header(request, "timeout"))
    content_type = request.headers.get("content-type")
    message = Message(
        thing_id=thing_id,
        feature_id=feature_id,
        subject=subject,
        direction="TO" if direction == "inbox" else "FROM",
        correlation_id=h.correlation_id,
        originator=auth.subject,
        value=decode_payload(await request.body(), content_type),
        content_type=content_type,
        timeout=timeout,
        response_required=h.response_required,
    )
    reply = await runtime.messages.send(auth, message, condition=h.condition)
    headers = {"correlation-id": h.correlation_id}
    if reply is None:
        return Response(content=b"", status_code=202, headers=headers)
    status = _status(reply)
    reply_headers = {str(k).lower(): v for k, v in (reply.get("headers") or {}).items()}
    reply_type = reply_headers.get("content-type")
    if status == 204 or "value" not in reply:
        return Response(content=b"", status_code=status, headers=headers)
    body, media = encode_payload(reply["value"], reply_type if isinstance(reply_type, str) else None)
    return Response(content=body, status_code=status, media_type=media, headers=headers)


def _handler(route: str, direction: str, feature: bool) -> HTTPRouteHandler:
    async def send(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await _send(request, direction)

    words = ("Feature" if feature else "Thing", "to" if direction == "inbox" else "from")
    return post(
        route,
        operation_id=f"post{words[0]}{direction.capitalize()}Message",
        summary=f"Send a message {words[1]} a {words[0].lower()}",
        tags=["Messages"],
        name=f"POST {route}",
        status_code=200,
    )(send)


def message_handlers() -> list[HTTPRouteHandler]:
    """The four message routes (thing or feature, inbox or outbox)."""
    handlers = []
    for base, feature in ((T, False), (F, True)):
        for direction in ("inbox", "outbox"):
            route = f"{base}/{direction}/messages/{{messageSubject:path}}"
            handlers.append(_handler(route, direction, feature))
    return handlers
