"""Enforcement: policies' decisions applied to things, with the decision cache.

The one library call every interface uses (HTTP now; WebSocket/SSE, search, history and NATS
ingestion later):

* :class:`PolicyCache` hands out a compiled :class:`policies.Enforcer` per policy id, kept
  until that policy changes (a ``NOTIFY`` from any process drops it, see
  :meth:`twinstore.store.policies.PolicyStore.listen`); each enforcer caches its
  :class:`policies.SubjectView` per subject set, so a decision is a few dictionary lookups;
* :func:`touched` names the paths a thing command changes (WRITE is needed on every one);
* :func:`thing_guard` is the check the journal runs on the exact state a write is decided on.

Ditto's rules: not readable at all looks like absent (404); readable but not writable is 403.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import msgspec

import policies
from policies import MISSING, READ, WRITE, Enforcer, SubjectView
from twinstore.model import patch as jp
from twinstore.model import rql
from twinstore.model.errors import (
    ConditionFailedError,
    ConflictError,
    ForbiddenError,
    not_found,
    not_modifiable,
)
from twinstore.model.ids import parse_pointer
from twinstore.model.thing import Command, Create, Delete, Event, JsonPatch, Merge, Modify, ThingState
from twinstore.store.policies import PolicyStore

__all__ = [
    "PolicyCache",
    "PolicyMovedError",
    "ThingGuard",
    "check_condition",
    "creates_thing",
    "new_policy_id",
    "readable_event",
    "readable_thing",
    "thing_guard",
    "touched",
    "with_doc",
]

log = logging.getLogger("twinstore.enforcement")

class PolicyMovedError(ConflictError):
    """The thing's policy (or its existence) changed between the check and the write: retry."""


class PolicyCache:
    """Compiled enforcers by policy id (``None``: the policy does not exist), LRU-bounded."""

    def __init__(self, store: PolicyStore, size: int = 10_000) -> None:
        self.store = store
        self.size = size
        self._entries: OrderedDict[str, Enforcer | None] = OrderedDict()
        self._generation = 0  # bumped by every invalidation: a load that raced one is not kept

    def invalidate(self, policy_id: str | None) -> None:
        """Forget one policy (``None``: all of them)."""
        self._generation += 1
        if policy_id is None:
            self._entries.clear()
        else:
            self._entries.pop(policy_id, None)

    @staticmethod
    def compile(policy_id: str, doc: dict[str, Any] | None) -> Enforcer | None:
        if doc is None:
            return None
        try:
            return Enforcer(policies.parse_policy(doc, policy_id))
        except policies.PolicyInvalidError:  # stored policies were validated on write
            log.exception("stored policy is not valid", extra={"policy_id": policy_id})
            return None

    def _keep(self, policy_id: str, enforcer: Enforcer | None, generation: int) -> None:
        if generation == self._generation:
            self._entries[policy_id] = enforcer
            self._entries.move_to_end(policy_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    async def enforcer(self, policy_id: str) -> Enforcer | None:
        if policy_id in self._entries:
            self._entries.move_to_end(policy_id)
            return self._entries[policy_id]
        generation = self._generation
        state = await self.store.load(policy_id)
        enforcer = self.compile(policy_id, state.doc)
        self._keep(policy_id, enforcer, generation)
        return enforcer

    async def enforcers(self, policy_ids: list[str]) -> dict[str, Enforcer | None]:
        result = {i: self._entries[i] for i in policy_ids if i in self._entries}
        missing = [i for i in dict.fromkeys(policy_ids) if i not in result]
        if missing:
            generation = self._generation
            states = await self.store.load_many(missing)
            for policy_id in missing:
                state = states.get(policy_id)
                result[policy_id] = self.compile(policy_id, state.doc if state else None)
                self._keep(policy_id, result[policy_id], generation)
        return result

    async def view(self, policy_id: str, subjects: tuple[str, ...]) -> SubjectView | None:
        """The decisions of ``policy_id`` for ``subjects`` (None when the policy is absent)."""
        enforcer = await self.enforcer(policy_id)
        return None if enforcer is None else enforcer.view(subjects)


def creates_thing(command: Command) -> bool:
    """True for the commands that create a thing that does not exist (PUT, POST, PATCH of ``/``)."""
    return isinstance(command, Create) or (isinstance(command, Modify | Merge) and command.path in ("", "/"))


def _leaves(base: list[str], patch: Any, out: list[list[str]]) -> None:
    if isinstance(patch, dict) and patch:
        for key, value in patch.items():
            _leaves([*base, key], value, out)
    else:
        out.append(base)


def touched(command: Command) -> list[list[str]]:
    """The paths (in the thing) a command changes; WRITE is needed on each, unrestricted.

    >>> touched(Merge(path="/attributes", value={"a": 1, "b": {"c": None}}))
    [['attributes', 'a'], ['attributes', 'b', 'c']]
    >>> move = {"op": "move", "from": "/properties/a", "path": "/properties/b"}
    >>> touched(JsonPatch(path="/features/f", value=[move]))
    [['features', 'f', 'properties', 'b'], ['features', 'f', 'properties', 'a']]
    """
    parts = parse_pointer(command.path)
    match command:
        case Merge(value=value):
            out: list[list[str]] = []
            _leaves(parts, value, out)
            return out
        case JsonPatch(value=operations) if isinstance(operations, list):
            paths: list[list[str]] = []
            for op in operations:
                if not isinstance(op, dict) or op.get("op") == "test":
                    continue
                for key in ("path", "from") if op.get("op") == "move" else ("path",):
                    rel = jp.parse_json_pointer(op.get(key))
                    if rel is not None:  # (not a pointer: the patch fails, writing nothing)
                        paths.append(parts + [p for p in rel if p != "-"])
            return paths or [parts]
        case Modify() | Delete() | Create():
            return [parts]
    return [parts]  # pragma: no cover


def new_policy_id(state: ThingState, command: Command) -> str | None:
    """The policy id a write would give an existing thing, if it changes it."""
    current = (state.doc or {}).get("policyId")
    parts = parse_pointer(command.path)
    value: Any = jp.MISSING
    match command:
        case Modify(value=v) | Merge(value=v) if not parts and isinstance(v, dict):
            value = v.get("policyId", jp.MISSING)
        case Modify(value=v) | Merge(value=v) if parts == ["policyId"]:
            value = v
        case JsonPatch(value=ops) if isinstance(ops, list):
            for op in ops:
                target = op.get("path") if isinstance(op, dict) else None
                if parts == ["policyId"] or (not parts and target == "/policyId"):
                    value = op.get("value", jp.MISSING) if isinstance(op, dict) else jp.MISSING
    return value if isinstance(value, str) and value != current else None


def check_condition(view: SubjectView | None, state: ThingState, condition: rql.Node) -> None:
    """Ditto's ``condition`` header: 412 unless the RQL holds on the thing as the caller may read it.

    A condition on a field the caller may not read fails as Ditto's does ("insufficient
    permissions"), whatever the value.
    """
    if state.doc is None:
        return
    readable = readable_thing(view, state) or {}
    for field in rql.fields_of(condition):
        path = list(field[: field.index("*")] if "*" in field else field)
        if field[0].startswith("_") or field[0] == "thingId":
            continue
        if view is None or not view.has_unrestricted("thing", path, READ):
            raise ConditionFailedError(
                "The specified resource in the condition could not be found or the requester had "
                "insufficient permissions to access it.",
                description="Check if you have sufficient permissions to access the specified resource "
                "(READ permission is required).",
            )
    if not rql.matches(condition, readable, state.meta):
        raise ConditionFailedError("The specified condition does not match the state of the requested Thing.")


class ThingGuard:
    """The check the journal runs on the state a write is decided on (raises to refuse), and what
    the writer may read there (a JSON patch's ``from`` and ``test``, the entity tags of If-Match).

    ``policy_id``/``view`` are what the caller looked up before writing; if the thing's state
    disagrees (another policy, created or deleted meanwhile), :class:`PolicyMovedError` makes
    the service look again. A ``condition`` is checked after the permissions (a thing that
    does not exist yet has none to check, as in Ditto).
    """

    __slots__ = ("_readable", "_writable", "condition", "creating", "policy_id", "thing_id", "view")

    def __init__(
        self,
        thing_id: str,
        policy_id: str | None,
        view: SubjectView | None,
        *,
        creating: bool,
        condition: rql.Node | None = None,
    ) -> None:
        self.thing_id = thing_id
        self.policy_id = policy_id
        self.view = view
        self.creating = creating
        self.condition = condition
        # The view's answers do not change while the guard lives: asked once per path (a guard
        # made for many writes of one thing, as ingestion does, asks the policy tree once).
        self._readable: bool | None = None
        self._writable: dict[str, bool] = {}

    def __call__(self, before: ThingState, command: Command) -> None:
        thing_id, view = self.thing_id, self.view
        parts = parse_pointer(command.path)
        if self.creating:
            if before.exists:
                raise PolicyMovedError("The Thing was created concurrently.")
            if view is None or not view.has_unrestricted("thing", [], WRITE):
                raise ForbiddenError(
                    f"The Thing with ID '{thing_id}' could not be created as the requester had "
                    f"insufficient permissions in its Policy '{self.policy_id}' ('WRITE' on 'thing:/').",
                    error="things:thing.notcreatable",
                )
            return
        if before.doc is None:
            if creates_thing(command):
                raise PolicyMovedError("The Thing was deleted concurrently.")
            raise not_found(thing_id, [])
        if before.doc.get("policyId") != self.policy_id:
            raise PolicyMovedError("The Thing's policy changed concurrently.")
        if view is None:
            raise not_found(thing_id, [])
        if self._readable is None:
            self._readable = view.has_partial("thing", [], READ)
        if not self._readable:
            raise not_found(thing_id, [])
        allowed = self._writable.get(command.path)
        if allowed is None:
            allowed = self._writable[command.path] = view.has_unrestricted("thing", parts, WRITE)
        if not allowed:
            for path in touched(command):
                if not view.has_unrestricted("thing", path, WRITE):
                    raise not_modifiable(thing_id, parts)
        if self.condition is not None:
            check_condition(view, before, self.condition)

    def readable(self, parts: list[str]) -> bool:
        """May the writer read all of the value at ``parts`` (what a patch's copy, move or test reads)?"""
        return self.view is not None and self.view.has_unrestricted("thing", parts, READ)

    def visible(self, parts: list[str], value: Any) -> Any:
        """The part of ``value`` (at ``parts``) the writer may read, :data:`patch.MISSING` if none."""
        if self.view is None:
            return jp.MISSING
        shown = self.view.filter("thing", parts, value)
        return jp.MISSING if shown is MISSING else shown


def thing_guard(
    thing_id: str,
    policy_id: str | None,
    view: SubjectView | None,
    *,
    creating: bool,
    condition: rql.Node | None = None,
) -> ThingGuard:
    """The :class:`ThingGuard` of a write by the subjects of ``view``."""
    return ThingGuard(thing_id, policy_id, view, creating=creating, condition=condition)


def readable_event(view: SubjectView | None, event: Event) -> Event | None:
    """The part of a thing event a subject may see (Ditto 3.9's partial events), else None.

    For WebSocket/SSE fan-out and history: the value is filtered like a read at the event's
    path; a deletion is shown to whoever may read something at or below its path.

    >>> from datetime import datetime, UTC
    >>> p = policies.parse_policy({"entries": {"e": {"subjects": {"u:a": {}}, "resources": {
    ...     "thing:/attributes/public": {"grant": ["READ"], "revoke": []}}}}}, "a:p")
    >>> v = policies.Enforcer(p).view(["u:a"])
    >>> e = Event(thing_id="a:t", revision=2, timestamp=datetime(2026, 1, 1, tzinfo=UTC),
    ...           action="merged", path="/attributes", value={"public": 1, "secret": 2})
    >>> readable_event(v, e).value
    {'public': 1}
    >>> readable_event(v, Event(thing_id="a:t", revision=3, timestamp=e.timestamp,
    ...                         action="modified", path="/attributes/secret", value=3)) is None
    True
    """
    if view is None:
        return None
    parts = parse_pointer(event.path)
    if event.action == "deleted":
        return event if view.has_partial("thing", parts, READ) else None
    shown = view.filter("thing", parts, event.value)
    if shown is MISSING:
        return None
    return event if shown is event.value else msgspec.structs.replace(event, value=shown)


def readable_thing(view: SubjectView | None, state: ThingState) -> dict[str, Any] | None:
    """The part of a thing the view may read; ``None``: nothing, the thing looks absent.

    A caller with READ somewhere in the thing sees at least its ``thingId`` (they named it).
    """
    if state.doc is None or view is None or not view.has_partial("thing", [], READ):
        return None
    shown = view.filter("thing", [], state.doc)
    if shown is MISSING:
        return {"thingId": state.thing_id}
    if shown is not state.doc and "thingId" not in shown:
        shown = {"thingId": state.thing_id, **shown}
    return shown  # type: ignore[no-any-return]


def with_doc(state: ThingState, doc: dict[str, Any]) -> ThingState:
    """``state`` showing ``doc`` (e.g. its readable part)."""
    return ThingState(
        thing_id=state.thing_id,
        revision=state.revision,
        created=state.created,
        modified=state.modified,
        doc=doc,
    )
