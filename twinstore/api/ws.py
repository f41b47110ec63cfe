"""Ditto's WebSocket ``/ws/2``: Ditto Protocol commands in, responses out (:mod:`twinstore.protocol`).

One connection is one :class:`Session`. Its receiver reads messages and starts one task per
command, at most ``max_in_flight`` at once: a command takes a slot before it starts and gives
it back once its response is sent, so a client that sends faster than it reads stops being
read (TCP backpressure) instead of filling memory. Its sender writes the responses in the
order they are ready (clients match them by ``correlation-id``); a send that takes longer than
``send_timeout`` means the client does not read, and the connection is closed (1008).

Authentication is the HTTP API's, on the upgrade request (basic, bearer, pre-authenticated);
browsers may pass a JWT as ``?access_token=<jwt>``. An unauthenticated upgrade is answered
with a 401 and Ditto's error body (where the server cannot send an HTTP answer to an upgrade,
it is closed with 1008). The text message ``JWT-TOKEN?jwtToken=<jwt>`` replaces the session's
token; a token that does not authenticate closes the connection (1008, with the reason). A
session ends (1008, "credentials ended: ...") when its credentials end: its JWT expires (and was
not replaced in time by ``JWT-TOKEN``), or its basic user is removed from the users file or gets
a new password (:class:`~twinstore.api.auth.CredentialWatch`).

``START-SEND-MESSAGES[?namespaces=..&filter=..]`` streams the live messages the session may
READ (:mod:`twinstore.messages`), its own excepted; it sends messages (and responses to those
it received) as Ditto Protocol envelopes on ``.../things/live/messages/<subject>``.

Ditto's streaming subscriptions for persisted events (reactive streams over the protocol):
``<ns>/<name>/things/twin/streaming/subscribeForPersistedEvents`` (``value``: the range as
``from/toHistoricalRevision`` or ``from/toHistoricalTimestamp``, optional ``filter``; ``path``:
the resource) is answered with ``.../streaming/created`` ``{"subscriptionId"}``; each
``.../streaming/request`` ``{"subscriptionId", "demand"}`` lets at most ``demand`` more
``.../streaming/next`` ``{"subscriptionId", "item"}`` out (the item is the event envelope the
live stream sends, partial under the caller's view); ``.../streaming/complete`` follows the
last, ``.../streaming/failed`` ``{"subscriptionId", "error"}`` reports an error (never before
the first request), ``.../streaming/cancel`` stops it. The events are those of
:class:`~twinstore.api.history.History` (as for SSE history streams), read a page at a time
and only once demanded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import parse_qsl

import orjson
from litestar import WebSocket, websocket
from litestar.handlers import WebsocketRouteHandler

from twinstore import protocol
from twinstore.api.access import MAX_ID
from twinstore.api.auth import CredentialWatch, authenticate
from twinstore.api.history import WS_NAMES, History, parse_range
from twinstore.api.live import LiveQuery, from_now, parse_query
from twinstore.auth import AuthContext
from twinstore.bus.envelope import event_envelope
from twinstore.fanout import SlowConsumerError, Subscription
from twinstore.logs import bind
from twinstore.messages import MessageSubscription
from twinstore.model import rql
from twinstore.model.errors import DittoError, InvalidInputError, JsonInvalidError, TooLargeError
from twinstore.model.ids import parse_pointer, validate_thing_id
from twinstore.runtime import Runtime

__all__ = ["Session", "ws_handlers"]

log = logging.getLogger("twinstore.ws")

MAX_IN_FLIGHT = 64
SEND_TIMEOUT = 30.0
DRAIN_TIMEOUT = 10.0
POLICY_VIOLATION = 1008
GOING_AWAY = 1001  # server shutdown: Ditto's clients reconnect (to another replica)
FLUSH_TIMEOUT = 2.0  # at shutdown, at most this long for the last answers to go out
JWT_PREFIX = "JWT-TOKEN?jwtToken="
# Ditto's streaming control messages (START-SEND-EVENTS?filter=..., STOP-SEND-MESSAGES, ...).
_CONTROL = re.compile(r"^(START|STOP)-SEND-[A-Z-]+(\?.*)?$", re.DOTALL)
EVENT_WINDOW = 16  # events handed to the sender and not yet written; the rest wait in the subscription
# What an outbox item gives back once sent: a command slot, an event window place, or nothing.
Kind = Literal["slot", "event", "none"]
MAX_STREAMS = 32  # streaming subscriptions (persisted events) one session may have open at once
MAX_DEMAND = 2**62  # a demand this large is unbounded (reactive streams: Long.MAX_VALUE)
STREAMING_ACTIONS = ("subscribeForPersistedEvents", "request", "cancel")


class NotSupportedError(DittoError):
    status = 501
    error = "gateway:streaming.notsupported"
    description = "twinstore's WebSocket streams twin events; live commands and events are not supported yet."


class StreamingNotFoundError(DittoError):
    status = 404
    error = "streaming.subscription.not.found"
    description = (
        "Use the subscriptionId of a 'created' event; a subscription ends with its 'complete' or "
        "'failed' event, or with 'cancel'."
    )


class StreamingProtocolError(DittoError):
    status = 400
    error = "streaming.subscription.protocol.error"
    description = "Request a positive number of items with 'demand'."


class TooManyStreamsError(DittoError):
    status = 429
    error = "streaming.subscription.toomany"
    description = f"Cancel or finish a streaming subscription first (at most {MAX_STREAMS} per connection)."


class _Stream:
    """One streaming subscription: its demand, and the task sending its events (or its failure)."""

    __slots__ = ("correlation_id", "demand", "failure", "id", "prefix", "task", "wakeup")

    def __init__(self, stream_id: str, prefix: str, correlation_id: str) -> None:
        self.id = stream_id
        self.prefix = prefix  # <ns>/<name>/things/twin/streaming
        self.correlation_id = correlation_id  # of the last command: the events carry it (as Ditto)
        self.demand = 0
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.failure: DittoError | None = None  # an error to send at the first request

    def envelope(self, action: str, **value: Any) -> dict[str, Any]:
        return _streaming_envelope(self.prefix, action, self.id, self.correlation_id, **value)

    async def demanded(self) -> None:
        """Return once at least one more item may be sent."""
        while self.demand <= 0:
            self.wakeup.clear()
            await self.wakeup.wait()


def _streaming_envelope(
    prefix: str, action: str, stream_id: str, correlation_id: str, **value: Any
) -> dict[str, Any]:
    """A streaming subscription event: ``<prefix>/<action>`` with ``{"subscriptionId", ...}``."""
    return {
        "topic": f"{prefix}/{action}",
        "headers": {"correlation-id": correlation_id, "response-required": False},
        "path": "/",
        "value": {"subscriptionId": stream_id, **value},
    }


def _is_streaming(envelope: Any) -> bool:
    topic = envelope.get("topic") if isinstance(envelope, dict) else None
    return isinstance(topic, str) and topic.split("/")[2:5] == ["things", "twin", "streaming"]


def _header(envelope: Mapping[str, Any], name: str) -> Any:
    headers = envelope.get("headers")
    if not isinstance(headers, dict):
        return None
    return {str(k).lower(): v for k, v in headers.items()}.get(name)


def _demand(value: Any) -> int:
    """The positive integer ``demand`` of a request (reactive streams rule 3.9: else an error)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise StreamingProtocolError(
            f"The demand {value!r} is not a positive integer (reactive streams rule 3.9); "
            "the subscription is cancelled."
        )
    return min(value, MAX_DEMAND)


def _reason(text: str) -> str:
    """A close reason within the 123 bytes a close frame allows."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


class Session:
    """One authenticated WebSocket connection: receive, run commands concurrently, send."""

    def __init__(
        self,
        socket: WebSocket[Any, Any, Any],
        auth: AuthContext,
        runtime: Runtime,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.socket = socket
        self.auth = auth
        self.runtime = runtime
        self.send_timeout = send_timeout
        self.slots = asyncio.Semaphore(max_in_flight)
        # Never more than 2 * max_in_flight + EVENT_WINDOW items: each holds a slot or a window
        # place until it is sent, but a "failed" right after its "created" (too many streams).
        self.outbox: asyncio.Queue[tuple[str, Kind]] = asyncio.Queue()
        self.window = asyncio.Semaphore(EVENT_WINDOW)
        self.events: Subscription | None = None
        self.pump: asyncio.Task[None] | None = None
        self.id = uuid.uuid4().hex  # the origin of the messages it sends (not echoed to it)
        self.messages: MessageSubscription | None = None
        self.message_pump: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.max_message = runtime.settings.max_body_bytes
        self.streams: dict[str, _Stream] = {}
        self.stream_count = 0

    async def run(self) -> None:
        receiver = asyncio.create_task(self._receive_loop())
        sender = asyncio.create_task(self._send_loop())
        closed = asyncio.create_task(self.closed.wait())
        stopping = asyncio.create_task(self.runtime.stopping.wait())
        watch = CredentialWatch(self.runtime, lambda: self.auth)  # the session's current credentials
        self.runtime.sessions.add(self)
        try:
            await asyncio.wait(
                {receiver, sender, closed, stopping, watch.ended}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping.done() and not (receiver.done() or sender.done() or closed.done()):
                await self._going_away(receiver, sender)
            elif watch.reason is not None and not (receiver.done() or sender.done() or closed.done()):
                receiver.cancel()
                with contextlib.suppress(Exception):
                    reason = _reason(f"credentials ended: {watch.reason}")
                    await asyncio.wait_for(self.socket.close(POLICY_VIOLATION, reason), 5)
        finally:
            watch.close()
            await self._stop_events()
            await self._stop_messages()
            await self._stop_streams()
            for task in (receiver, sender, closed, stopping):
                task.cancel()
            await asyncio.gather(receiver, sender, closed, stopping, return_exceptions=True)
            self.runtime.sessions.discard(self)
            # Commands already running finish (their writes are not cut short); answers are dropped.
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=DRAIN_TIMEOUT)
            for task in self.tasks:
                task.cancel()

    async def _going_away(self, receiver: asyncio.Task[None], sender: asyncio.Task[None]) -> None:
        """Server shutdown: read no more commands, let those running finish and their answers
        go out, then close with 1001 (the client reconnects, to another replica)."""
        receiver.cancel()
        await self._stop_events()
        await self._stop_messages()
        await self._stop_streams()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=DRAIN_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_TIMEOUT):
                while not self.outbox.empty() and not sender.done():
                    await asyncio.sleep(0.01)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.socket.close(GOING_AWAY, "server shutting down"), 5)

    async def _receive_loop(self) -> None:
        while True:
            message = await self.socket.receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            text = message.get("text")
            data: str | bytes = text if text is not None else message.get("bytes") or b""
            if isinstance(data, str) and data.startswith("JWT-TOKEN"):
                if not await self._refresh(data):
                    return
                continue
            await self.slots.acquire()
            error: DittoError
            if len(data) > self.max_message:
                error = TooLargeError(f"The message of {len(data)} bytes exceeds {self.max_message} bytes.")
                self._enqueue(protocol.error_envelope(error, protocol.UNKNOWN_ERRORS_TOPIC))
            elif isinstance(data, str) and _CONTROL.match(data.strip()):
                await self._control(data.strip())
            else:
                decoded, envelope = _decode(data)
                if decoded and _is_streaming(envelope):
                    self._streaming(envelope)
                    continue
                task = asyncio.create_task(self._process(data, envelope if decoded else _UNDECODED))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _refresh(self, text: str) -> bool:
        """``JWT-TOKEN?jwtToken=<jwt>``: re-authenticate with it; on failure close the connection."""
        token = text[len(JWT_PREFIX) :].strip() if text.startswith(JWT_PREFIX) else ""
        try:
            self.auth = await authenticate(self.socket, authorization=f"Bearer {token}")
        except DittoError as exc:
            log.info("websocket token refresh refused: %s", exc.message)
            with contextlib.suppress(Exception):
                await self.socket.close(POLICY_VIOLATION, _reason(f"JWT-TOKEN refused: {exc.message}"))
            return False
        return True

    def _enqueue(self, envelope: dict[str, Any]) -> None:
        self.outbox.put_nowait((orjson.dumps(envelope).decode(), "slot"))

    async def _control(self, text: str) -> None:
        """``START-SEND-EVENTS[?namespaces=..&filter=..&extraFields=..]``, ``STOP-SEND-EVENTS``, messages."""
        name, _, query = text.partition("?")
        if name == "START-SEND-EVENTS":
            try:
                live = parse_query(dict(parse_qsl(query, keep_blank_values=True)))
            except DittoError as exc:
                self._enqueue(protocol.error_envelope(exc, protocol.UNKNOWN_ERRORS_TOPIC))
                return
            await self._stop_events()
            try:
                await self._start_events(live)
            except DittoError as exc:
                self._enqueue(protocol.error_envelope(exc, protocol.UNKNOWN_ERRORS_TOPIC))
                return
        elif name == "STOP-SEND-EVENTS":
            await self._stop_events()
        elif name == "START-SEND-MESSAGES":
            try:
                live = parse_query(dict(parse_qsl(query, keep_blank_values=True)))
            except DittoError as exc:
                self._enqueue(protocol.error_envelope(exc, protocol.UNKNOWN_ERRORS_TOPIC))
                return
            await self._stop_messages()
            self._start_messages(live)
        elif name == "STOP-SEND-MESSAGES":
            await self._stop_messages()
        else:
            error = NotSupportedError(f"'{name}' is not supported yet.")
            self._enqueue(protocol.error_envelope(error, protocol.UNKNOWN_ERRORS_TOPIC))
            return
        self.outbox.put_nowait((f"{name}:ACK", "slot"))

    async def _start_events(self, live: LiveQuery) -> None:
        """Subscribe, then skip what was committed before (the ACK follows, see :func:`from_now`)."""
        fanout, pool = self.runtime.fanout, self.runtime.pool
        assert fanout is not None and pool is not None
        self.events = fanout.subscribe(self.auth.subjects, namespaces=live.namespaces, filter=live.filter)
        try:
            await from_now(self.events, pool)  # closes it on failure
        except DittoError:
            self.events = None
            raise
        self.pump = asyncio.create_task(self._pump_events(self.events, live))

    async def _stop_events(self) -> None:
        pump, events = self.pump, self.events
        self.pump = self.events = None
        if events is not None:
            events.close()
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump_events(self, events: Subscription, live: LiveQuery) -> None:
        """Subscription -> outbox, at most EVENT_WINDOW unsent; a full subscription drops the session."""
        assert self.runtime.journal is not None
        load = self.runtime.journal.load
        try:
            while True:
                delivery = await events.get()
                try:
                    matched = await live.apply(delivery, load)
                except DittoError:
                    continue
                if matched is None:
                    continue
                envelope = event_envelope(matched.event)
                if matched.extra is not None:
                    envelope["extra"] = matched.extra
                await self.window.acquire()
                self.outbox.put_nowait((orjson.dumps(envelope).decode(), "event"))
        except SlowConsumerError as exc:
            if self.runtime.draining:
                return  # server shutdown: the session closes with 1001
            log.warning("websocket event subscriber dropped: %s", exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.socket.close(POLICY_VIOLATION, _reason(str(exc))), 5)
            self.closed.set()

    def _start_messages(self, live: LiveQuery) -> None:
        service = self.runtime.messages
        assert service is not None
        self.messages = service.subscribe(
            self.auth.subjects, namespaces=live.namespaces, filter=live.filter, origin=self.id
        )
        self.message_pump = asyncio.create_task(self._pump_messages(self.messages))

    async def _stop_messages(self) -> None:
        pump, messages = self.message_pump, self.messages
        self.message_pump = self.messages = None
        if messages is not None:
            messages.close()
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump_messages(self, messages: MessageSubscription) -> None:
        """Messages -> outbox, sharing the event window; a full subscription drops the session."""
        try:
            while True:
                envelope = await messages.get()
                await self.window.acquire()
                self.outbox.put_nowait((orjson.dumps(envelope).decode(), "event"))
        except SlowConsumerError as exc:
            if self.runtime.draining:
                return  # server shutdown: the session closes with 1001
            log.warning("websocket message receiver dropped: %s", exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.socket.close(POLICY_VIOLATION, _reason(str(exc))), 5)
            self.closed.set()

    # -- streaming subscriptions for persisted events -----------------------------------------

    def _streaming(self, envelope: dict[str, Any]) -> None:
        """One ``.../things/twin/streaming/<action>`` command, handled at once (in order), holding
        the slot taken for it until its answer (if any) is sent."""
        parts = str(envelope["topic"]).split("/")
        prefix = "/".join(parts[:5])
        correlation = _header(envelope, "correlation-id")
        if not isinstance(correlation, str) or not correlation:
            correlation = str(uuid.uuid4())
        action = parts[5] if len(parts) == 6 else ""
        errors = f"{parts[0]}/{parts[1]}/things/twin/errors"
        if action not in STREAMING_ACTIONS:
            error = InvalidInputError(
                f"The topic path '{envelope['topic']}' is not supported: the streaming action "
                f"'{'/'.join(parts[5:])}' is unknown (only {', '.join(STREAMING_ACTIONS)}).",
                error=protocol.UNKNOWN_TOPIC,
            )
            self._enqueue(protocol.error_envelope(error, errors, correlation))
        elif action == "subscribeForPersistedEvents":
            self._subscribe(envelope, prefix, correlation)
        else:
            value = envelope.get("value")
            stream_id = value.get("subscriptionId") if isinstance(value, dict) else None
            if not isinstance(stream_id, str):
                error = JsonInvalidError(f"The '{action}' command needs a 'value' with a 'subscriptionId'.")
                self._enqueue(protocol.error_envelope(error, errors, correlation))
                return
            assert isinstance(value, dict)
            self._command(action, stream_id, prefix, correlation, value)

    def _subscribe(self, envelope: dict[str, Any], prefix: str, correlation: str) -> None:
        """``subscribeForPersistedEvents``: always answered with ``created``; an invalid command, a
        thing that cannot be read or a range outside its history fail at the first request."""
        self.stream_count += 1
        stream = _Stream(str(self.stream_count), prefix, correlation)
        self._enqueue(stream.envelope("created"))
        if len(self.streams) >= MAX_STREAMS:
            error = TooManyStreamsError(f"This connection already has {MAX_STREAMS} streaming subscriptions.")
            failed = orjson.dumps(stream.envelope("failed", error=error.to_dict())).decode()
            self.outbox.put_nowait((failed, "none"))  # the command's slot goes back with 'created'
            return
        try:
            namespace, name = prefix.split("/")[:2]
            thing_id = validate_thing_id(f"{namespace}:{name}")
            path = envelope.get("path", "/")
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidInputError(
                    f"The envelope's 'path' must be a JSON pointer string starting with '/', not {path!r}.",
                    error="json.pointer.invalid",
                )
            value = envelope.get("value")
            value = {} if value is None else value
            if not isinstance(value, dict):
                raise JsonInvalidError("The value of 'subscribeForPersistedEvents' must be a JSON object.")
            rng = parse_range(value, WS_NAMES, require_from=False)
            filter_text = value.get("filter")
            if filter_text is not None and not isinstance(filter_text, str):
                raise JsonInvalidError("The 'filter' of 'subscribeForPersistedEvents' must be an RQL string.")
            node = rql.parse_filter(filter_text) if filter_text is not None else None
            history = History(self.runtime, self.auth.subjects, thing_id, rng, node, parse_pointer(path))
        except DittoError as exc:
            stream.failure = exc
        else:
            stream.task = asyncio.create_task(self._run_stream(stream, history))
        self.streams[stream.id] = stream

    def _command(
        self, action: str, stream_id: str, prefix: str, correlation: str, value: dict[str, Any]
    ) -> None:
        """``request`` or ``cancel`` of the subscription ``stream_id``."""
        stream = self.streams.get(stream_id)
        if stream is None:
            error = StreamingNotFoundError(f"No streaming subscription with ID '{stream_id}' exists.")
            failed = _streaming_envelope(prefix, "failed", stream_id, correlation, error=error.to_dict())
            self._enqueue(failed)
            return
        stream.correlation_id = correlation
        if action == "cancel":
            self._end_stream(stream)
            self.slots.release()  # no answer
            return
        try:
            demand = _demand(value.get("demand"))
            if stream.failure is not None:
                raise stream.failure
        except DittoError as exc:
            self._end_stream(stream)
            self._enqueue(stream.envelope("failed", error=exc.to_dict()))
            return
        stream.demand += demand
        stream.wakeup.set()
        self.slots.release()  # answered by the subscription's task, within its demand

    def _end_stream(self, stream: _Stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if stream.task is not None:
            stream.task.cancel()

    async def _stop_streams(self) -> None:
        tasks = [s.task for s in self.streams.values() if s.task is not None]
        self.streams.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_send(self, stream: _Stream, action: str, **value: Any) -> None:
        """A streaming event into the outbox, within the event window (as live events)."""
        text = orjson.dumps(stream.envelope(action, **value)).decode()
        await self.window.acquire()
        self.outbox.put_nowait((text, "event"))

    async def _run_stream(self, stream: _Stream, history: History) -> None:
        """After the first request: resolve the range, then one ``next`` per demanded event (read a
        page at a time), then ``complete``; any error ends it with ``failed``."""
        try:
            await stream.demanded()
            await history.resolve()
            async with contextlib.aclosing(history.events()) as events:
                async for shown in events:
                    await stream.demanded()
                    stream.demand -= 1
                    await self._stream_send(stream, "next", item=event_envelope(shown))
            await self._stream_send(stream, "complete")
        except DittoError as exc:
            await self._stream_send(stream, "failed", error=exc.to_dict())
        except Exception:
            log.exception("streaming subscription failed", extra={"correlation_id": stream.correlation_id})
            error = DittoError(
                "An unexpected error occurred; it was logged.",
                description="Report this with the correlation id if it persists.",
            )
            await self._stream_send(stream, "failed", error=error.to_dict())
        finally:
            if self.streams.get(stream.id) is stream:
                del self.streams[stream.id]

    async def _process(self, data: str | bytes, envelope: Any) -> None:
        correlation = _header(envelope, "correlation-id") if isinstance(envelope, dict) else None
        if isinstance(correlation, str) and correlation:
            bind(correlation_id=correlation[:MAX_ID])  # this command's task only
        queued = False
        try:
            if envelope is _UNDECODED:  # answered with the protocol's json.invalid error
                response = await protocol.handle_text(data, self.auth, self.runtime, origin=self.id)
            else:
                response = await protocol.handle(envelope, self.auth, self.runtime, origin=self.id)
            if response is not None:
                self._enqueue(response)
                queued = True
        finally:
            if not queued:
                self.slots.release()

    async def _send_loop(self) -> None:
        while True:
            text, kind = await self.outbox.get()
            try:
                async with asyncio.timeout(self.send_timeout):  # no extra task per message
                    await self.socket.send_text(text)
            except TimeoutError:
                log.warning("websocket client does not read its responses; closing")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.socket.close(POLICY_VIOLATION, "responses were not read in time"), 5
                    )
                return
            except Exception:  # the client went away
                return
            if kind != "none":
                (self.slots if kind == "slot" else self.window).release()


_UNDECODED = object()


def _decode(data: str | bytes) -> tuple[bool, Any]:
    """``(True, the JSON value)``, or ``(False, None)`` when ``data`` is not JSON."""
    try:
        return True, orjson.loads(data)
    except orjson.JSONDecodeError:
        return False, None


async def _refuse(socket: WebSocket[Any, Any, Any], error: DittoError) -> None:
    """Answer the upgrade with the error (an HTTP 401 and Ditto's body), or close with 1008."""
    if "websocket.http.response" in (socket.scope.get("extensions") or {}):
        await socket.receive()  # websocket.connect
        await socket.send(
            {
                "type": "websocket.http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Basic realm="twinstore"'),
                ],
            }
        )
        await socket.send(
            {
                "type": "websocket.http.response.body",
                "body": orjson.dumps(error.to_dict()),
                "more_body": False,
            }
        )
    else:
        await socket.close(POLICY_VIOLATION, _reason(error.message))


@websocket("/ws/2", name="ws2")
async def ws2(socket: WebSocket[Any, Any, Any]) -> None:
    """Ditto Protocol over WebSocket (API version 2)."""
    token = socket.query_params.get("access_token")
    try:
        auth = await authenticate(socket, authorization=None if token is None else f"Bearer {token}")
    except DittoError as exc:
        await _refuse(socket, exc)
        return
    await socket.accept()
    runtime: Runtime = socket.app.state.runtime
    if runtime.draining:  # shutting down: connect to another replica
        await socket.close(GOING_AWAY, "server shutting down")
        return
    await Session(socket, auth, runtime).run()


def ws_handlers() -> list[WebsocketRouteHandler]:
    """The WebSocket route handlers (``/ws/2``)."""
    return [ws2]
