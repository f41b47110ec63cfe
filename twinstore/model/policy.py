"""Policies as event-sourced entities: commands on the policy document, ``decide`` and ``evolve``.

A policy is edited like a thing: every Ditto policy resource is a path in the policy JSON
(``/entries/{label}/resources/{resourceKey}``), a write is one event (created, modified,
deleted) at that path, and the whole resulting policy is validated by :mod:`policies`.
Resource keys contain ``/`` (``thing:/features/f``), so event paths escape keys as RFC 6901
does (``~1`` for ``/``, ``~0`` for ``~``).

>>> from datetime import datetime, UTC
>>> now = datetime(2026, 1, 1, tzinfo=UTC)
>>> doc = default_policy("org.acme:pump", "nginx:ditto")
>>> e1 = decide_policy(PolicyState(policy_id="org.acme:pump"), PolicyModify(parts=[], value=doc), now)
>>> s1 = evolve_policy(PolicyState(policy_id="org.acme:pump"), e1)
>>> e2 = decide_policy(s1, PolicyDelete(parts=["entries", "DEFAULT", "resources", "message:/"]), now)
>>> e2.path
'/entries/DEFAULT/resources/message:~1'
>>> sorted(evolve_policy(s1, e2).doc["entries"]["DEFAULT"]["resources"])
['policy:/', 'thing:/']
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

import policies
from twinstore.model import patch as jp
from twinstore.model.errors import InvalidInputError, NotFoundError, policy_not_found

__all__ = [
    "PolicyCommand",
    "PolicyDelete",
    "PolicyEvent",
    "PolicyModify",
    "PolicyState",
    "decide_policy",
    "default_policy",
    "escape_pointer",
    "evolve_policy",
    "parse_escaped_pointer",
    "thing_readers",
    "validate_policy_path",
]

Action = Literal["created", "modified", "deleted"]


class PolicyState(msgspec.Struct, kw_only=True):
    """A policy at a revision; ``doc is None`` means absent or deleted (revisions continue)."""

    policy_id: str
    revision: int = 0
    created: datetime | None = None
    modified: datetime | None = None
    doc: dict[str, Any] | None = None

    @property
    def exists(self) -> bool:
        return self.doc is not None


class PolicyEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One committed change of one policy (a journal row with ``entity = 'policy'``)."""

    policy_id: str
    revision: int
    timestamp: datetime
    action: Action
    path: str
    value: Any = None
    originator: str = ""
    correlation_id: str | None = None


class PolicyModify(msgspec.Struct, tag=True, kw_only=True):
    """PUT of a policy resource: create or replace the value at ``parts``."""

    parts: list[str]
    value: Any


class PolicyDelete(msgspec.Struct, tag=True, kw_only=True):
    """DELETE of a policy resource (``[]`` deletes the policy)."""

    parts: list[str]


PolicyCommand = PolicyModify | PolicyDelete


def escape_pointer(parts: list[str]) -> str:
    """RFC 6901 pointer of ``parts`` (``[]`` -> ``"/"``)."""
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def parse_escaped_pointer(pointer: str) -> list[str]:
    """Inverse of :func:`escape_pointer`."""
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/") if p]


def default_policy(policy_id: str, subject: str) -> dict[str, Any]:
    """Ditto's default policy: the creating subject may READ and WRITE everything."""
    all_rights = {"grant": ["READ", "WRITE"], "revoke": []}
    return {
        "policyId": policy_id,
        "entries": {
            "DEFAULT": {
                "subjects": {subject: {"type": "generated"}},
                "resources": {"thing:/": all_rights, "policy:/": all_rights, "message:/": all_rights},
                "importable": "implicit",
            }
        },
    }


def thing_readers(doc: dict[str, Any] | None) -> list[str]:
    """Subjects of the entries that grant READ on some ``thing:`` resource (sorted).

    Only they can read anything of the policy's things, so search looks at no other policies
    (the decision itself, with revokes and expiry, is still the enforcer's).

    >>> thing_readers(default_policy("a:b", "nginx:ditto"))
    ['nginx:ditto']
    """
    readers: set[str] = set()
    for entry in ((doc or {}).get("entries") or {}).values():
        resources = entry.get("resources") or {}
        if any(key.startswith("thing:") and "READ" in (r.get("grant") or []) for key, r in resources.items()):
            readers.update(entry.get("subjects") or {})
    return sorted(readers)


# Addressable levels: () policy, entries, an entry, its subjects / resources and one of them.
_NOUNS = {
    1: ("entries", "policies:entries"),
    2: ("entry", "policies:entry"),
    3: ("{kind}", "policies:{kind}"),
    4: ("{one}", "policies:{one}"),
}


def validate_policy_path(parts: list[str]) -> None:
    """Refuse paths that do not address a resource of a policy (400)."""
    ok = (len(parts) <= 2 and (not parts or parts[0] == "entries")) or (
        len(parts) in (3, 4) and parts[0] == "entries" and parts[2] in ("subjects", "resources")
    )
    if not ok:
        raise InvalidInputError(f"The path '{escape_pointer(parts)}' does not address a Policy resource.")


def resource_noun(parts: list[str]) -> tuple[str, str]:
    """(noun, Ditto error code stem) of a policy resource: ``("entry", "policies:entry")``."""
    if not parts:
        return "Policy", "policies:policy"
    noun, code = _NOUNS[len(parts)]
    kind = parts[2] if len(parts) > 2 else ""
    one = kind[:-1]
    return noun.format(kind=kind, one=one), code.format(kind=kind, one=one)


def _not_found(state: PolicyState, parts: list[str]) -> NotFoundError:
    if not parts or state.doc is None:
        return policy_not_found(state.policy_id)
    # The first missing level names the error (a missing entry, before its subject).
    for depth in range(2, len(parts) + 1):
        if jp.get_at(state.doc, parts[:depth]) is jp.MISSING:
            noun, code = resource_noun(parts[:depth])
            return NotFoundError(
                f"The {noun} '{parts[depth - 1]}' of the Policy with ID '{state.policy_id}' could not "
                "be found or requester had insufficient permissions to access it.",
                error=code + ".notfound",
                description="Check if the ID of the Policy and the path were correct.",
            )
    return policy_not_found(state.policy_id)


def _validated(doc: Any, policy_id: str) -> dict[str, Any]:
    """The whole policy checked by :func:`policies.parse_policy`, in its canonical JSON."""
    try:
        return policies.parse_policy(doc, policy_id).to_json()
    except policies.PolicyInvalidError as exc:
        raise InvalidInputError(
            exc.message,
            error=exc.error,
            description="Check the structure of the Policy (see Ditto's policy JSON schema).",
        ) from None


def decide_policy(
    state: PolicyState,
    command: PolicyCommand,
    now: datetime,
    *,
    originator: str = "",
    correlation_id: str | None = None,
) -> PolicyEvent:
    """Turn one command into exactly one event, or raise a :class:`DittoError`."""
    parts = command.parts
    validate_policy_path(parts)
    common: dict[str, Any] = {
        "policy_id": state.policy_id,
        "revision": state.revision + 1,
        "timestamp": now,
        "originator": originator,
        "correlation_id": correlation_id,
        "path": escape_pointer(parts),
    }
    match command:
        case PolicyModify(value=value) if not parts:
            # As Ditto: "any policyId specified in the request body is ignored".
            body = {**value, "policyId": state.policy_id} if isinstance(value, dict) else value
            doc = _validated(body, state.policy_id)
            return PolicyEvent(**common, action="modified" if state.exists else "created", value=doc)
        case PolicyModify(value=value):
            if state.doc is None:
                raise policy_not_found(state.policy_id)
            parent = parts[:2] if len(parts) > 2 else []
            if parent and jp.get_at(state.doc, parent) is jp.MISSING:
                raise _not_found(state, parts)
            existed = jp.get_at(state.doc, parts) is not jp.MISSING
            doc = _validated(jp.set_at(state.doc, parts, value), state.policy_id)
            action: Action = "modified" if existed else "created"
            return PolicyEvent(**common, action=action, value=jp.get_at(doc, parts))
        case PolicyDelete():
            if state.doc is None or (parts and jp.get_at(state.doc, parts) is jp.MISSING):
                raise _not_found(state, parts)
            if parts:
                _validated(jp.remove_at(state.doc, parts), state.policy_id)
            return PolicyEvent(**common, action="deleted")
    raise AssertionError(f"unknown command {command!r}")  # pragma: no cover


def evolve_policy(state: PolicyState, event: PolicyEvent) -> PolicyState:
    """Apply one event (the fold step of replay)."""
    parts = parse_escaped_pointer(event.path)
    created = state.created
    doc: dict[str, Any] | None
    if event.action == "deleted" and not parts:
        doc, created = None, None
    elif event.action == "deleted":
        doc = jp.remove_at(state.doc or {}, parts)
    elif not parts:
        doc = event.value
        if event.action == "created":
            created = event.timestamp
    else:
        doc = jp.set_at(state.doc or {}, parts, event.value)
    return PolicyState(
        policy_id=state.policy_id, revision=event.revision, created=created, modified=event.timestamp, doc=doc
    )
