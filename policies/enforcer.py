"""Ditto's tree-based policy evaluation: which paths a set of subjects may read, write or execute.

An :class:`Enforcer` is built once per policy revision. ``view(subjects)`` compiles the entries that
apply to those subjects (at least one of them named in the entry and not expired) into one trie per
resource type and caches it. Each trie node holds the union of grants and revokes of those entries
at its path, plus precomputed summaries, so every question is a walk down one path:

* effective permission at P: decided by the deepest node on the way from the root to P (inclusive)
  that grants or revokes it; at one node a revoke beats a grant; no decision = not permitted;
* ``has_unrestricted``: effective at P and no node strictly below P revokes it (what writes need);
* ``has_partial``: effective at P or some node below P effectively grants it.

>>> from policies.model import parse_policy
>>> policy = parse_policy({"entries": {"e": {"subjects": {"u:alice": {}}, "resources": {
...     "thing:/": {"grant": ["READ", "WRITE"]},
...     "thing:/attributes/secret": {"revoke": ["READ"]}}}}}, "ns:p")
>>> view = Enforcer(policy).view(["u:alice"])
>>> view.has_permission("thing", ["attributes", "secret"], READ)
False
>>> view.has_unrestricted("thing", [], READ), view.has_partial("thing", [], READ)
(False, True)
>>> view.filter("thing", [], {"attributes": {"secret": 1, "location": "x"}})
{'attributes': {'location': 'x'}}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from policies.model import READ, Policy, Subject, parse_resource_key

__all__ = ["MISSING", "Enforcer", "SubjectView"]


class _Missing:
    """Type of :data:`MISSING`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()
"""Returned by :meth:`SubjectView.filter` when nothing of the value is readable."""

_EMPTY: frozenset[str] = frozenset()
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


class _Node:
    """One path node of a compiled trie; every field is a set of permission names.

    ``effective``: permitted at this node (inherited from above unless decided here);
    ``revoked_below`` / ``granted_below``: revoked / effectively granted at some strict descendant.
    """

    __slots__ = ("children", "effective", "granted", "granted_below", "revoked", "revoked_below")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.granted: frozenset[str] = _EMPTY
        self.revoked: frozenset[str] = _EMPTY
        self.effective: frozenset[str] = _EMPTY
        self.revoked_below: frozenset[str] = _EMPTY
        self.granted_below: frozenset[str] = _EMPTY

    def finish(self, inherited: frozenset[str]) -> None:
        """Compute the summaries of this subtree (top-down ``effective``, bottom-up the rest)."""
        self.effective = (inherited | self.granted) - self.revoked
        revoked_below: set[str] = set()
        granted_below: set[str] = set()
        for child in self.children.values():
            child.finish(self.effective)
            revoked_below |= child.revoked | child.revoked_below
            granted_below |= (child.granted - child.revoked) | child.granted_below
        self.revoked_below = frozenset(revoked_below)
        self.granted_below = frozenset(granted_below)


class SubjectView:
    """What one set of subjects may do under one policy revision at one time; immutable.

    Unknown resource types or permission names are simply not permitted.
    """

    __slots__ = ("_roots", "labels")

    def __init__(self, roots: dict[str, _Node], labels: frozenset[str]) -> None:
        self._roots = roots
        self.labels = labels
        """Labels of the entries that apply."""

    def _locate(self, resource_type: str, path: Sequence[str]) -> tuple[_Node | None, frozenset[str]]:
        """The node at ``path`` (None beyond the trie) and the permissions effective at ``path``."""
        node = self._roots.get(resource_type)
        if node is None:
            return None, _EMPTY
        for segment in path:
            child = node.children.get(segment)
            if child is None:
                return None, node.effective
            node = child
        return node, node.effective

    def has_permission(self, resource_type: str, path: Sequence[str], permission: str) -> bool:
        """Is ``permission`` effective at ``path`` (segments, e.g. ``["features", "f"]``)?"""
        return permission in self._locate(resource_type, path)[1]

    def has_unrestricted(self, resource_type: str, path: Sequence[str], permission: str) -> bool:
        """Effective at ``path`` and not revoked anywhere below it (needed for a write)."""
        node, effective = self._locate(resource_type, path)
        return permission in effective and (node is None or permission not in node.revoked_below)

    def has_partial(self, resource_type: str, path: Sequence[str], permission: str) -> bool:
        """Effective at ``path`` or effectively granted somewhere below it."""
        node, effective = self._locate(resource_type, path)
        return permission in effective or (node is not None and permission in node.granted_below)

    def check(self, resource: str, permissions: Iterable[str]) -> bool:
        """Unrestricted on a resource key (``"thing:/features/f"``) for every permission given.

        >>> SubjectView({}, frozenset()).check("thing:/", ["READ"])
        False
        """
        resource_type, path = parse_resource_key(resource)
        return all(self.has_unrestricted(resource_type, path, p) for p in permissions)

    def filter(self, resource_type: str, base: Sequence[str], value: Any, permission: str = READ) -> Any:
        """The part of ``value`` (located at ``base``) on which ``permission`` holds, or :data:`MISSING`.

        The rule (Ditto's ``buildJsonView``), applied from ``base`` downwards:

        * a subtree whose node has the permission effective and no revoke below is returned whole,
          as the same object (no copy);
        * a subtree whose node is not permitted and has no effective grant below is dropped;
        * otherwise dicts are rebuilt key by key; a non-dict value (scalar or list: lists are
          leaves, never descended into) is included exactly when the permission is effective at
          its own path; a dict is included if the permission is effective at its own path (as
          ``{}`` if every child was dropped) or if at least one child was included.

        The input is never mutated; nothing readable gives :data:`MISSING`.

        >>> SubjectView({}, frozenset()).filter("thing", [], {"a": 1})
        MISSING
        """
        node, effective = self._locate(resource_type, base)
        if node is None:
            return value if permission in effective else MISSING
        return _filter(node, value, permission)


def _filter(node: _Node, value: Any, permission: str) -> Any:
    permitted = permission in node.effective
    if permitted:
        if permission not in node.revoked_below:
            return value
    elif permission not in node.granted_below:
        return MISSING
    if not isinstance(value, dict):
        return value if permitted else MISSING
    out: dict[str, Any] = {}
    children = node.children
    for key, item in value.items():
        child = children.get(key)
        if child is None:
            if permitted:
                out[key] = item
            continue
        # the two shortcuts of _filter once more, inline: most children take one (saves a call each)
        if permission in child.effective:
            if permission not in child.revoked_below:
                out[key] = item
                continue
        elif permission not in child.granted_below:
            continue
        kept = _filter(child, item, permission)
        if kept is not MISSING:
            out[key] = kept
    return out if out or permitted else MISSING


class Enforcer:
    """Compiled decision point for one policy revision; hands out cached :class:`SubjectView`s.

    A view is reused for the same subject set only while no subject it depends on changes between
    active and expired; the cache holds at most ``cache_size`` views (least recently used evicted).
    """

    def __init__(self, policy: Policy, cache_size: int = 1024) -> None:
        self.policy = policy
        self._cache_size = cache_size
        self._cache: OrderedDict[frozenset[str], tuple[SubjectView, datetime, datetime]] = OrderedDict()
        self._by_subject: dict[str, list[tuple[str, Subject]]] = {}
        for label, entry in policy.entries.items():
            for sid, subject in entry.subjects.items():
                self._by_subject.setdefault(sid, []).append((label, subject))

    def subjects(self) -> set[str]:
        """Every subject id named in any entry."""
        return set(self._by_subject)

    def view(self, subjects: Iterable[str], now: datetime | None = None) -> SubjectView:
        """The view of ``subjects`` at ``now`` (default: the current time; naive means UTC)."""
        if now is None:
            now = datetime.now(UTC)
        elif now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        key = frozenset(subjects)
        cached = self._cache.get(key)
        if cached is not None:
            view, after, until = cached
            if after < now <= until:
                self._cache.move_to_end(key)
                return view
        view, after, until = self._compile(key, now)
        self._cache[key] = (view, after, until)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return view

    def _compile(self, subjects: frozenset[str], now: datetime) -> tuple[SubjectView, datetime, datetime]:
        """Build the view and the interval (after, until] of times at which it stays the same."""
        labels: set[str] = set()
        after, until = _EARLIEST, _LATEST
        for sid in subjects:
            for label, subject in self._by_subject.get(sid, ()):
                expires_at = subject.expires_at
                if expires_at is None:
                    labels.add(label)
                elif now <= expires_at:
                    labels.add(label)
                    until = min(until, expires_at)
                else:
                    after = max(after, expires_at)
        roots: dict[str, _Node] = {}
        for label in sorted(labels):
            for res in self.policy.entries[label].resources.values():
                node = roots.setdefault(res.resource_type, _Node())
                for segment in res.path:
                    node = node.children.setdefault(segment, _Node())
                node.granted = node.granted.union(res.grant)
                node.revoked = node.revoked.union(res.revoke)
        for root in roots.values():
            root.finish(_EMPTY)
        return SubjectView(roots, frozenset(labels)), after, until
