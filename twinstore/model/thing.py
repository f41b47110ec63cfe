"""Things: state, commands, events, ``decide`` and ``evolve`` (Ditto's strategies, pure).

An event is Ditto Protocol's own shape: an ``action`` (created, modified, merged, deleted),
a JSON ``path`` inside the thing and a ``value``. That one shape covers every Ditto event
(``featurePropertyModified`` is ``modified`` at ``/features/f/properties/p``), maps 1:1 onto
the protocol envelope and onto the journal row, and keeps ``evolve`` a single ``match``.

>>> from datetime import datetime, UTC
>>> now = datetime(2026, 1, 1, tzinfo=UTC)
>>> s0 = ThingState.absent("org.acme:pump")
>>> e1 = decide(s0, Modify(path="/", value={"attributes": {"a": 1}}), now)
>>> (e1.action, e1.revision)
('created', 1)
>>> s1 = evolve(s0, e1)
>>> e2 = decide(s1, Modify(path="/attributes/a", value=2), now)
>>> evolve(s1, e2).doc["attributes"]
{'a': 2}
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import msgspec

from twinstore.model import patch as jp
from twinstore.model.errors import (
    ConflictError,
    DefinitionIdentifierInvalidError,
    InvalidInputError,
    JsonInvalidError,
    MergeInvalidError,
    PolicyIdNotDeletableError,
    ThingIdNotDeletableError,
    ThingIdNotSettableError,
    ThingInvalidError,
    not_found,
)
from twinstore.model.ids import parse_pointer, validate_key, validate_policy_id

__all__ = [
    "Command",
    "Create",
    "Delete",
    "Event",
    "JsonPatch",
    "Merge",
    "Modify",
    "ThingState",
    "decide",
    "evolve",
    "replay",
    "validate_path",
    "validate_thing",
]

Action = Literal["created", "modified", "merged", "deleted"]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One committed change of one thing; the journal row without its audit columns."""

    thing_id: str
    revision: int
    timestamp: datetime
    action: Action
    path: str
    value: Any = None
    originator: str = ""
    correlation_id: str | None = None
    # Kept with the event (e.g. an ingested value's source-timestamp / source-quality).
    headers: dict[str, str] | None = None


class ThingState(msgspec.Struct, kw_only=True):
    """A thing at a revision; ``doc is None`` means absent or deleted (revisions continue)."""

    thing_id: str
    revision: int = 0
    created: datetime | None = None
    modified: datetime | None = None
    doc: dict[str, Any] | None = None

    @classmethod
    def absent(cls, thing_id: str) -> ThingState:
        return cls(thing_id=thing_id)

    @property
    def exists(self) -> bool:
        return self.doc is not None

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata RQL reads beside the document (``_revision``, ``_created``, ``_modified``)."""
        return {"_revision": self.revision, "_created": self.created, "_modified": self.modified}


# ---- commands --------------------------------------------------------------------------


class Modify(msgspec.Struct, tag=True, kw_only=True):
    """PUT: create or replace the value at ``path``."""

    path: str
    value: Any


class Create(msgspec.Struct, tag=True, kw_only=True):
    """POST /things: create a thing that must not exist yet."""

    value: dict[str, Any]
    path: str = "/"


class Merge(msgspec.Struct, tag=True, kw_only=True):
    """PATCH with ``application/merge-patch+json`` (RFC 7396)."""

    path: str
    value: Any


class JsonPatch(msgspec.Struct, tag=True, kw_only=True):
    """PATCH with ``application/json-patch+json`` (RFC 6902)."""

    path: str
    value: Any


class Delete(msgspec.Struct, tag=True, kw_only=True):
    """DELETE the value at ``path`` (``/`` deletes the thing)."""

    path: str


Command = Modify | Create | Merge | JsonPatch | Delete


# ---- validation ------------------------------------------------------------------------

_TOP_LEVEL = ("thingId", "policyId", "definition", "attributes", "features")
_FEATURE_KEYS = ("definition", "properties", "desiredProperties")
_DEFINITION_RE = re.compile(
    r"^([_a-zA-Z0-9\-.]+):([_a-zA-Z0-9\-.]+):([_a-zA-Z0-9\-.]+)$|^https?://[^\s\x00-\x1f\x7f]+$"
)


def validate_path(parts: list[str]) -> None:
    """Refuse pointers that do not address a resource of a thing."""
    if parts:
        _validate_path(tuple(parts))


@lru_cache(maxsize=16_384)
def _validate_path(parts: tuple[str, ...]) -> None:
    # Cached: writes repeat the same few paths (an invalid path raises and is not cached).
    head = parts[0]
    ok = (
        (head in ("policyId", "definition") and len(parts) == 1)
        or head == "attributes"
        or (head == "features" and len(parts) <= 2)
        or (
            head == "features"
            and ((parts[2] == "definition" and len(parts) == 3) or parts[2] in _FEATURE_KEYS[1:])
        )
    )
    if not ok:
        raise InvalidInputError(f"The path '/{'/'.join(parts)}' does not address a Thing resource.")
    for part in parts:
        validate_key(part)


def _check_keys(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, child in value.items():
            if not key or "/" in key:
                raise ThingInvalidError(f"The JSON key '{key}' in '{where}' is not valid.")
            _check_keys(child, where)
    elif isinstance(value, list):
        for child in value:
            _check_keys(child, where)


def _check_definition(identifier: Any, where: str) -> None:
    if not isinstance(identifier, str):
        raise JsonInvalidError(f"The definition identifier in '{where}' must be a JSON string.")
    if not _DEFINITION_RE.match(identifier):
        raise DefinitionIdentifierInvalidError(
            f"Definition identifier <{identifier}> is invalid!",
        )


def _validate_feature(feature_id: str, feature: Any) -> None:
    validate_key(feature_id)
    where = f"/features/{feature_id}"
    if not isinstance(feature, dict):
        raise JsonInvalidError(f"The Feature '{feature_id}' must be a JSON object.")
    if "definition" in feature:
        definition = feature["definition"]
        if not isinstance(definition, list):
            raise JsonInvalidError(
                f"The definition of Feature '{feature_id}' must be an array of identifiers "
                "'namespace:name:version'."
            )
        for identifier in definition:
            _check_definition(identifier, where + "/definition")
    for key in ("properties", "desiredProperties"):
        if key in feature and not isinstance(feature[key], dict):
            raise JsonInvalidError(f"'{key}' of Feature '{feature_id}' must be a JSON object.")
    _check_keys(feature, where)


def validate_value(parts: list[str], value: Any, thing_id: str) -> None:
    """Check a value written at ``parts`` (below the top level) without touching the rest.

    The rest of the document is valid already, so the value is checked in its place: the
    same rules as :func:`validate_thing`, at the cost of the value only.
    """
    head = parts[0]
    if head == "attributes" and len(parts) > 1:
        _check_keys(value, "/attributes")
    elif head == "features" and len(parts) > 3:
        _check_keys(value, "/" + "/".join(parts[:3]))
    elif head == "features" and len(parts) == 3:
        _validate_feature(parts[1], {parts[2]: value})
    elif head == "features" and len(parts) == 2:
        _validate_feature(parts[1], value)
    else:
        validate_thing({head: value}, thing_id)


def validate_thing(doc: Any, thing_id: str) -> dict[str, Any]:
    """Check a whole thing document; returns it with ``thingId`` set and unknown keys dropped.

    Wrong JSON types are ``json.invalid`` (as Ditto's JSON parsing reports them); ``null`` is
    not a value of any known key (a merge patch removes with ``null``, it never stores it).
    """
    if not isinstance(doc, dict):
        raise JsonInvalidError("A Thing must be a JSON object.")
    if doc.get("thingId", thing_id) != thing_id:
        raise ThingIdNotSettableError(
            f"The Thing ID in the request body '{doc.get('thingId')}' is not equal to the "
            f"Thing ID '{thing_id}' in the request URI."
        )
    if "policyId" in doc:
        policy_id = doc["policyId"]
        if not isinstance(policy_id, str):
            raise JsonInvalidError("'policyId' must be a JSON string.")
        validate_policy_id(policy_id)
    if "definition" in doc:
        _check_definition(doc["definition"], "/definition")
    if "attributes" in doc:
        if not isinstance(doc["attributes"], dict):
            raise JsonInvalidError("'attributes' must be a JSON object.")
        _check_keys(doc["attributes"], "/attributes")
    if "features" in doc:
        features = doc["features"]
        if not isinstance(features, dict):
            raise JsonInvalidError("'features' must be a JSON object.")
        for feature_id, feature in features.items():
            _validate_feature(feature_id, feature)
    result = {"thingId": thing_id}
    result.update((key, doc[key]) for key in _TOP_LEVEL[1:] if key in doc)
    return result


# ---- decide / evolve -------------------------------------------------------------------


class _Next(NamedTuple):
    thing_id: str
    revision: int
    timestamp: datetime
    originator: str
    correlation_id: str | None


def _event(common: _Next, action: Action, path: str, value: Any = None) -> Event:
    # Explicit keywords: NamedTuple._asdict() cost more than the rest of a small decision.
    return Event(
        thing_id=common.thing_id,
        revision=common.revision,
        timestamp=common.timestamp,
        originator=common.originator,
        correlation_id=common.correlation_id,
        action=action,
        path=path,
        value=value,
    )


def _with_default_policy(doc: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Without ``policyId`` a thing keeps its previous policy, else gets its own id (Ditto's default)."""
    if "policyId" in doc:
        return doc
    policy_id = (previous or {}).get("policyId", doc["thingId"])
    return {"thingId": doc["thingId"], "policyId": policy_id, **doc}


def _require_parent(state: ThingState, parts: list[str]) -> dict[str, Any]:
    """The current document; 404 if the thing, or the feature a path lies in, is missing."""
    if state.doc is None:
        raise not_found(state.thing_id, [])
    if len(parts) > 2 and parts[0] == "features" and jp.get_at(state.doc, parts[:2]) is jp.MISSING:
        raise not_found(state.thing_id, parts[:2])
    return state.doc


def _keep_policy(current: dict[str, Any], after: dict[str, Any]) -> None:
    """A patch may change a thing's policyId but not remove it (every thing has a policy)."""
    if "policyId" in current and "policyId" not in after:
        raise PolicyIdNotDeletableError("The policyId of a Thing cannot be removed; set another one instead.")


def decide(
    state: ThingState,
    command: Command,
    now: datetime,
    *,
    originator: str = "",
    correlation_id: str | None = None,
    readable: jp.Readable | None = None,
    max_patch_ops: int | None = None,
    max_bytes: int | None = None,
) -> Event:
    """Turn one command into exactly one event, or raise a :class:`DittoError`.

    ``originator`` (the authenticated subject) and ``correlation_id`` are recorded on the event.
    A JSON patch reads only where ``readable(path in the thing)`` allows, has at most
    ``max_patch_ops`` operations and is refused (413) as soon as the thing would exceed
    ``max_bytes`` (see :func:`twinstore.model.patch.apply_json_patch`).
    """
    parts = parse_pointer(command.path)
    validate_path(parts)
    common = _Next(state.thing_id, state.revision + 1, now, originator, correlation_id)
    match command:
        case Create(value=value):
            if state.exists:
                raise ConflictError(
                    f"The Thing with ID '{state.thing_id}' already exists.",
                    error="things:thing.conflict",
                )
            doc = _with_default_policy(validate_thing(value, state.thing_id))
            return _event(common, action="created", path="/", value=doc)
        case Modify(value=value) if not parts:
            # A replacement without policyId keeps the thing's policy; a new thing gets its own.
            doc = _with_default_policy(validate_thing(value, state.thing_id), state.doc)
            action: Action = "modified" if state.exists else "created"
            return _event(common, action=action, path="/", value=doc)
        case Modify(value=value):
            current = _require_parent(state, parts)
            validate_value(parts, value, state.thing_id)
            existed = jp.get_at(current, parts) is not jp.MISSING
            return _event(common, action="modified" if existed else "created", path=command.path, value=value)
        case Merge(value=value):
            if not parts:
                # As Ditto: null or {} cannot be merged into a thing, nor can its ids be removed.
                if not isinstance(value, dict) or not value:
                    raise MergeInvalidError("The provided json value can not be applied at this resource.")
                if "thingId" in value and value["thingId"] is None:
                    raise ThingIdNotDeletableError("The Thing ID of a Thing cannot be removed.")
                if "policyId" in value and value["policyId"] is None:
                    raise PolicyIdNotDeletableError(
                        "The policyId of a Thing cannot be removed; set another one instead."
                    )
                # Unknown top-level keys are dropped, as a PUT drops them (e.g. an inline
                # ``_policy``, which only means something when a thing is created).
                value = {k: v for k, v in value.items() if k in _TOP_LEVEL}
                if not state.exists:
                    # Merging a whole thing that does not exist creates it (as Ditto does).
                    created = validate_thing(jp.merge_patch({}, value), state.thing_id)
                    doc = _with_default_policy(created)
                    return _event(common, action="created", path="/", value=doc)
            # As Ditto's MergeThing (the patch is the object ``{path: value}`` merged into the whole
            # thing): missing parents, a feature included, are created, so telemetry may bring a
            # feature the thing does not have yet.
            if state.doc is None:
                raise not_found(state.thing_id, [])
            current = state.doc
            merged = jp.merge_patch(jp.get_at(current, parts), value)
            if not parts or parts[0] == "policyId":
                after = jp.remove_at(current, parts) if merged is None else jp.set_at(current, parts, merged)
                _keep_policy(current, validate_thing(after, state.thing_id))
            elif merged is not None:  # below the top level only the merged value can be invalid
                validate_value(parts, merged, state.thing_id)
            return _event(common, action="merged", path=command.path, value=value)
        case JsonPatch(value=operations):
            current = _require_parent(state, parts)
            target = jp.get_at(current, parts)
            if target is jp.MISSING:
                raise not_found(state.thing_id, parts)
            budget = None
            if max_bytes is not None:  # what the patched resource may grow to in this thing
                budget = max_bytes - jp.json_size(current) + jp.json_size(target)
            patched = jp.apply_json_patch(
                target,
                operations,
                readable=None if readable is None else (lambda tokens: readable([*parts, *tokens])),
                max_ops=max_patch_ops,
                max_bytes=budget,
            )
            if not parts and isinstance(patched, dict) and "thingId" not in patched:
                raise ThingIdNotDeletableError("The Thing ID of a Thing cannot be removed.")
            after = validate_thing(jp.set_at(current, parts, patched) if parts else patched, state.thing_id)
            _keep_policy(current, after)
            where = parts + jp.changed_prefix(target, operations)
            new = jp.get_at(after, where)
            if new is jp.MISSING:
                return _event(common, action="deleted", path="/" + "/".join(where))
            old = jp.get_at(current, where)
            act: Action = "created" if old is jp.MISSING else "modified"
            return _event(common, action=act, path="/" + "/".join(where), value=new)
        case Delete():
            current = _require_parent(state, parts)
            if parts == ["policyId"]:
                raise PolicyIdNotDeletableError("The policyId of a Thing cannot be deleted.")
            if parts and jp.get_at(current, parts) is jp.MISSING:
                raise not_found(state.thing_id, parts)
            return _event(common, action="deleted", path=command.path)
    raise AssertionError(f"unknown command {command!r}")  # pragma: no cover


def evolve(state: ThingState, event: Event) -> ThingState:
    """Apply one event; the inverse of nothing, the fold step of replay."""
    parts = parse_pointer(event.path)
    doc = state.doc or {}
    created = state.created
    match event.action:
        case "created" | "modified" if not parts:
            doc = event.value
            if event.action == "created":
                created = event.timestamp
        case "created" | "modified":
            doc = jp.set_at(doc, parts, event.value)
        case "merged":
            merged = jp.merge_patch(jp.get_at(doc, parts), event.value)
            doc = jp.remove_at(doc, parts) if merged is None else jp.set_at(doc, parts, merged)
        case "deleted" if not parts:
            return ThingState(
                thing_id=state.thing_id,
                revision=event.revision,
                created=None,
                modified=event.timestamp,
                doc=None,
            )
        case "deleted":
            doc = jp.remove_at(doc, parts)
    return ThingState(
        thing_id=state.thing_id,
        revision=event.revision,
        created=created,
        modified=event.timestamp,
        doc=doc,
    )


def replay(state: ThingState, events: list[Event]) -> ThingState:
    """Fold ``events`` over ``state`` (a snapshot or :meth:`ThingState.absent`)."""
    for event in events:
        state = evolve(state, event)
    return state
