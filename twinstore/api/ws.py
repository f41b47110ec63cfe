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
token; a token that does not authenticate closes the connection (1008, with the reason).

``START-SEND-MESSAGES[?namespaces=..&filter=..]`` streams the live messages the session may
READ (:mod:`twinstore.messages`), its own excepted; it sends messages (and responses to those
it received) as Ditto Protocol envelopes on ``.../things/live/messages/<subject>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from typing import Any, Literal
from urllib.parse import parse_qsl

import orjson
from litestar import WebSocket, websocket
from litestar.handlers import WebsocketRouteHandler

from twinstore import protocol
from twinstore.api.auth import authenticate
from twinstore.api.live import LiveQuery, from_now, parse_query
from twinstore.auth import AuthContext
from twinstore.bus.envelope import event_envelope
from twinstore.fanout import SlowConsumerError, Subscription
from twinstore.messages import MessageSubscription
from twinstore.model.errors import DittoError, TooLargeError
from twinstore.runtime import Runtime

__all__ = ["Session", "ws_handlers"]

log = logging.getLogger("twinstore.ws")

MAX_IN_FLIGHT = 64
SEND_TIMEOUT = 30.0
DRAIN_TIMEOUT = 10.0
POLICY_VIOLATION = 1008
JWT_PREFIX = "JWT-TOKEN?jwtToken="
# Ditto's streaming control messages (START-SEND-EVENTS?filter=..., STOP-SEND-MESSAGES, ...).
_CONTROL = re.compile(r"^(START|STOP)-SEND-[A-Z-]+(\?.*)?$", re.DOTALL)
EVENT_WINDOW = 16  # events handed to the sender and not yet written; the rest wait in the subscription
# What an outbox item gives back once sent: a command slot, an event window place, or nothing.
Kind = Literal["slot", "event"]


class NotSupportedError(DittoError):
    status = 501
    error = "gateway:streaming.notsupported"
    description = "twinstore's WebSocket streams twin events; live commands and events are not supported yet."


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
        # Never more than max_in_flight + EVENT_WINDOW items: each holds a slot until it is sent.
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

    async def run(self) -> None:
        receiver = asyncio.create_task(self._receive_loop())
        sender = asyncio.create_task(self._send_loop())
        closed = asyncio.create_task(self.closed.wait())
        try:
            await asyncio.wait({receiver, sender, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._stop_events()
            await self._stop_messages()
            for task in (receiver, sender, closed):
                task.cancel()
            await asyncio.gather(receiver, sender, closed, return_exceptions=True)
            # Commands already running finish (their writes are not cut short); answers are dropped.
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=DRAIN_TIMEOUT)
            for task in self.tasks:
                task.cancel()

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
                task = asyncio.create_task(self._process(data))
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
            log.warning("websocket message receiver dropped: %s", exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.socket.close(POLICY_VIOLATION, _reason(str(exc))), 5)
            self.closed.set()

    async def _process(self, data: str | bytes) -> None:
        queued = False
        try:
            response = await protocol.handle_text(data, self.auth, self.runtime, origin=self.id)
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
            (self.slots if kind == "slot" else self.window).release()


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
    await Session(socket, auth, socket.app.state.runtime).run()


def ws_handlers() -> list[WebsocketRouteHandler]:
    """The WebSocket route handlers (``/ws/2``)."""
    return [ws2]
