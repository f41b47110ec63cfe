"""Ditto's HTTP messages API: ``POST /api/2/things/{thingId}[/features/{f}]/<box>/messages/{subject}``.

``<box>`` is ``inbox`` (to the thing) or ``outbox`` (from it). The body is the payload (its
``Content-Type`` says what it is: JSON, text, or anything else, carried base64-encoded as
Ditto's protocol adapter does). The request waits up to ``timeout`` seconds (query parameter
or header; default 10, at most 60) for the first response of a receiver, whose ``status``,
``content-type`` and value become the HTTP response (a 204 has no body); ``timeout=0`` or
``response-required=false`` answers 202 at once; no response in time is 408
``messages:message.timeout``. See :mod:`twinstore.messages` for permissions.

``GET`` of the same resources, and of ``.../<box>/messages`` for every subject, with ``Accept:
text/event-stream`` streams the live messages the caller may READ as Server-Sent Events: one
event per message, ``event: <subject>``, ``id: <correlation-id>``, ``data:`` its Ditto Protocol
envelope (as on the WebSocket); the anomaly stream, for one, is
``/api/2/things/{thingId}/features/{featureId}/outbox/messages/anomaly``. A comment every
``KEEPALIVE`` seconds; a client that does not keep up has its stream ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.response import Stream

from twinstore.api.auth import CredentialWatch, authenticate
from twinstore.api.headers import header, parse_headers
from twinstore.api.sse import EVENT_STREAM, KEEPALIVE, wants_sse
from twinstore.auth import AuthContext
from twinstore.mailbox import SlowConsumerError
from twinstore.messages import (
    Message,
    MessageSubscription,
    decode_payload,
    encode_payload,
    parse_timeout,
    validate_subject,
)
from twinstore.model import rql
from twinstore.model.errors import DittoError
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


class NotAcceptableError(DittoError):
    status = 406
    error = "messages:accept.invalid"
    description = "Messages are read as Server-Sent Events: send 'Accept: text/event-stream'."


async def _sse(
    runtime: Runtime, sub: MessageSubscription, prefix: str, subject: str | None, auth: AuthContext
) -> AsyncIterator[bytes]:
    watch = CredentialWatch(runtime, lambda: auth)  # the stream ends with its credentials
    try:
        while not runtime.draining:  # server shutdown: the stream ends (clients reconnect)
            try:
                envelope = await watch.next(sub.get, KEEPALIVE)
            except SlowConsumerError:
                return
            if envelope is None:
                if watch.reason is not None:
                    return
                yield b":\n\n"
                continue
            path = str(envelope.get("path", ""))
            if not path.startswith(prefix) or (subject is not None and path != prefix + subject):
                continue
            name = path[len(prefix) :].replace("\n", " ")
            correlation = str((envelope.get("headers") or {}).get("correlation-id", "")).replace("\n", " ")
            yield (
                b"event: " + name.encode() + b"\nid: " + correlation.encode()
                + b"\ndata: " + orjson.dumps(envelope) + b"\n\n"
            )  # fmt: skip
    finally:
        watch.close()
        sub.close()


async def _stream(request: Request[Any, Any, Any], direction: str) -> Stream:
    """The live messages of one thing's (or feature's) box as Server-Sent Events."""
    if not wants_sse(request):
        raise NotAcceptableError("This resource only streams messages (Accept: text/event-stream).")
    auth = await authenticate(request)
    h = parse_headers(request)
    runtime: Runtime = request.app.state.runtime
    assert runtime.messages is not None
    thing_id = validate_thing_id(request.path_params["thingId"])
    # Refused before the stream starts: headers and then silence would tell nothing apart.
    await runtime.messages.check_visible(auth, thing_id)
    feature_id = request.path_params.get("featureId")
    raw = request.path_params.get("messageSubject")
    subject = None if raw is None or not str(raw).strip("/") else validate_subject(str(raw).lstrip("/"))
    prefix = (f"/features/{feature_id}" if feature_id is not None else "") + f"/{direction}/messages/"
    sub = runtime.messages.subscribe(auth.subjects, filter=rql.parse_filter(f'eq(thingId,"{thing_id}")'))
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "correlation-id": h.correlation_id}
    return Stream(_sse(runtime, sub, prefix, subject, auth), media_type=EVENT_STREAM, headers=headers)


def _reader(route: str, direction: str, feature: bool) -> HTTPRouteHandler:
    async def stream(request: Request[Any, Any, Any]) -> Stream:
        return await _stream(request, direction)

    words = ("Feature" if feature else "Thing", "to" if direction == "inbox" else "from")
    subject = route.endswith("}")
    return get(
        route,
        operation_id=f"get{words[0]}{direction.capitalize()}Messages{'OfSubject' if subject else ''}",
        summary=f"Receive the live messages {words[1]} a {words[0].lower()} (text/event-stream)",
        tags=["Messages"],
        name=f"GET {route}",
        status_code=200,
    )(stream)


def message_handlers() -> list[HTTPRouteHandler]:
    """The message routes (thing or feature, inbox or outbox): send, and stream as SSE."""
    handlers = []
    for base, feature in ((T, False), (F, True)):
        for direction in ("inbox", "outbox"):
            route = f"{base}/{direction}/messages/{{messageSubject:path}}"
            handlers.append(_handler(route, direction, feature))
            handlers.append(_reader(route, direction, feature))
            handlers.append(_reader(f"{base}/{direction}/messages", direction, feature))
    return handlers
