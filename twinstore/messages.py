"""Ditto live messages: sent to (``inbox``) or from (``outbox``) a thing or one of its features.

Messages are not persisted (as in Ditto): a message is published once on core NATS
(``<prefix>.messages.<partition>``, :class:`~twinstore.bus.subjects.Subjects`), every process
hands it to its own subscribers (WebSocket ``START-SEND-MESSAGES``) that may READ its resource
``message:/[features/<f>/]<inbox|outbox>/messages/<subject>`` in the thing's policy, and a
receiver's response envelope (same ``correlation-id``, with a ``status``) travels back to the
sender's process on the NATS reply subject the message was published with. The first response
completes the sender; none within the timeout is Ditto's 408 ``messages:message.timeout``.

Sending needs WRITE on the message resource; a thing that does not exist, or of which the
sender may see nothing at all, is 404; one the sender may see but not message is 403
``messages:send.notallowed`` (Ditto's error).

The one call for the service's own code (the anomaly stream) is
:meth:`MessageService.send_from_feature`: an outbox message of a feature, fire and forget.

>>> Message(thing_id="a:b", subject="ask", direction="TO", correlation_id="c", originator="u:x").path
'/inbox/messages/ask'
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from policies import READ, WRITE, SubjectView
from twinstore.auth import AuthContext
from twinstore.bus.subjects import Subjects
from twinstore.enforcement import PolicyCache, check_condition, readable_thing
from twinstore.mailbox import Mailbox
from twinstore.model import rql
from twinstore.model.errors import (
    DittoError,
    ForbiddenError,
    InvalidInputError,
    JsonInvalidError,
    not_found,
)
from twinstore.model.ids import split_thing_id, validate_thing_id
from twinstore.model.thing import ThingState

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_TIMEOUT",
    "Message",
    "MessageService",
    "MessageSubscription",
    "MessageTimeoutError",
    "SendNotAllowedError",
    "SubjectInvalidError",
    "TimeoutInvalidError",
    "decode_payload",
    "encode_payload",
    "message_from_envelope",
    "parse_timeout",
    "validate_subject",
]

log = logging.getLogger("twinstore.messages")

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 60.0
QUEUE_SIZE = 1024
DELIVERED_SIZE = 10_000  # messages this process delivered that may still be answered
POLICY_HEADER = "Twinstore-Policy-Id"
ORIGIN_HEADER = "Twinstore-Origin"


class MessageTimeoutError(DittoError):
    status = 408
    error = "messages:message.timeout"
    description = (
        "Try increasing the Message timeout or ensure that the recipient of the Message responds in time."
    )


class TimeoutInvalidError(InvalidInputError):
    error = "messages:timeout.invalid"
    description = "Choose a timeout inside the bounds."


class SubjectInvalidError(InvalidInputError):
    error = "messages:subject.invalid"
    description = (
        "It must not be empty and conform to RFC-3986 (URI) - check here if it does (select 'path' in the "
        "list): http://www.websitedev.de/temp/rfc3986-check.html.gz"
    )


class SendNotAllowedError(ForbiddenError):
    error = "messages:send.notallowed"
    description = (
        "Please make sure that the Thing exists and that you have WRITE permissions on the message "
        "resource in the policy of the Thing."
    )


# RFC 3986 path characters (segments separated by '/'), percent-encodings allowed.
_SUBJECT = re.compile(
    r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+)*$"
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def validate_subject(subject: str) -> str:
    """A message subject (a URI path, e.g. ``ask/question``); 400 ``messages:subject.invalid``."""
    if not _SUBJECT.match(subject):
        raise SubjectInvalidError(f"Subject '{subject}' is not valid!")
    return subject


def parse_timeout(text: str | None) -> float:
    """Ditto's ``timeout`` (seconds, or with ``ms``/``s``/``m``): default 10, 0 to 60 seconds.

    >>> parse_timeout(None), parse_timeout("0"), parse_timeout("500ms"), parse_timeout("1m")
    (10.0, 0.0, 0.5, 60.0)
    """
    if text is None or not text.strip():
        return DEFAULT_TIMEOUT
    match = _DURATION.match(text)
    if match is None:
        raise TimeoutInvalidError(
            f"The timeout '{text}' is not a duration.",
            description="Give the timeout in seconds (e.g. 10), or with a unit: 500ms, 10s, 1m.",
        )
    seconds = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    if seconds > MAX_TIMEOUT:
        shown = int(seconds) if seconds == int(seconds) else seconds
        raise TimeoutInvalidError(
            f"Timeout {shown} seconds is not inside its allowed bounds 0 - {int(MAX_TIMEOUT)} seconds!"
        )
    return seconds


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def decode_payload(body: bytes, content_type: str | None) -> Any:
    """An HTTP body as a message ``value``: JSON for JSON media types, text for ``text/*`` (and
    no type), base64 text for anything else (binary), as Ditto's protocol adapter does."""
    if not body:
        return None
    media = _media(content_type)
    if _is_json(media):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise JsonInvalidError(f"The message payload is not valid JSON: {exc}") from None
    if not media or media.startswith("text/"):
        try:
            return body.decode()
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode()


def encode_payload(value: Any, content_type: str | None) -> tuple[bytes, str]:
    """A response ``value`` as an HTTP body and its content type (the inverse of :func:`decode_payload`)."""
    media = _media(content_type)
    if value is None:
        return b"", content_type or "application/json"
    if _is_json(media) or (not media and not isinstance(value, str)):
        return orjson.dumps(value), content_type or "application/json"
    if isinstance(value, str):
        if not media or media.startswith("text/"):
            return value.encode(), content_type or "text/plain"
        with contextlib.suppress(binascii.Error, ValueError):
            return base64.b64decode(value, validate=True), content_type or "application/octet-stream"
        return value.encode(), content_type or "text/plain"
    return orjson.dumps(value), content_type or "application/json"


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One live message: to (``TO``, inbox) or from (``FROM``, outbox) a thing or a feature."""

    thing_id: str
    subject: str
    direction: Literal["TO", "FROM"]
    correlation_id: str
    originator: str
    feature_id: str | None = None
    value: Any = None
    content_type: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    response_required: bool = True

    @property
    def mailbox(self) -> str:
        return "inbox" if self.direction == "TO" else "outbox"

    @property
    def path(self) -> str:
        feature = f"/features/{self.feature_id}" if self.feature_id is not None else ""
        return f"{feature}/{self.mailbox}/messages/{self.subject}"

    @property
    def resource(self) -> list[str]:
        """The path of its ``message:`` resource in the thing's policy."""
        return self.path.strip("/").split("/")

    def envelope(self) -> dict[str, Any]:
        """The Ditto Protocol envelope receivers get."""
        namespace, name = split_thing_id(self.thing_id)
        headers: dict[str, Any] = {
            "thing-id": self.thing_id,
            "subject": self.subject,
            "direction": self.direction,
            "correlation-id": self.correlation_id,
            "ditto-originator": self.originator,
            "channel": "live",
            "response-required": self.response_required,
            "timeout": str(int(self.timeout)) if self.timeout == int(self.timeout) else f"{self.timeout}s",
        }
        if self.feature_id is not None:
            headers["feature-id"] = self.feature_id
        if self.content_type is not None:
            headers["content-type"] = self.content_type
        envelope: dict[str, Any] = {
            "topic": f"{namespace}/{name}/things/live/messages/{self.subject}",
            "headers": headers,
            "path": self.path,
        }
        if self.value is not None:
            envelope["value"] = self.value
        return envelope


_PATH = re.compile(r"^(?:/features/(?P<feature>[^/]+))?/(?P<mailbox>inbox|outbox)/messages/(?P<subject>.+)$")


def message_from_envelope(envelope: dict[str, Any], originator: str) -> Message:
    """A message from a Ditto Protocol live message envelope (topic, path, headers, value)."""
    topic = str(envelope.get("topic", "")).split("/")
    headers = {str(k).lower(): v for k, v in (envelope.get("headers") or {}).items()}
    if len(topic) < 6 or topic[2:5] != ["things", "live", "messages"]:
        raise InvalidInputError(f"'{envelope.get('topic')}' is not a live message topic.")
    thing_id = validate_thing_id(f"{topic[0]}:{topic[1]}")
    path = envelope.get("path")
    match = _PATH.match(path) if isinstance(path, str) else None
    if match is None:
        raise InvalidInputError(
            f"The path '{path}' of a message must be "
            "'[/features/<featureId>]/<inbox|outbox>/messages/<subject>'.",
            error="things:protocol.invalid",
        )
    subject = validate_subject(match["subject"])
    if "/".join(topic[5:]) != subject:
        raise SubjectInvalidError(f"The subject of the topic differs from the path's '{subject}'.")
    correlation = headers.get("correlation-id")
    content_type = headers.get("content-type")
    response_required = headers.get("response-required", True)
    timeout = headers.get("timeout")
    return Message(
        thing_id=thing_id,
        subject=subject,
        direction="TO" if match["mailbox"] == "inbox" else "FROM",
        feature_id=match["feature"],
        correlation_id=correlation if isinstance(correlation, str) and correlation else str(uuid.uuid4()),
        originator=originator,
        value=envelope.get("value"),
        content_type=content_type if isinstance(content_type, str) else None,
        timeout=parse_timeout(None if timeout is None else str(timeout)),
        response_required=str(response_required).lower() != "false",
    )


def _visible(view: SubjectView) -> bool:
    """May the view see the thing at all (READ on something of it, or a message permission)?"""
    thing = view.has_partial("thing", [], READ)
    return thing or any(view.has_partial("message", [], p) for p in (READ, WRITE))


class MessageSubscription(Mailbox[dict[str, Any]]):
    """One receiver (a WebSocket session): what it wants and its bounded queue of envelopes."""

    def __init__(
        self,
        service: MessageService,
        subjects: tuple[str, ...],
        *,
        namespaces: frozenset[str] | None,
        filter: rql.Node | None,
        origin: str | None,
        maxsize: int = QUEUE_SIZE,
    ) -> None:
        super().__init__(maxsize, "messages")
        self.service = service
        self.subjects = subjects
        self.namespaces = namespaces
        self.filter = filter
        self.origin = origin

    def offer(self, envelope: dict[str, Any]) -> None:
        """Queue an envelope; a full queue drops the subscriber (its reader sees why)."""
        if not self.put(envelope):
            self.service.dropped += 1
            self.end(self.reason or "dropped")

    def end(self, reason: str) -> None:
        self.drop(reason)
        self.service.unsubscribe(self)

    def close(self) -> None:
        self.service.unsubscribe(self)


class MessageService:
    """Sends live messages, hands them to this process's receivers, routes responses back."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        cache: PolicyCache,
        load: Callable[[str], Awaitable[ThingState]],
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.cache = cache
        self.load = load
        self.replies = subjects.replies_subject(uuid.uuid4().hex)
        self._subs: set[MessageSubscription] = set()
        self._waiting: dict[str, deque[asyncio.Future[dict[str, Any]]]] = {}
        # correlation-id -> (reply subject, expiry, the receivers it was delivered to: their
        # origin, or their subjects when they have none); only those may answer it
        self._delivered: OrderedDict[str, tuple[str, float, set[Any]]] = OrderedDict()
        self._nats_subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # receivers dropped as too slow (/metrics)

    async def start(self) -> None:
        if self._task is None:
            messages = await self.nc.subscribe(self.subjects.messages_wildcard)
            replies = await self.nc.subscribe(self.replies, cb=self._on_reply)
            self._nats_subs = [messages, replies]
            self._task = asyncio.create_task(self._run(messages), name="twinstore-messages")

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        for sub in self._nats_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for sub in list(self._subs):
            sub.end("server shutting down")

    # ---- sending ---------------------------------------------------------------------------

    async def _thing(self, thing_id: str) -> tuple[ThingState, str]:
        state = await self.load(thing_id)
        policy_id = (state.doc or {}).get("policyId")
        if state.doc is None or not isinstance(policy_id, str):
            raise not_found(thing_id, [])
        return state, policy_id

    async def check_visible(self, auth: AuthContext, thing_id: str) -> None:
        """404 ``things:thing.notfound`` (as Ditto) for a thing that does not exist or of which
        ``auth`` may see nothing: a message stream is refused as a send would be."""
        _, policy_id = await self._thing(thing_id)
        view = await self.cache.view(policy_id, auth.subjects)
        if view is None or not _visible(view):
            raise not_found(thing_id, [])

    async def authorize(self, auth: AuthContext, message: Message, condition: rql.Node | None = None) -> str:
        """The thing's policy id if ``auth`` may send ``message``, else 404 / 403 (as Ditto)."""
        state, policy_id = await self._thing(message.thing_id)
        view = await self.cache.view(policy_id, auth.subjects)
        if view is None:
            raise not_found(message.thing_id, [])
        if not view.has_unrestricted("message", message.resource, WRITE):
            if not _visible(view):
                raise not_found(message.thing_id, [])
            raise SendNotAllowedError(
                f"You are not allowed to send messages for the Thing with id '{message.thing_id}'!"
            )
        if condition is not None:
            check_condition(view, state, condition)
        return policy_id

    async def send(
        self,
        auth: AuthContext,
        message: Message,
        *,
        condition: rql.Node | None = None,
        origin: str | None = None,
    ) -> dict[str, Any] | None:
        """Send as ``auth``; the response envelope, or None when none is awaited (timeout 0 or
        ``response-required: false``); 408 when none came in time."""
        policy_id = await self.authorize(auth, message, condition)
        return await self._publish(message, policy_id, origin)

    async def send_from_feature(
        self,
        thing_id: str,
        feature_id: str,
        subject: str,
        value: Any,
        *,
        content_type: str = "application/json",
        originator: str = "twinstore:service",
        correlation_id: str | None = None,
        policy_id: str | None = None,
    ) -> Message:
        """The service's own outbox message of a feature (e.g. an anomaly), fire and forget.

        No sender permission is checked (the service itself speaks for the thing); receivers
        still need READ on ``message:/features/<feature>/outbox/messages/<subject>``. 404 when
        the thing does not exist. ``policy_id``: the thing's, when the caller has just read it
        (the thing is not loaded again).
        """
        message = Message(
            thing_id=thing_id,
            feature_id=feature_id,
            subject=validate_subject(subject),
            direction="FROM",
            correlation_id=correlation_id or str(uuid.uuid4()),
            originator=originator,
            value=value,
            content_type=content_type,
            timeout=0.0,
            response_required=False,
        )
        if policy_id is None:
            _, policy_id = await self._thing(thing_id)
        await self._publish(message, policy_id, None)
        return message

    async def _publish(self, message: Message, policy_id: str, origin: str | None) -> dict[str, Any] | None:
        wait = message.response_required and message.timeout > 0
        headers = {POLICY_HEADER: policy_id}
        if origin is not None:
            headers[ORIGIN_HEADER] = origin
        data = orjson.dumps(message.envelope())
        subject = self.subjects.message_subject(message.thing_id)
        if not wait:
            await self.nc.publish(subject, data, headers=headers)
            return None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(message.correlation_id, deque())
        waiting.append(future)
        try:
            await self.nc.publish(subject, data, reply=self.replies, headers=headers)
            async with asyncio.timeout(message.timeout):
                return await future
        except TimeoutError:
            shown = int(message.timeout) if message.timeout == int(message.timeout) else message.timeout
            raise MessageTimeoutError(
                f"The Message reached the specified timeout of {shown} seconds."
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting:
                self._waiting.pop(message.correlation_id, None)

    async def _on_reply(self, msg: Msg) -> None:
        try:
            envelope = orjson.loads(msg.data)
            correlation = envelope["headers"]["correlation-id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("undecodable message response dropped")
            return
        for future in self._waiting.get(correlation, ()):
            if not future.done():
                future.set_result(envelope)  # the first response completes the sender
                return

    # ---- receiving -------------------------------------------------------------------------

    def subscribe(
        self,
        subjects: tuple[str, ...],
        *,
        namespaces: frozenset[str] | None = None,
        filter: rql.Node | None = None,
        origin: str | None = None,
        maxsize: int = QUEUE_SIZE,
    ) -> MessageSubscription:
        """A receiver of the messages ``subjects`` may READ (``origin``: its own are not echoed)."""
        sub = MessageSubscription(
            self, subjects, namespaces=namespaces, filter=filter, origin=origin, maxsize=maxsize
        )
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: MessageSubscription) -> None:
        self._subs.discard(sub)

    async def _run(self, nats_sub: Any) -> None:
        async for msg in nats_sub.messages:
            try:
                await self.deliver(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("message delivery failed for one message")

    async def deliver(self, msg: Msg) -> None:
        """Hand one published message to every local receiver that may read it."""
        if not self._subs:
            return
        headers = msg.headers or {}
        policy_id = headers.get(POLICY_HEADER)
        try:
            envelope = orjson.loads(msg.data)
            message = message_from_envelope(envelope, str(envelope["headers"].get("ditto-originator", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, DittoError):
            log.warning("undecodable message envelope dropped")
            return
        if policy_id is None:
            return
        namespace = message.thing_id.partition(":")[0]
        delivered_to: set[Any] = set()
        state: ThingState | None = None
        for sub in list(self._subs):
            if sub.origin is not None and sub.origin == headers.get(ORIGIN_HEADER):
                continue
            if sub.namespaces is not None and namespace not in sub.namespaces:
                continue
            view = await self.cache.view(policy_id, sub.subjects)
            if view is None or not view.has_unrestricted("message", message.resource, READ):
                continue
            if sub.filter is not None:
                doc: dict[str, Any] = {"thingId": message.thing_id}
                if any(f[0] not in ("thingId", "_namespace") for f in rql.fields_of(sub.filter)):
                    state = state or await self.load(message.thing_id)
                    doc = readable_thing(view, state) or doc
                if not rql.matches(sub.filter, doc, {"_namespace": namespace}):
                    continue
            sub.offer(envelope)
            delivered_to.add(sub.origin or sub.subjects)
        if delivered_to and msg.reply:
            self._remember(message, msg.reply, delivered_to)

    def _remember(self, message: Message, reply: str, receivers: set[Any]) -> None:
        now = time.monotonic()
        self._delivered[message.correlation_id] = (reply, now + message.timeout + 1.0, receivers)
        self._delivered.move_to_end(message.correlation_id)
        while self._delivered and (
            len(self._delivered) > DELIVERED_SIZE or next(iter(self._delivered.values()))[1] < now
        ):
            self._delivered.popitem(last=False)

    async def respond(self, auth: AuthContext, envelope: dict[str, Any], origin: str | None = None) -> bool:
        """Route a receiver's response envelope to the waiting sender; False when nobody waits
        (unknown or expired correlation-id, or the responder, by ``origin`` if it has one, did
        not receive the message)."""
        headers = envelope.get("headers") or {}
        correlation = {str(k).lower(): v for k, v in headers.items()}.get("correlation-id")
        entry = self._delivered.get(correlation) if isinstance(correlation, str) else None
        if entry is None or entry[1] < time.monotonic() or (origin or auth.subjects) not in entry[2]:
            return False
        await self.nc.publish(entry[0], orjson.dumps(envelope))
        return True
