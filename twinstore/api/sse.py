"""Ditto's Server-Sent Events: ``GET /api/2/things[/{thingId}[/<path>]]`` with ``Accept: text/event-stream``.

Each change the caller may read becomes one SSE event whose ``data`` has the JSON structure of
the HTTP resource the stream was opened on, holding only what changed (Ditto's semantics):

* ``/api/2/things`` (``ids``, ``namespaces``, ``filter``, ``extraFields``, ``fields``):
  ``{"thingId": ..., <changed part>}``; ``id: <thingId>:<revision>``;
* ``/api/2/things/{thingId}`` and below: the changed part relative to the resource (an event
  elsewhere in the thing is not sent); ``id: <revision>``.

With ``fields``, only the selected fields are sent, and a change touching none of them is not
sent. Deletions are not sent (a deleted resource has no JSON). Only changes committed after the
stream's response starts are sent (the journal's head is read before the status line goes out,
:func:`~twinstore.api.live.from_now`). A comment line every
``KEEPALIVE`` seconds keeps proxies from closing an idle stream; a client that does not keep up
(its queue of :data:`~twinstore.fanout.QUEUE_SIZE` events fills) has its stream ended, and so
does a stream whose credentials end (:class:`~twinstore.api.auth.CredentialWatch`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import orjson
from litestar import Request
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Scope, Send

from twinstore.api.auth import CredentialWatch
from twinstore.api.headers import DittoHeaders
from twinstore.api.history import SSE_NAMES, History, parse_range
from twinstore.api.live import LiveQuery, Matched, event_thing, from_now, parse_query
from twinstore.auth import AuthContext
from twinstore.fanout import SlowConsumerError, Subscription
from twinstore.model import patch as jp
from twinstore.model import rql
from twinstore.model.errors import DittoError, InvalidInputError
from twinstore.model.fields import select
from twinstore.model.ids import parse_pointer, validate_thing_id
from twinstore.runtime import Runtime

__all__ = ["HISTORY_PARAMS", "KEEPALIVE", "thing_stream", "things_stream", "wants_sse"]

log = logging.getLogger("twinstore.sse")

KEEPALIVE = 20.0
EVENT_STREAM = "text/event-stream"
HISTORY_PARAMS = tuple(SSE_NAMES)

Render = Callable[[Matched], tuple[str, Any] | None]


def wants_sse(request: Request[Any, Any, Any]) -> bool:
    return EVENT_STREAM in (request.headers.get("accept") or "").lower()


def _selected(value: dict[str, Any], fields: list[list[str]] | None) -> dict[str, Any] | None:
    """``value`` with the field selection; None when nothing but ids and metadata remain."""
    if fields is None:
        return value
    chosen: dict[str, Any] = select(value, fields)
    if not any(k != "thingId" and not k.startswith("_") for k in chosen):
        return None
    return chosen


def _meta(m: Matched) -> dict[str, Any]:
    return {"_revision": m.event.revision, "_modified": m.event.timestamp.isoformat().replace("+00:00", "Z")}


async def _events(
    runtime: Runtime,
    sub: Subscription,
    live: LiveQuery,
    render: Render,
    keepalive: float,
    auth: AuthContext,
) -> AsyncIterator[bytes]:
    assert runtime.journal is not None
    load = runtime.journal.load
    watch = CredentialWatch(runtime, lambda: auth)  # the stream ends with its credentials
    try:
        while not runtime.draining:  # server shutdown: the stream ends (clients reconnect)
            try:
                delivery = await watch.next(sub.get, keepalive)
            except SlowConsumerError as exc:
                if not runtime.draining:
                    log.warning("sse subscriber dropped: %s", exc)
                return
            if delivery is None:
                if watch.reason is not None:
                    return
                yield b":\n\n"
                continue
            if delivery.event.action == "deleted":
                continue
            try:
                matched = await live.apply(delivery, load)
            except DittoError:
                continue
            rendered = None if matched is None else render(matched)
            if rendered is not None:
                event_id, data = rendered
                yield b"id: " + event_id.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    finally:
        watch.close()
        sub.close()


class _StartFromNow:
    """The stream's ASGI response, started only once the subscription skips earlier changes.

    The handlers that open streams are synchronous, so the journal head is read here, before
    the status line: a change acknowledged after the client saw the response is always sent.
    A head that cannot be read answers 503 (the error handler's body) instead of a stream.
    """

    def __init__(self, response: ASGIResponse, runtime: Runtime, sub: Subscription) -> None:
        self.response = response
        self.runtime = runtime
        self.sub = sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.runtime.pool is not None
        try:
            await from_now(self.sub, self.runtime.pool)
            await self.response(scope, receive, send)
        finally:
            self.sub.close()  # also when the body was never iterated


class _LiveStream(Stream):
    __slots__ = ("runtime", "sub")

    def __init__(self, content: AsyncIterator[bytes], runtime: Runtime, sub: Subscription, **kw: Any) -> None:
        super().__init__(content=content, **kw)
        self.runtime = runtime
        self.sub = sub

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        return cast(ASGIResponse, _StartFromNow(response, self.runtime, self.sub))


def _response(runtime: Runtime, sub: Subscription, content: AsyncIterator[bytes], h: DittoHeaders) -> Stream:
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "correlation-id": h.correlation_id}
    return _LiveStream(content, runtime, sub, media_type=EVENT_STREAM, headers=headers)


def things_stream(request: Request[Any, Any, Any], auth: AuthContext, h: DittoHeaders) -> Stream:
    """SSE of ``/api/2/things``: changes of every readable thing (or of ``ids``), filtered."""
    runtime: Runtime = request.app.state.runtime
    assert runtime.fanout is not None
    params = dict(request.query_params)
    live = parse_query(params)
    thing_ids: frozenset[str] | None = None
    if "ids" in params:
        ids = [validate_thing_id(i.strip()) for i in params["ids"].split(",") if i.strip()]
        if not ids:
            raise InvalidInputError("The 'ids' parameter must name at least one Thing ID.")
        thing_ids = frozenset(ids)
    fields = h.fields

    def render(m: Matched) -> tuple[str, Any] | None:
        data = {**m.thing, **_meta(m)} if fields is not None else dict(m.thing)
        if m.extra:
            data = {**m.extra, **data}
        chosen = _selected(data, fields)
        return None if chosen is None else (f"{m.event.thing_id}:{m.event.revision}", chosen)

    sub = runtime.fanout.subscribe(
        auth.subjects,
        thing_ids=thing_ids,
        namespaces=None if thing_ids else live.namespaces,
        filter=live.filter,
    )
    return _response(runtime, sub, _events(runtime, sub, live, render, KEEPALIVE, auth), h)


def _thing_render(parts: list[str], fields: list[list[str]] | None) -> Render:
    """The SSE data of a thing stream (or of one of its resources): the changed part, relative to it."""

    def render(m: Matched) -> tuple[str, Any] | None:
        whole = {**m.thing, **_meta(m)} if fields is not None and not parts else m.thing
        value = jp.get_at(whole, parts)
        if value is jp.MISSING:
            return None
        if isinstance(value, dict):
            if m.extra and not parts:
                value = {**m.extra, **value}
            value = _selected(value, fields)
            if value is None:
                return None
        return str(m.event.revision), value

    return render


def thing_stream(
    request: Request[Any, Any, Any], auth: AuthContext, h: DittoHeaders, thing_id: str, pointer: str
) -> Stream:
    """SSE of one thing or one of its resources: the changed part, relative to the resource.

    With any of :data:`HISTORY_PARAMS`: the persisted events of that range instead (:func:`history_stream`).
    """
    if any(name in request.query_params for name in HISTORY_PARAMS):
        return history_stream(request, auth, h, thing_id, pointer)
    runtime: Runtime = request.app.state.runtime
    assert runtime.fanout is not None
    live = parse_query({k: v for k, v in request.query_params.items() if k == "extraFields"})
    render = _thing_render(parse_pointer(pointer), h.fields)
    sub = runtime.fanout.subscribe(auth.subjects, thing_ids=frozenset([thing_id]))
    return _response(runtime, sub, _events(runtime, sub, live, render, KEEPALIVE, auth), h)


# -- history: persisted events of a range (shared with the WebSocket, twinstore.api.history) -----


async def _history_content(history: History, render: Render) -> AsyncIterator[bytes]:
    """The readable events of the range, read page by page; the stream ends after the last."""
    async for shown in history.events():
        rendered = render(Matched(shown, event_thing(shown), None))
        if rendered is not None:
            event_id, data = rendered
            yield b"id: " + event_id.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _ResolveFirst:
    """The history stream's ASGI response, started only once its range resolved (else the error's)."""

    def __init__(self, response: ASGIResponse, history: History) -> None:
        self.response = response
        self.history = history

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.history.resolve()
        await self.response(scope, receive, send)


class _HistoryStream(Stream):
    __slots__ = ("history",)

    def __init__(self, content: AsyncIterator[bytes], history: History, **kw: Any) -> None:
        super().__init__(content=content, **kw)
        self.history = history

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        return cast(ASGIResponse, _ResolveFirst(response, self.history))


def history_stream(
    request: Request[Any, Any, Any], auth: AuthContext, h: DittoHeaders, thing_id: str, pointer: str
) -> Stream:
    """SSE of the persisted events of a range (Ditto's history streaming), then the end of the stream.

    Each event as in the live stream (the changed part relative to the resource, ``fields``
    applied), only what the caller may read under the thing's current policy, ``filter``
    evaluated on the event as for live events; deletions are not sent. Without a ``to-`` bound
    the range ends at the revision current when the stream starts (no live continuation).
    """
    runtime: Runtime = request.app.state.runtime
    params = dict(request.query_params)
    rng = parse_range(params, SSE_NAMES, require_from=True)
    filter_text = params.get("filter")
    node = rql.parse_filter(filter_text) if filter_text is not None else None
    parts = parse_pointer(pointer)
    history = History(runtime, auth.subjects, thing_id, rng, node, parts)
    render = _thing_render(parts, h.fields)
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "correlation-id": h.correlation_id}
    content = _history_content(history, render)
    return _HistoryStream(content, history, media_type=EVENT_STREAM, headers=headers)
