"""The Ditto Protocol adapter: a command envelope in, its response (or error) envelope out.

Interface-agnostic: the WebSocket (``/ws/2``) uses it now, NATS ingestion will later. Each
command maps exactly as the HTTP API maps a method (``modify`` is PUT, ``merge`` PATCH with a
merge patch, ``delete`` DELETE, ``create`` creates a thing or policy that must not exist,
``retrieve`` GET), so both answer the same statuses and errors.

Topics (Ditto's):

* ``<namespace>/<name>/things/twin/commands/<create|retrieve|modify|merge|delete>``, ``path`` a
  JSON pointer inside the thing; ``_/_/things/twin/commands/retrieve`` with
  ``{"thingIds": [...]}`` retrieves several things;
* ``<namespace>/<name>/things/live/messages/<subject>``, ``path``
  ``[/features/<featureId>]/<inbox|outbox>/messages/<subject>``: a live message, sent through
  :class:`~twinstore.messages.MessageService` (the answer is the receiver's response envelope,
  none for ``response-required: false`` or ``timeout: 0``); with a ``status`` it is a receiver's
  response to a message it got, routed back to the sender (no answer);
* ``<namespace>/<name>/policies/commands/<create|retrieve|modify|delete>``, ``path`` one of
  ``/``, ``/entries``, ``/entries/<label>``, ``/entries/<label>/subjects[/<subjectId>]``,
  ``/entries/<label>/resources[/<resourceKey>]``; the resource key is everything after
  ``/resources/``, slashes included (``/entries/owner/resources/thing:/features/f``), or
  RFC 6901 escaped (``thing:~1features~1f``).

Every :class:`~twinstore.model.errors.DittoError` becomes an error envelope on
``<namespace>/<name>/things/twin/errors`` (``.../policies/errors``; ``unknown/unknown/things/
twin/errors`` when the topic cannot be read) with the error body as ``value``; anything else is
logged and answered as a 500. Nothing raises out of :func:`execute`.

>>> parse_topic("org.acme/pump/things/twin/commands/modify")
Topic(namespace='org.acme', name='pump', group='things', action='modify')
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from policies import PolicyInvalidError, parse_resource_key
from twinstore.auth import AuthContext
from twinstore.messages import message_from_envelope
from twinstore.model import etag, rql
from twinstore.model.errors import (
    DittoError,
    HeaderInvalidError,
    InvalidInputError,
    JsonInvalidError,
    ThingInvalidError,
    UnavailableError,
)
from twinstore.model.fields import parse_fields
from twinstore.model.ids import parse_pointer, validate_thing_id
from twinstore.model.limits import check_depth, check_headers, limits
from twinstore.model.policy import PolicyDelete, PolicyModify
from twinstore.model.rql import parse_condition
from twinstore.model.thing import Command, Create, Delete, Merge, Modify
from twinstore.policy_service import PolicyWrite
from twinstore.store import is_unavailable
from twinstore.store.journal import WriteRequest

if TYPE_CHECKING:  # the runtime imports the bus, whose ingestion will import this module
    from twinstore.runtime import Runtime

__all__ = [
    "UNKNOWN_ERRORS_TOPIC",
    "Topic",
    "error_envelope",
    "execute",
    "handle",
    "handle_text",
    "parse_topic",
    "write_command",
]

log = logging.getLogger("twinstore.protocol")

UNKNOWN_ERRORS_TOPIC = "unknown/unknown/things/twin/errors"
UNKNOWN_TOPIC = "protocoladapter:unknown.topicpath"  # Ditto's code for a topic it cannot map
THING_ACTIONS = ("create", "retrieve", "modify", "merge", "delete")
POLICY_ACTIONS = ("create", "retrieve", "modify", "delete")


class Topic(NamedTuple):
    namespace: str
    name: str
    group: str  # "things" | "policies"
    action: str

    @property
    def entity_id(self) -> str:
        return f"{self.namespace}:{self.name}"

    @property
    def errors(self) -> str:
        if self.group == "policies":
            return f"{self.namespace}/{self.name}/policies/errors"
        return f"{self.namespace}/{self.name}/things/twin/errors"


def _unknown_topic(topic: str, why: str) -> InvalidInputError:
    return InvalidInputError(
        f"The topic path '{topic}' is not supported: {why}.",
        error=UNKNOWN_TOPIC,
        description="Check if the topic path is correct: '<namespace>/<name>/things/twin/commands/<action>' "
        "or '<namespace>/<name>/policies/commands/<action>'.",
    )


def parse_topic(topic: str) -> Topic:
    """The parts of a command topic; 400 ``protocoladapter:unknown.topicpath`` for any other."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[2] == "things":
        _, _, _, channel, criterion, action = parts
        if channel != "twin":
            raise _unknown_topic(topic, f"the channel '{channel}' is not supported (only 'twin')")
        if criterion != "commands":
            raise _unknown_topic(topic, f"the criterion '{criterion}' is not supported (only 'commands')")
        if action not in THING_ACTIONS:
            raise _unknown_topic(topic, f"the action '{action}' is unknown")
    elif len(parts) == 5 and parts[2] == "policies":
        _, _, _, criterion, action = parts
        if criterion != "commands" or action not in POLICY_ACTIONS:
            raise _unknown_topic(topic, f"'{criterion}/{action}' is not a policy command")
    else:
        raise _unknown_topic(topic, "it names no thing or policy command")
    return Topic(parts[0], parts[1], parts[2], action)


def _errors_topic_of(topic: Any) -> str:
    """The errors topic for a command topic that may be invalid (best effort, as Ditto)."""
    if isinstance(topic, str):
        parts = topic.split("/")
        if len(parts) >= 3 and parts[0] and parts[1] and parts[2] in ("things", "policies"):
            return Topic(parts[0], parts[1], parts[2], "").errors
    return UNKNOWN_ERRORS_TOPIC


# ---- headers ---------------------------------------------------------------------------


class _Headers(NamedTuple):
    correlation_id: str
    response_required: bool
    if_match: list[str] | None
    if_none_match: list[str] | None
    allow_lockout: bool
    fields: list[list[str]] | None
    condition: Any  # a parsed RQL node, or None


def _correlation_id(headers: Any) -> str:
    value = headers.get("correlation-id") if isinstance(headers, dict) else None
    return value if isinstance(value, str) and value else str(uuid.uuid4())


def _bool(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise HeaderInvalidError(f"The value '{value}' of the header '{name}' is not a valid boolean.")


def _str(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise HeaderInvalidError(f"The value of the header '{name}' must be a JSON string.")


def parse_headers(envelope: dict[str, Any]) -> _Headers:
    """Ditto headers of an envelope (names are case-insensitive, as in HTTP)."""
    raw = envelope.get("headers", {})
    if not isinstance(raw, dict):
        raise JsonInvalidError("The envelope's 'headers' must be a JSON object.")
    check_headers(raw)  # 431 before any of them is used, kept or echoed
    h = {str(k).lower(): v for k, v in raw.items()}
    correlation = _str("correlation-id", h.get("correlation-id"))
    fields_text = envelope.get("fields", h.get("fields"))
    if fields_text is not None and (not isinstance(fields_text, str) or not fields_text.strip()):
        raise InvalidInputError(
            "'fields' must be a non-empty field selector string.", error="json.fieldselector.invalid"
        )
    return _Headers(
        correlation_id=correlation or str(uuid.uuid4()),
        response_required=_bool("response-required", h.get("response-required"), True),
        if_match=etag.parse_etags(_str("if-match", h.get("if-match"))),
        if_none_match=etag.parse_etags(_str("if-none-match", h.get("if-none-match"))),
        allow_lockout=_bool("allow-policy-lockout", h.get("allow-policy-lockout"), False),
        fields=parse_fields(fields_text) if fields_text is not None else None,
        condition=parse_condition(_str("condition", h.get("condition"))),
    )


# ---- envelopes -------------------------------------------------------------------------


def _response(
    topic: str, path: str, status: int, correlation_id: str, value: Any = None, tag: str | None = None
) -> dict[str, Any]:
    # A response never asks for a response itself (Ditto sets response-required false on it).
    headers: dict[str, Any] = {"correlation-id": correlation_id, "response-required": False}
    if tag is not None:
        headers["etag"] = tag
    envelope: dict[str, Any] = {"topic": topic, "headers": headers, "path": path}
    if status in (200, 201):
        envelope["value"] = value
    envelope["status"] = status
    return envelope


def error_envelope(error: DittoError, topic: str, correlation_id: str | None = None) -> dict[str, Any]:
    """Ditto's error response: the error body as ``value`` on an ``.../errors`` topic."""
    body = error.to_dict()
    headers: dict[str, Any] = {
        "correlation-id": correlation_id or str(uuid.uuid4()),
        "response-required": False,
    }
    etag_value = getattr(error, "etag", None)
    if isinstance(etag_value, str):
        headers["etag"] = etag_value
    return {"topic": topic, "headers": headers, "path": "/", "value": body, "status": error.status}


# ---- commands --------------------------------------------------------------------------


def _value(envelope: dict[str, Any], action: str) -> Any:
    if "value" not in envelope:
        raise JsonInvalidError(f"The '{action}' command needs a 'value'.")
    return envelope["value"]


def _path(envelope: dict[str, Any]) -> str:
    path = envelope.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidInputError(
            f"The envelope's 'path' must be a JSON pointer string starting with '/', not {path!r}.",
            error="json.pointer.invalid",
        )
    return path


async def _thing(
    topic: Topic, topic_text: str, envelope: dict[str, Any], h: _Headers, auth: AuthContext, runtime: Runtime
) -> dict[str, Any]:
    service = runtime.service
    assert service is not None
    path = _path(envelope)
    if topic.namespace == "_" and topic.name == "_":
        return await _retrieve_many(topic, topic_text, path, envelope, h, auth, runtime)
    thing_id = validate_thing_id(topic.entity_id)
    if topic.action == "retrieve":
        got = await service.retrieve(
            auth,
            thing_id,
            path,
            fields=h.fields,
            if_match=h.if_match,
            if_none_match=h.if_none_match,
            condition=h.condition,
        )
        return _response(topic_text, path, 200, h.correlation_id, got.value, got.etag)
    command = _command(topic.action, path, envelope)
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
        allow_lockout=h.allow_lockout,
        condition=h.condition,
    )
    tag = done.tag(parse_pointer(path))
    # As the HTTP API: a create, a modify that created, or a merge that created the whole thing.
    creates = topic.action in ("create", "modify") or (topic.action == "merge" and done.event.path == "/")
    if done.event.action == "created" and creates:
        return _response(topic_text, path, 201, h.correlation_id, done.event.value, tag)
    return _response(topic_text, path, 204, h.correlation_id, tag=tag)


def _command(action: str, path: str, envelope: dict[str, Any]) -> Command:
    """The thing command of a ``create`` / ``modify`` / ``merge`` / ``delete`` envelope."""
    if action == "create":
        value = _value(envelope, "create")
        if parse_pointer(path):
            raise InvalidInputError(
                f"'create' addresses a whole Thing (path '/'), not '{path}'; use 'modify'.",
                error="things:protocol.invalid",
            )
        if not isinstance(value, dict):
            raise ThingInvalidError("The value of a new Thing must be a JSON object.")
        return Create(value=value)
    if action == "modify":
        return Modify(path=path, value=_value(envelope, "modify"))
    if action == "merge":
        return Merge(path=path, value=_value(envelope, "merge"))
    return Delete(path=path)


def write_command(envelope: Any, originator: str) -> tuple[WriteRequest, rql.Node | None]:
    """The write of a thing command envelope (for NATS ingestion, which commits many at once).

    Only ``create``, ``modify``, ``merge`` and ``delete`` of a thing; anything else, or an
    invalid envelope, is a :class:`DittoError` (400 as over the WebSocket).
    """
    if not isinstance(envelope, dict) or not isinstance(envelope.get("topic"), str):
        raise JsonInvalidError("A Ditto Protocol message must be a JSON object with a 'topic' string.")
    h = parse_headers(envelope)
    topic = parse_topic(envelope["topic"])
    if topic.group != "things" or topic.action == "retrieve" or topic.namespace == "_":
        raise _unknown_topic(envelope["topic"], "ingestion takes thing create/modify/merge/delete commands")
    path = _path(envelope)
    request = WriteRequest(
        thing_id=validate_thing_id(topic.entity_id),
        command=_command(topic.action, path, envelope),
        originator=originator,
        correlation_id=h.correlation_id,
        if_match=h.if_match,
        if_none_match=h.if_none_match,
    )
    return request, h.condition


async def _retrieve_many(
    topic: Topic,
    topic_text: str,
    path: str,
    envelope: dict[str, Any],
    h: _Headers,
    auth: AuthContext,
    runtime: Runtime,
) -> dict[str, Any]:
    """``_/_/things/twin/commands/retrieve`` with ``{"thingIds": [...]}``: the readable ones, in order."""
    assert runtime.service is not None
    value = envelope.get("value")
    ids = value.get("thingIds") if isinstance(value, dict) else None
    if topic.action != "retrieve" or parse_pointer(path):
        raise _unknown_topic(topic_text, "'_/_' only retrieves several things (action 'retrieve', path '/')")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise JsonInvalidError('Retrieving several Things needs a value {"thingIds": ["ns:name", ...]}.')
    things = await runtime.service.retrieve_many(auth, ids, h.fields)
    return _response(topic_text, path, 200, h.correlation_id, things)


def _policy_parts(path: str) -> list[str]:
    """The path inside a policy; subject ids and resource keys are the rest of the path."""
    parts = parse_pointer(path)
    if len(parts) > 4 and parts[0] == "entries" and parts[2] in ("subjects", "resources"):
        parts = [*parts[:3], "/".join(parts[3:])]
    if len(parts) == 4 and parts[2] == "resources":
        key = parts[3]
        if "/" not in key:  # every key has a '/' after its type, so this one is RFC 6901 escaped
            key = key.replace("~1", "/").replace("~0", "~")
        try:
            parse_resource_key(key)
        except PolicyInvalidError as exc:
            raise InvalidInputError(exc.message, error=exc.error) from None
        parts[3] = key
    return parts


async def _policy(
    topic: Topic, topic_text: str, envelope: dict[str, Any], h: _Headers, auth: AuthContext, runtime: Runtime
) -> dict[str, Any]:
    service = runtime.policies
    assert service is not None
    path = _path(envelope)
    parts = _policy_parts(path)
    policy_id = topic.entity_id
    if topic.action == "retrieve":
        value, tag, _ = await service.retrieve(
            auth, policy_id, parts, if_match=h.if_match, if_none_match=h.if_none_match
        )
        return _response(topic_text, path, 200, h.correlation_id, value, tag)
    if topic.action == "create" and parts:
        raise InvalidInputError(
            f"'create' addresses a whole Policy (path '/'), not '{path}'; use 'modify'.",
            error="policies:protocol.invalid",
        )
    command: PolicyModify | PolicyDelete
    if topic.action == "delete":
        command = PolicyDelete(parts=parts)
    else:
        command = PolicyModify(parts=parts, value=_value(envelope, topic.action))
    done = await service.write(
        PolicyWrite(
            policy_id=policy_id,
            command=command,
            auth=auth,
            correlation_id=h.correlation_id,
            if_match=h.if_match,
            if_none_match=h.if_none_match,
            allow_lockout=h.allow_lockout,
            must_not_exist=topic.action == "create",
        )
    )
    new_tag = done.tag(parts)
    if done.event.action == "created":
        return _response(topic_text, path, 201, h.correlation_id, done.event.value, new_tag)
    return _response(topic_text, path, 204, h.correlation_id, tag=new_tag)


async def execute(envelope: Any, auth: AuthContext, runtime: Runtime) -> dict[str, Any]:
    """The response envelope of one command envelope, or its error envelope; never raises."""
    topic_text = envelope.get("topic") if isinstance(envelope, dict) else None
    correlation = _correlation_id(envelope.get("headers") if isinstance(envelope, dict) else None)
    try:
        if not isinstance(envelope, dict):
            raise JsonInvalidError("A Ditto Protocol message must be a JSON object with a 'topic'.")
        if not isinstance(topic_text, str):
            raise JsonInvalidError("The Ditto Protocol message has no 'topic' string.")
        h = parse_headers(envelope)
        correlation = h.correlation_id
        topic = parse_topic(topic_text)
        if topic.group == "things":
            return await _thing(topic, topic_text, envelope, h, auth, runtime)
        return await _policy(topic, topic_text, envelope, h, auth, runtime)
    except DittoError as exc:
        return error_envelope(exc, _errors_topic_of(topic_text), correlation)
    except Exception as exc:
        if is_unavailable(exc):  # the database restarting or gone: 503 as over HTTP
            unavailable = UnavailableError("The database is not reachable; retry later.")
            return error_envelope(unavailable, _errors_topic_of(topic_text), correlation)
        log.exception("unhandled error in a protocol command", extra={"correlation_id": correlation})
        error = DittoError(
            "An unexpected error occurred; it was logged.",
            description="Report this with the correlation id if it persists.",
        )
        return error_envelope(error, _errors_topic_of(topic_text), correlation)


def _is_live_message(topic: Any) -> bool:
    return isinstance(topic, str) and topic.split("/")[2:5] == ["things", "live", "messages"]


async def _live_message(
    envelope: dict[str, Any], auth: AuthContext, runtime: Runtime, origin: str | None
) -> dict[str, Any] | None:
    """A live message (its response envelope, or None) or a receiver's response (None)."""
    topic = str(envelope["topic"])
    correlation = _correlation_id(envelope.get("headers"))
    parts = topic.split("/")
    errors = f"{parts[0]}/{parts[1]}/things/live/errors"
    try:
        assert runtime.messages is not None
        h = parse_headers(envelope)
        correlation = h.correlation_id
        if "status" in envelope:
            await runtime.messages.respond(auth, envelope, origin)
            return None
        message = message_from_envelope(envelope, auth.subject)
        return await runtime.messages.send(auth, message, condition=h.condition, origin=origin)
    except DittoError as exc:
        return error_envelope(exc, errors, correlation)
    except Exception:
        log.exception("unhandled error in a live message", extra={"correlation_id": correlation})
        error = DittoError("An unexpected error occurred; it was logged.")
        return error_envelope(error, errors, correlation)


def _wants_response(envelope: Any) -> bool:
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    if not isinstance(headers, dict):
        return True
    value = {str(k).lower(): v for k, v in headers.items()}.get("response-required")
    return not (value is False or (isinstance(value, str) and value.strip().lower() == "false"))


async def handle(
    envelope: Any, auth: AuthContext, runtime: Runtime, *, origin: str | None = None
) -> dict[str, Any] | None:
    """As :func:`execute`, but ``None`` when the command said ``response-required: false``.

    Like Ditto, such a command gets no answer at all, not even an error. Live messages are
    sent (``origin``: the sending connection, which does not get its own message back).
    """
    try:  # before anything walks it (policy checks, encoding): the envelope is one level more
        check_depth(envelope, "/", limits().max_json_depth + 1)
    except DittoError as exc:
        topic = envelope.get("topic") if isinstance(envelope, dict) else None
        headers = envelope.get("headers") if isinstance(envelope, dict) else None
        refused = error_envelope(exc, _errors_topic_of(topic), _correlation_id(headers))
        return refused if _wants_response(envelope) else None
    if isinstance(envelope, dict) and _is_live_message(envelope.get("topic")):
        answer = await _live_message(envelope, auth, runtime, origin)
        return answer if _wants_response(envelope) else None
    response = await execute(envelope, auth, runtime)
    return response if _wants_response(envelope) else None


async def handle_text(
    data: str | bytes, auth: AuthContext, runtime: Runtime, *, origin: str | None = None
) -> dict[str, Any] | None:
    """:func:`handle` for an envelope still in its JSON text (invalid JSON is a 400 envelope)."""
    try:
        envelope = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        text = data if isinstance(data, str) else data.decode(errors="replace")
        error = JsonInvalidError(f"Failed to parse the Ditto Protocol message '{text[:200]}': {exc}")
        return error_envelope(error, UNKNOWN_ERRORS_TOPIC)
    return await handle(envelope, auth, runtime, origin=origin)
