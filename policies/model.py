"""Ditto's policy model: immutable values parsed and validated from Ditto API v2 JSON.

A policy is a set of labelled entries; each entry names subjects (``issuer:subject``) and resources
(``thing:/features/f``) with the permissions it grants and revokes. Parsing validates everything at
once and raises :class:`PolicyInvalidError` with Ditto's error code and a message naming the entry,
subject or resource that is wrong; ``to_json`` gives the canonical Ditto form back.

>>> p = parse_policy({"entries": {"owner": {
...     "subjects": {"nginx:ditto": {"type": "generated"}},
...     "resources": {"thing:/features/f/": {"grant": ["READ"]}}}}}, "ns:p")
>>> p.entries["owner"].resources["thing:/features/f"].grant
('READ',)
>>> p.to_json()["entries"]["owner"]["resources"]
{'thing:/features/f': {'grant': ['READ'], 'revoke': []}}

Errors (one class, Ditto codes in ``error``)::

    ValueError
    └── PolicyInvalidError   json.invalid, json.field.missing, policies:id.notsettable,
                             policies:label.invalid, policies:subjectid.invalid,
                             policies:subjectexpiry.invalid, policies:entry.invalid,
                             policies:policy.invalid (fallback)
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "EXECUTE",
    "PERMISSIONS",
    "READ",
    "RESOURCE_TYPES",
    "WRITE",
    "Entry",
    "Policy",
    "PolicyInvalidError",
    "ResourcePermissions",
    "Subject",
    "parse_entry",
    "parse_policy",
    "parse_resource_key",
]

READ = "READ"
WRITE = "WRITE"
EXECUTE = "EXECUTE"
PERMISSIONS = frozenset({READ, WRITE, EXECUTE})
RESOURCE_TYPES = frozenset({"thing", "policy", "message"})


class PolicyInvalidError(ValueError):
    """A policy document (or part of one) is not valid; ``error`` is Ditto's error code.

    >>> PolicyInvalidError("Label 'a/b' must not contain '/'.", "policies:label.invalid").error
    'policies:label.invalid'
    """

    def __init__(self, message: str, error: str = "policies:policy.invalid") -> None:
        super().__init__(message)
        self.message = message
        self.error = error


@dataclass(frozen=True, slots=True)
class Subject:
    """A subject of an entry; ``expiry`` is kept as given, ``expires_at`` is its parsed instant."""

    id: str
    type: str | None = None
    expiry: str | None = None
    expires_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def active(self, now: datetime) -> bool:
        """True unless the subject has expired: it still applies at its expiry instant itself."""
        return self.expires_at is None or now <= self.expires_at

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.type is not None:
            out["type"] = self.type
        if self.expiry is not None:
            out["expiry"] = self.expiry
        out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class ResourcePermissions:
    """Permissions an entry grants and revokes on one resource (path segments, no empty ones)."""

    resource_type: str
    path: tuple[str, ...]
    grant: tuple[str, ...] = ()
    revoke: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The canonical resource key, e.g. ``thing:/features/f``."""
        return f"{self.resource_type}:/{'/'.join(self.path)}"

    def to_json(self) -> dict[str, list[str]]:
        return {"grant": list(self.grant), "revoke": list(self.revoke)}


@dataclass(frozen=True, slots=True)
class Entry:
    """A labelled policy entry; ``resources`` is keyed by canonical key; ``extra`` keeps other keys."""

    label: str
    subjects: dict[str, Subject]
    resources: dict[str, ResourcePermissions]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "subjects": {sid: s.to_json() for sid, s in self.subjects.items()},
            "resources": {key: r.to_json() for key, r in self.resources.items()},
        }
        out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole policy; ``imports`` is kept verbatim (no semantics here)."""

    policy_id: str
    entries: dict[str, Entry]
    imports: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policyId": self.policy_id}
        if self.imports is not None:
            out["imports"] = self.imports
        out["entries"] = {label: e.to_json() for label, e in self.entries.items()}
        return out


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def _object(doc: object, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise PolicyInvalidError(f"{where} must be a JSON object, not {_json_type(doc)}.", "json.invalid")
    return doc


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def parse_resource_key(key: str) -> tuple[str, tuple[str, ...]]:
    """Split a resource key into its type and path segments; empty segments are ignored.

    >>> parse_resource_key("thing:/features/f/")
    ('thing', ('features', 'f'))
    >>> parse_resource_key("thing:/")
    ('thing', ())
    >>> parse_resource_key("things:/")
    Traceback (most recent call last):
    ...
    policies.model.PolicyInvalidError: Resource 'things:/' has unknown type 'things' (expected one of ...).
    """
    if not isinstance(key, str):
        raise PolicyInvalidError(f"Resource key must be a string, not {_json_type(key)}.", "json.invalid")
    rtype, sep, path = key.partition(":")
    if not sep:
        raise PolicyInvalidError(
            f"Resource '{key}' must have the form '<type>:/<path>', e.g. 'thing:/'.", "policies:entry.invalid"
        )
    if rtype not in RESOURCE_TYPES:
        raise PolicyInvalidError(
            f"Resource '{key}' has unknown type '{rtype}' (expected one of message, policy, thing).",
            "policies:entry.invalid",
        )
    if not path.startswith("/"):
        raise PolicyInvalidError(
            f"Resource '{key}' must have a path starting with '/'.", "policies:entry.invalid"
        )
    if _has_control(path):
        raise PolicyInvalidError(f"Resource {key!r} contains control characters.", "policies:entry.invalid")
    return rtype, tuple(seg for seg in path.split("/") if seg)


def _parse_permissions(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyInvalidError(
            f"{where} must be an array of permissions, not {_json_type(value)}.", "json.invalid"
        )
    out: list[str] = []
    for perm in value:
        if not isinstance(perm, str):
            raise PolicyInvalidError(f"{where} must hold strings, found {_json_type(perm)}.", "json.invalid")
        if perm not in PERMISSIONS:
            raise PolicyInvalidError(
                f"{where} holds unknown permission '{perm}' (expected EXECUTE, READ or WRITE).",
                "policies:entry.invalid",
            )
        if perm not in out:
            out.append(perm)
    return tuple(out)


def _parse_resources(label: str, doc: object) -> dict[str, ResourcePermissions]:
    resources: dict[str, ResourcePermissions] = {}
    for key, value in _object(doc, f"'resources' of entry '{label}'").items():
        rtype, path = parse_resource_key(key)
        where = f"Resource '{key}' of entry '{label}'"
        body = _object(value, where)
        unknown = sorted(set(body) - {"grant", "revoke"})
        if unknown:
            raise PolicyInvalidError(
                f"{where} has unknown field(s) {', '.join(unknown)} (expected 'grant' and 'revoke').",
                "policies:entry.invalid",
            )
        grant = _parse_permissions(body.get("grant"), f"'grant' of {where}")
        revoke = _parse_permissions(body.get("revoke"), f"'revoke' of {where}")
        res = ResourcePermissions(rtype, path, grant, revoke)
        old = resources.get(res.key)
        if old is not None:  # "thing:/a" and "thing:/a/" name the same resource: merge them
            merged_grant = old.grant + tuple(p for p in grant if p not in old.grant)
            merged_revoke = old.revoke + tuple(p for p in revoke if p not in old.revoke)
            res = ResourcePermissions(rtype, path, merged_grant, merged_revoke)
        resources[res.key] = res
    return resources


def _parse_expiry(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise PolicyInvalidError(
            f"'expiry' of {where} must be a string, not {_json_type(value)}.", "json.invalid"
        )
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        instant = None
    if instant is None or instant.tzinfo is None:
        raise PolicyInvalidError(
            f"'expiry' of {where} ('{value}') must be an ISO-8601 timestamp with offset, "
            "e.g. '2026-12-01T00:00:00Z'.",
            "policies:subjectexpiry.invalid",
        )
    return instant.astimezone(UTC)


def _parse_subject(label: str, sid: str, doc: object) -> Subject:
    issuer, sep, name = sid.partition(":")
    if not sep or not issuer or not name or _has_control(sid):
        raise PolicyInvalidError(
            f"Subject id {sid!r} of entry '{label}' must have the form '<issuer>:<subject>' "
            "(both parts non-empty, no control characters).",
            "policies:subjectid.invalid",
        )
    where = f"subject '{sid}' of entry '{label}'"
    body = _object(doc, where[0].upper() + where[1:])
    stype = body.get("type")
    if stype is not None and not isinstance(stype, str):
        raise PolicyInvalidError(
            f"'type' of {where} must be a string, not {_json_type(stype)}.", "json.invalid"
        )
    expiry = body.get("expiry")
    expires_at = None if expiry is None else _parse_expiry(expiry, where)
    extra = {k: v for k, v in body.items() if k not in ("type", "expiry")}
    return Subject(sid, stype, expiry, expires_at, extra)


def _check_label(label: object) -> str:
    if not isinstance(label, str):
        raise PolicyInvalidError(f"Entry label must be a string, not {_json_type(label)}.", "json.invalid")
    if not label or "/" in label or _has_control(label):
        raise PolicyInvalidError(
            f"Entry label {label!r} is not valid: it must be non-empty, without '/' and control characters.",
            "policies:label.invalid",
        )
    return label


def parse_entry(label: str, doc: object) -> Entry:
    """Validate one policy entry (also used for single-entry edits).

    >>> e = parse_entry("owner", {"subjects": {"a:b": {}}, "resources": {"thing:/": {"grant": ["WRITE"]}}})
    >>> e.resources["thing:/"]
    ResourcePermissions(resource_type='thing', path=(), grant=('WRITE',), revoke=())
    >>> parse_entry("owner", {"subjects": {"ab": {}}, "resources": {}})
    Traceback (most recent call last):
    ...
    policies.model.PolicyInvalidError: Subject id 'ab' of entry 'owner' must have the form ...
    """
    label = _check_label(label)
    body = _object(doc, f"Entry '{label}'")
    for name in ("subjects", "resources"):
        if name not in body:
            raise PolicyInvalidError(f"Entry '{label}' lacks the field '{name}'.", "json.field.missing")
    subjects_doc = _object(body["subjects"], f"'subjects' of entry '{label}'")
    subjects = {sid: _parse_subject(label, sid, value) for sid, value in subjects_doc.items()}
    resources = _parse_resources(label, body["resources"])
    extra = {k: v for k, v in body.items() if k not in ("subjects", "resources")}
    return Entry(label, subjects, resources, extra)


def parse_policy(doc: object, policy_id: str) -> Policy:
    """Validate a whole policy document stored under ``policy_id``; keys starting with '_' are dropped.

    >>> parse_policy({"policyId": "ns:other", "entries": {}}, "ns:p")
    Traceback (most recent call last):
    ...
    policies.model.PolicyInvalidError: The policyId 'ns:other' in the body differs from 'ns:p' ...
    """
    body = _object(doc, "Policy")
    if "policyId" in body and body["policyId"] != policy_id:
        raise PolicyInvalidError(
            f"The policyId {body['policyId']!r} in the body differs from {policy_id!r} of the request.",
            "policies:id.notsettable",
        )
    if "entries" not in body:
        raise PolicyInvalidError("Policy lacks the field 'entries'.", "json.field.missing")
    entries_doc = _object(body["entries"], "'entries' of the policy")
    entries = {label: parse_entry(label, value) for label, value in entries_doc.items()}
    return Policy(policy_id, entries, body.get("imports"))
