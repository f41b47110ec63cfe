"""Hypothesis properties: the enforcer agrees with a brute-force reference evaluator.

The reference works on the raw policy JSON: for every question it scans every resource of every
entry that applies, finds the deepest node on the path that grants or revokes (revoke wins at the
same node), and builds views by evaluating each node of the document on its own. No trie, no
precomputed summaries, no shortcuts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import EXECUTE, MISSING, READ, WRITE, Enforcer, parse_policy

NOW = datetime(2026, 1, 1, tzinfo=UTC)
PAST = (NOW - timedelta(hours=1)).isoformat()
FUTURE = (NOW + timedelta(hours=1)).isoformat()
SEGMENTS = ["attributes", "features", "f1", "f2", "properties", "a", "b"]
SUBJECTS = ["u:s1", "u:s2", "u:s3", "u:s4"]
ALL_PERMISSIONS = [READ, WRITE, EXECUTE]

Node = tuple[str, tuple[str, ...], frozenset[str], frozenset[str]]  # type, path, grant, revoke
Path = tuple[str, ...]

# --- strategies -------------------------------------------------------------------------------

# Each resource, entry head and document leaf is drawn as one integer and decoded into JSON:
# hypothesis costs tens of microseconds per draw, so drawing nested dictionaries value by value
# would make every example several times slower. Smaller integers decode to simpler values
# (shallower paths, fewer permissions), so shrinking still works.


class _Bits:
    def __init__(self, value: int) -> None:
        self.value = value

    def take(self, n: int) -> int:
        out = self.value & ((1 << n) - 1)
        self.value >>= n
        return out


def _path(bits: _Bits, max_depth: int) -> Path:
    depth = bits.take(3) % (max_depth + 1)
    return tuple(SEGMENTS[bits.take(3) % len(SEGMENTS)] for _ in range(depth))


def _permissions(mask: int) -> list[str]:
    return [p for i, p in enumerate(ALL_PERMISSIONS) if mask & (1 << i)]


def _resource(code: int) -> tuple[str, dict[str, Any]]:
    bits = _Bits(code)
    grant, revoke, omit = bits.take(3), bits.take(3) & bits.take(3), bits.take(2)  # revokes rarer
    rtype = "policy" if bits.take(2) == 3 else "thing"
    tail = "/" if bits.take(2) == 3 else ""
    path = _path(bits, 3)
    body: dict[str, Any] = {}
    if grant or not omit & 1:
        body["grant"] = _permissions(grant)
    if revoke or not omit & 2:
        body["revoke"] = _permissions(revoke)
    return f"{rtype}:/{'/'.join(path)}{tail}", body


SUBJECT_VALUES: list[dict[str, Any]] = [{}, {"type": "t"}, {"expiry": PAST}, {"expiry": FUTURE}]


def _entry(head: int, resources: list[int]) -> dict[str, Any]:
    bits = _Bits(head)
    chosen = [s for i, s in enumerate(SUBJECTS) if bits.take(1)][:3] or [SUBJECTS[0]]
    subjects = {s: dict(SUBJECT_VALUES[bits.take(2)]) for s in chosen}
    return {"subjects": subjects, "resources": dict(_resource(r) for r in resources)}


entries = st.builds(_entry, st.integers(0, 2**10 - 1), st.lists(st.integers(0, 2**27 - 1), max_size=5))
policy_docs = st.lists(entries, min_size=1, max_size=6).map(
    lambda es: {"entries": {f"e{i}": e for i, e in enumerate(es)}}
)
subject_sets = st.integers(0, 31).map(
    lambda m: frozenset(s for i, s in enumerate([*SUBJECTS, "u:s5"]) if m & (1 << i))
)
paths = st.integers(0, 2**15 - 1).map(lambda code: _path(_Bits(code), 4))
LEAVES: list[Any] = [0, 1, "x", "", None, True, [], [1, "a"], {}]


def _document(codes: list[int]) -> dict[str, Any]:
    """Nested dicts holding one leaf per code; a leaf that would sit inside another leaf is skipped."""
    doc: dict[str, Any] = {}
    for code in codes:
        bits = _Bits(code)
        leaf = LEAVES[bits.take(4) % len(LEAVES)]
        path = _path(bits, 4)
        if not path:
            continue
        node = doc
        for segment in path[:-1]:
            node = node.setdefault(segment, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(path[-1], copy.deepcopy(leaf))
    return doc


documents = st.lists(st.integers(0, 2**19 - 1), max_size=10).map(_document)

SETTINGS = settings(
    deadline=None, database=None, derandomize=False, suppress_health_check=[HealthCheck.too_slow]
)

# --- the reference evaluator ------------------------------------------------------------------


def ref_nodes(doc: dict[str, Any], subjects: frozenset[str]) -> list[Node]:
    """Every resource of every entry naming one of ``subjects`` that has not expired at NOW."""
    nodes: list[Node] = []
    for entry in doc["entries"].values():
        applies = any(
            sid in subjects and ("expiry" not in value or datetime.fromisoformat(value["expiry"]) >= NOW)
            for sid, value in entry["subjects"].items()
        )
        if applies:
            for key, body in entry["resources"].items():
                rtype, _, raw = key.partition(":")
                path = tuple(s for s in raw.split("/") if s != "")
                nodes.append(
                    (rtype, path, frozenset(body.get("grant", [])), frozenset(body.get("revoke", [])))
                )
    return nodes


def ref_at(nodes: list[Node], rtype: str, path: Path, perm: str) -> tuple[bool, bool]:
    """(granted, revoked) of ``perm`` exactly at ``path``, over all applying entries."""
    at = [n for n in nodes if n[0] == rtype and n[1] == path]
    return any(perm in n[2] for n in at), any(perm in n[3] for n in at)


def ref_effective(nodes: list[Node], rtype: str, path: Path, perm: str) -> bool:
    for depth in range(len(path), -1, -1):
        granted, revoked = ref_at(nodes, rtype, path[:depth], perm)
        if revoked:
            return False
        if granted:
            return True
    return False


def below(nodes: list[Node], rtype: str, path: Path) -> list[Node]:
    return [n for n in nodes if n[0] == rtype and len(n[1]) > len(path) and n[1][: len(path)] == path]


def ref_unrestricted(nodes: list[Node], rtype: str, path: Path, perm: str) -> bool:
    return ref_effective(nodes, rtype, path, perm) and not any(
        perm in n[3] for n in below(nodes, rtype, path)
    )


def ref_partial(nodes: list[Node], rtype: str, path: Path, perm: str) -> bool:
    if ref_effective(nodes, rtype, path, perm):
        return True
    return any(ref_at(nodes, rtype, n[1], perm) == (True, False) for n in below(nodes, rtype, path))


def ref_view(nodes: list[Node], path: Path, value: Any, perm: str) -> Any:
    """The documented inclusion rule, evaluated node by node."""
    readable = ref_effective(nodes, "thing", path, perm)
    if not isinstance(value, dict):
        return value if readable else MISSING
    kept = {k: r for k, v in value.items() if (r := ref_view(nodes, (*path, k), v, perm)) is not MISSING}
    return kept if kept or readable else MISSING


def leaves_of(value: Any, path: Path) -> Iterator[tuple[Path, Any]]:
    """Non-dict values and empty dicts with their paths."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaves_of(v, (*path, k))
    else:
        yield path, value


def lookup(value: Any, path: Path) -> Any:
    for segment in path:
        if not isinstance(value, dict) or segment not in value:
            return MISSING
        value = value[segment]
    return value


# --- properties -------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=5000)
@given(policy_docs, subject_sets, documents, paths, st.sampled_from([READ, READ, WRITE]))
def test_filtered_view_equals_reference(
    doc: dict[str, Any], subjects: frozenset[str], value: dict[str, Any], base: Path, perm: str
) -> None:
    view = Enforcer(parse_policy(doc, "ns:p")).view(subjects, NOW)
    nodes = ref_nodes(doc, subjects)
    original = copy.deepcopy(value)
    out = view.filter("thing", base, value, perm)
    assert value == original  # (input not mutated)
    # (a) same view as the reference
    assert out == ref_view(nodes, base, value, perm)
    # (b) every leaf shown is readable; every readable leaf is shown
    if out is not MISSING:
        for rel, leaf in leaves_of(out, ()):
            assert ref_effective(nodes, "thing", base + rel, perm)
            original_leaf = lookup(value, rel)
            # an empty dict in the view is a readable dict whose children were all dropped
            assert original_leaf == leaf or (leaf == {} and isinstance(original_leaf, dict))
    for rel, leaf in leaves_of(value, ()):
        if not isinstance(leaf, dict):
            shown = out is not MISSING and lookup(out, rel) is not MISSING
            assert shown == ref_effective(nodes, "thing", base + rel, perm)
    # the whole value comes back as is exactly when the reference says the base is unrestricted
    if ref_unrestricted(nodes, "thing", base, perm):
        assert out is value


@settings(SETTINGS, max_examples=4000)
@given(
    policy_docs,
    subject_sets,
    st.lists(st.lists(st.sampled_from(SEGMENTS), max_size=5).map(tuple), max_size=4),
)
def test_permission_queries_equal_reference(
    doc: dict[str, Any], subjects: frozenset[str], queries: list[Path]
) -> None:
    view = Enforcer(parse_policy(doc, "ns:p")).view(subjects, NOW)
    nodes = ref_nodes(doc, subjects)
    for path in [(), *queries]:
        for rtype in ("thing", "policy"):
            for perm in ALL_PERMISSIONS:
                assert view.has_permission(rtype, path, perm) == ref_effective(nodes, rtype, path, perm)
                assert view.has_unrestricted(rtype, path, perm) == ref_unrestricted(nodes, rtype, path, perm)
                assert view.has_partial(rtype, path, perm) == ref_partial(nodes, rtype, path, perm)


@settings(SETTINGS, max_examples=2500)
@given(policy_docs, subject_sets, st.lists(paths, min_size=1, max_size=4))
def test_write_allowed_exactly_when_reference_allows(
    doc: dict[str, Any], subjects: frozenset[str], touched: list[Path]
) -> None:
    enforcer = Enforcer(parse_policy(doc, "ns:p"))
    view = enforcer.view(subjects, NOW)
    assert enforcer.view(list(reversed(sorted(subjects))), NOW) is view  # cached per subject set
    nodes = ref_nodes(doc, subjects)
    expected = all(ref_unrestricted(nodes, "thing", p, WRITE) for p in touched)
    assert all(view.has_unrestricted("thing", p, WRITE) for p in touched) == expected
    assert all(view.check("thing:/" + "/".join(p), [WRITE]) for p in touched) == expected
