"""Property (issue 15): a subject never learns a value its policy hides — the fast layer.

For random policies, things and commands, the subject ``nginx:eve`` works on a thing owned by
``nginx:ditto``: random PUT / merge / RFC 6902 patches (add, remove, replace, copy, move, test,
over readable and hidden paths, with guessed values), deletes, reads with ``fields``,
``condition``, ``If-Match`` / ``If-None-Match`` (guessed tags) and history reads, while ditto
writes more hidden values. Everything eve gets back is recorded: values, ETags, the events
fanned out to her, every error's status, code, message, description and tag.

Two checks on every example:

* *markers*: every leaf at a path eve may not READ holds a marker (``SECRET<w><n>``, an
  integer ``9731<w><n>``, or a definition containing the string marker) and no marker may show
  up in anything eve gets back (apart from the literals eve herself sent: her guesses);
* *non-interference*: the same scenario runs in two worlds that differ only in the hidden
  values (markers of world 1 vs world 2, same shapes and lengths); eve must observe exactly
  the same in both. This catches oracles that leak no value text: a ``test`` op or a
  ``condition`` that succeeds on the right guess, a tag that is a hash of hidden data,
  ``If-None-Match`` answering 304 to a guessed tag.

The commands run through the service's own code: :class:`twinstore.service.ThingService`
(``retrieve``, ``retrieve_many``, ``write``: thing_guard, check_condition, readable_thing,
``SubjectView.filter``, the ETag checks) and :meth:`Journal._decide` (guard, preconditions,
``decide``, ``evolve``) over an in-memory stand-in for the journal's storage and the policy
store: no I/O, so thousands of scenarios fit in CI's time. tests/security/test_property_e2e.py
runs fewer through the real HTTP API, PostgreSQL and NATS.

``TWINSTORE_PROPERTY_EXAMPLES`` (default 10,000) sets the number of scenarios.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import orjson
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from policies import MISSING, READ, WRITE, SubjectView
from twinstore.auth import AuthContext
from twinstore.enforcement import PolicyCache, readable_event
from twinstore.model import etag, rql
from twinstore.model import patch as jp
from twinstore.model.errors import DittoError
from twinstore.model.fields import parse_fields
from twinstore.model.thing import Command, Delete, Event, JsonPatch, Merge, Modify, ThingState, replay
from twinstore.service import ThingService
from twinstore.store.journal import Committed, Journal, WriteRequest
from twinstore.store.recorder import Recorder

EXAMPLES = int(os.environ.get("TWINSTORE_PROPERTY_EXAMPLES", "10000"))

THING_ID = "org.prop:thing"
# The thing starts under policy a; ditto may delete it and create it again under b (another life).
POLICY_IDS = ["org.prop:policy-a", "org.prop:policy-b"]
DITTO = AuthContext(subjects=("nginx:ditto",))
EVE = AuthContext(subjects=("nginx:eve",))

# A marker of world w: a string, an integer (10 digits), or inside a definition identifier.
MARKER = re.compile(r"SECRET[12]\d{5}|9731[12]\d{5}")

Path = tuple[str, ...]

# Leaf locations of a thing (few keys, so policies, things and commands meet often).
LEAVES: list[Path] = [
    ("definition",),
    ("attributes", "a"),
    ("attributes", "a", "x"),
    ("attributes", "a", "y"),
    ("attributes", "b"),
    ("attributes", "b", "x", "u"),
    ("attributes", "c"),
    ("features", "f", "definition"),
    ("features", "f", "properties", "p"),
    ("features", "f", "properties", "p", "x"),
    ("features", "f", "properties", "q"),
    ("features", "f", "desiredProperties", "p"),
    ("features", "g", "properties", "p"),
    ("features", "g", "properties", "q", "y"),
    ("features", "g", "desiredProperties", "q"),
]
# Every resource of the thing: the leaves, their parents, the root and a few that never exist.
PATHS: list[Path] = sorted(
    {leaf[:n] for leaf in LEAVES for n in range(len(leaf) + 1)}
    | {("attributes", "z"), ("features", "h"), ("features", "f", "properties", "p", "x", "deep")},
    key=lambda p: (len(p), p),
)
# JSON patch pointers may also address array elements and the end of an array.
POINTERS: list[Path] = [*PATHS, ("attributes", "a", "0"), ("attributes", "a", "-"), ("attributes", "c", "1")]

LEAF_KINDS = ["s", "i", "l", "o"]  # string, integer, list, empty object

EVE_VALUES: list[Any] = [
    "eve1",
    7,
    {"p": "eve2"},
    {"x": "eve3", "y": 8},
    ["eve:d:1"],
    "eve:d:1",
    {"properties": {"p": "eve4"}},
    {"attributes": {"a": "eve5"}, "features": {"f": {"properties": {"q": 9}}}},
    {},
    None,
    {"a": None, "b": {"x": "eve6"}},
    {"f": {"properties": {"p": {"x": "eve7"}}}},
]
FIELDS = [
    "thingId",
    "policyId",
    "_revision",
    "attributes",
    "attributes/a",
    "attributes(a,b)",
    "attributes/a/x",
    "features",
    "features/f/properties(p,q)",
    "features/g",
    "definition",
    "p",
    "x",
    "properties/p",
]


def marker(world: int, slot: int, kind: str) -> Any:
    text = f"SECRET{world}{slot:05d}"
    number = int(f"9731{world}{slot:05d}")
    return {
        "s": text,
        "i": number,
        "l": [text, number],
        "o": {},
        "def": f"m:{text}:1",
        "fdef": [f"m:{text}:1"],
    }[kind]


def public(slot: int, kind: str) -> Any:
    return {
        "s": f"pub{slot}",
        "i": 100 + slot,
        "l": [f"pub{slot}", slot],
        "o": {},
        "def": f"pub:d{slot}:1",
        "fdef": [f"pub:d{slot}:1"],
    }[kind]


def kind_at(path: Path, kind: str) -> str:
    if path == ("definition",):
        return "def"
    if len(path) == 3 and path[0] == "features" and path[2] == "definition":
        return "fdef"
    return kind


def pointer(parts: Path) -> str:
    return "/" + "/".join(parts)


# ---- strategies ---------------------------------------------------------------------------
# Each policy resource, leaf and step is drawn as one integer and decoded (as in
# tests/policies/test_properties.py): a draw costs tens of microseconds, so drawing every
# choice on its own would make an example many times slower. Smaller integers decode to
# simpler choices (the root, no permission, a read), so shrinking still works.


class Bits:
    def __init__(self, value: int) -> None:
        self.value = value

    def take(self, n: int) -> int:
        out = self.value & ((1 << n) - 1)
        self.value >>= n
        return out

    def pick(self, items: list[Any]) -> Any:
        return items[self.take(8) % len(items)]


TAGS: list[str | None] = [*[None] * 9, "*", "rev", "old-rev", "full", "shown", "stale"]
PERMISSIONS: list[list[str]] = [[], ["READ"], ["WRITE"], ["READ", "WRITE"]]
EVE_PATHS: list[Path] = [(), ("attributes",), ("features",), ("features", "f")]  # where patches reach far


@dataclass
class EveWrite:
    kind: str  # put, merge, patch, delete
    path: Path
    value: Any  # an eve value spec, or a list of JSON patch op specs
    if_match: str | None
    if_none_match: str | None
    condition: Any


@dataclass
class DittoWrite:
    kind: str  # put, merge, delete, recreate (delete the thing, create it under ``policy``)
    path: Path
    leaves: list[tuple[int, str]]
    policy: int = 0


@dataclass
class Read:
    path: Path
    fields: str | None
    condition: Any
    if_match: str | None
    if_none_match: str | None
    revision: int | None  # a history read at (this modulo the current revision) + 1


@dataclass
class Scenario:
    policies: list[dict[str, Any]]
    initial: list[tuple[int, str]]
    steps: list[Any]
    reads: list[Read] = field(default_factory=list)


def eve_value(bits: Bits) -> tuple[str, int]:
    """A value eve sends: one of hers, or a guess (the current value at a path, in world 1)."""
    return ("guess", bits.take(8) % len(PATHS)) if bits.take(1) else ("eve", bits.take(8) % len(EVE_VALUES))


def condition(bits: Bits) -> Any:
    if bits.take(2) != 3:
        return None
    return (bits.pick(["eq", "like", "exists", "gt", "ne"]), bits.take(8) % len(PATHS), eve_value(bits))


# Eve's first resource grants broadly (else she can do nothing worth testing); further ones
# grant or revoke anywhere (revokes carve out what she may not read).
BASES: list[Path] = [(), (), ("attributes",), ("features",), ("features", "f"), ()]
BASE_GRANTS: list[list[str]] = [["READ", "WRITE"], ["READ", "WRITE"], ["READ"], ["WRITE"]]


def resource(code: int) -> tuple[int, str, dict[str, list[str]]]:
    bits = Bits(code)
    label = bits.take(2)
    path = bits.take(8) % len(PATHS)
    grant = PERMISSIONS[bits.take(2)]
    revoke = PERMISSIONS[bits.take(2)] if bits.take(1) else []
    return label, "thing:" + pointer(PATHS[path]), {"grant": grant, "revoke": revoke}


def policy(policy_id: str, base: int, codes: list[int]) -> dict[str, Any]:
    """ditto owns everything; eve's entries e0, e1 (e1 names nginx:other too); one for other alone."""
    entries: dict[str, Any] = {
        "owner": {
            "subjects": {"nginx:ditto": {"type": "test"}},
            "resources": {
                "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
            },
        }
    }
    subjects = [["nginx:eve"], ["nginx:eve", "nginx:other"], ["nginx:other"], ["nginx:eve"]]
    bits = Bits(base)
    first = (0, "thing:" + pointer(bits.pick(BASES)), {"grant": bits.pick(BASE_GRANTS), "revoke": []})
    for label, key, permissions in [first, *map(resource, codes)]:
        entry = entries.setdefault(
            f"e{label}", {"subjects": {s: {"type": "test"} for s in subjects[label]}, "resources": {}}
        )
        entry["resources"][key] = permissions
    return {"policyId": policy_id, "entries": entries}


def leaf(code: int) -> tuple[int, str]:
    return code % len(LEAVES), LEAF_KINDS[(code // 16) % len(LEAF_KINDS)]


def read(code: int) -> Read:
    bits = Bits(code)
    path = bits.pick(PATHS)
    fields = [bits.pick(FIELDS) for _ in range(bits.take(2))]
    tag, header = bits.pick(TAGS), bits.take(1)
    history = bits.take(2) == 3
    return Read(
        path=path,
        fields=",".join(fields) if fields else None,
        condition=condition(bits),
        if_match=tag if header else None,
        if_none_match=None if header else tag,
        revision=bits.take(5) if history else None,
    )


def step(code: int) -> Any:
    bits = Bits(code)
    kind = bits.take(2)
    if kind == 0:
        return read(bits.value)
    if kind == 1:
        what = bits.pick(["put", "merge", "merge", "delete", "put", "merge", "merge", "recreate"])
        path = bits.pick(PATHS)
        return DittoWrite(what, path, [leaf(bits.take(8)) for _ in range(bits.take(3))], bits.take(1))
    what = bits.pick(["patch", "put", "merge", "patch", "delete", "patch"])
    path = bits.pick(EVE_PATHS) if bits.take(1) else bits.pick(PATHS)
    value: Any
    if what == "patch":
        value = []
        for _ in range([1, 1, 2, 3][bits.take(2)]):
            op = bits.pick(["copy", "move", "test", "add", "remove", "replace", "test", "copy", "move"])
            # where it writes (test: reads), where it reads from; resolved when it runs
            target = (bits.pick(["writable", "writable", "any", "hidden"]), bits.take(8))
            if op == "test":
                target = (bits.pick(["hidden", "hidden", "any", "writable"]), target[1])
            source = (bits.pick(["hidden", "hidden", "any", "any"]), bits.take(8))
            value.append((op, target, source, eve_value(bits)))
    else:
        value = eve_value(bits)
    if_match, if_none_match = bits.pick(TAGS), bits.pick(TAGS)
    return EveWrite(what, path, value, if_match, if_none_match, condition(bits))


def number(blob: bytes) -> int:
    return int.from_bytes(blob, "little")


def decode(blobs: tuple[bytes, bytes, bytes, bytes]) -> Scenario:
    """A scenario from four byte strings (one draw each: policies, thing, steps, final reads)."""
    bits = Bits(number(blobs[0]))
    policies = []
    for policy_id in POLICY_IDS:
        base = bits.take(16)
        policies.append(policy(policy_id, base, [bits.take(17) for _ in range(bits.take(3) % 6)]))
    bits = Bits(number(blobs[1]))
    initial = [leaf(bits.take(8)) for _ in range(bits.take(4) % 11)]
    steps = blobs[2]
    reads = blobs[3]
    return Scenario(
        policies=policies,
        initial=initial,
        steps=[step(number(steps[i : i + STEP])) for i in range(0, max(1, len(steps)), STEP)],
        reads=[read(number(reads[i : i + STEP])) for i in range(0, max(1, len(reads)), STEP)],
    )


STEP = 24  # bytes per step
scenarios = st.tuples(
    st.binary(max_size=26),
    st.binary(max_size=11),
    st.binary(max_size=5 * STEP),
    st.binary(max_size=3 * STEP),
).map(decode)


# ---- the service over in-memory storage -----------------------------------------------------


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits (nothing here does I/O) without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError("the service waited for I/O in a pure test")


class MemoryPolicies:
    """The policy store's reads over one dict (the policy never changes in a scenario)."""

    def __init__(self, docs: dict[str, dict[str, Any]]) -> None:
        self.docs = docs

    async def load(self, policy_id: str) -> Any:
        return SimpleNamespace(doc=self.docs.get(policy_id))

    async def load_many(self, policy_ids: list[str]) -> dict[str, Any]:
        return {i: SimpleNamespace(doc=self.docs[i]) for i in policy_ids if i in self.docs}

    async def load_with_origin(self, policy_id: str) -> tuple[Any, int]:
        """The policy and the journal position of its creation (before every thing event)."""
        return SimpleNamespace(doc=self.docs.get(policy_id)), 0


class MemoryJournal(Journal):
    """The journal's reads and writes over a list of events; decisions are the journal's own
    (:meth:`Journal._decide`: guard, preconditions, decide, limits, evolve)."""

    def __init__(self) -> None:
        # No pool: nothing here touches the database (the size only dimensions the readers' queue).
        super().__init__(SimpleNamespace(get_max_size=lambda: 4), recorder=Recorder(1))  # type: ignore[arg-type]
        self.events: list[Event] = []
        self.state = ThingState.absent(THING_ID)
        self.policy_id = POLICY_IDS[0]  # the thing's policy (its last one while it is deleted)

    async def peek(self, thing_id: str) -> ThingState:
        return self.state if thing_id == THING_ID else ThingState.absent(thing_id)

    load = peek

    async def load_many(self, thing_ids: list[str]) -> dict[str, ThingState]:
        return {THING_ID: self.state} if THING_ID in thing_ids and self.state.exists else {}

    async def write(self, request: WriteRequest) -> Committed:
        before = self.state
        event, after, _ = self._decide(before, request)
        self.events.append(event)
        self.state = after
        if after.doc is not None:
            self.policy_id = str(after.doc.get("policyId"))
        return Committed(event=event, before=before, after=after)

    async def load_at(self, thing_id: str, revision: int, **_: Any) -> ThingState:
        return replay(ThingState.absent(thing_id), [e for e in self.events if e.revision <= revision])

    async def deletions(self, thing_id: str) -> list[tuple[int, int]]:
        """(revision, journal position) of each deletion of the whole thing (positions: revisions)."""
        return [
            (e.revision, e.revision) for e in self.events if e.action == "deleted" and e.path in ("", "/")
        ]

    async def load_historical(self, thing_id: str, revision: int) -> tuple[ThingState, Event | None]:
        for event in self.events:
            if event.revision == revision:
                return await self.load_at(thing_id, revision), event
        return ThingState.absent(thing_id), None


def insert(doc: dict[str, Any], path: Path, value: Any) -> None:
    """Put ``value`` at ``path`` unless something else is in the way (then leave it out)."""
    node = doc
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node.setdefault(path[-1], value)


class World:
    """One copy of the scenario; worlds differ only in the values at eve's hidden leaves."""

    def __init__(self, number: int, cache: PolicyCache, views: dict[str, SubjectView]) -> None:
        self.number = number
        self.views = views
        self.view = views[POLICY_IDS[0]]  # eve's view of the policy the values being made go under
        self.slot = 0
        self.journal = MemoryJournal()
        policies = SimpleNamespace(cache=cache, store=cache.store)
        self.service = ThingService(self.journal, policies)  # type: ignore[arg-type]

    def value(self, path: Path, kind: str) -> Any:
        self.slot += 1
        kind = kind_at(path, kind)
        hidden = not self.view.has_permission("thing", path, READ)
        return marker(self.number, self.slot, kind) if hidden else public(self.slot, kind)

    def subtree(self, base: Path, chosen: list[tuple[int, str]]) -> Any:
        """Ditto's value at ``base`` made of the chosen leaves that lie at or below it."""
        if base in [LEAVES[i] for i, _ in chosen]:
            return self.value(base, next(k for i, k in chosen if LEAVES[i] == base))
        doc: dict[str, Any] = {}
        for index, kind in chosen:
            leaf = LEAVES[index]
            if leaf[: len(base)] == base and len(leaf) > len(base):
                insert(doc, leaf[len(base) :], self.value(leaf, kind))
        return doc

    def policy_id(self) -> str:
        return self.journal.policy_id

    def ditto(self, command: Command) -> Event | None:
        try:
            done = run(
                self.service.write(
                    DITTO, WriteRequest(thing_id=THING_ID, command=command, originator="nginx:ditto")
                )
            )
        except DittoError:
            return None
        assert isinstance(done, Committed)
        return done.event


def error(exc: DittoError) -> dict[str, Any]:
    return {**exc.to_dict(), "etag": getattr(exc, "etag", None)}


def event_seen(view: SubjectView | None, event: Event | None) -> Any:
    """What the fan-out (WebSocket, SSE) sends eve of an event (``view``: of the thing's policy)."""
    if event is None or view is None:
        return None
    shown = readable_event(view, event)
    return None if shown is None else {"action": shown.action, "path": shown.path, "value": shown.value}


class Runner:
    """Runs a scenario in two worlds step by step; eve's guesses are resolved from world 1."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        # One policy cache for both worlds: they share the policies (compiled once per scenario).
        store = MemoryPolicies({p["policyId"]: p for p in scenario.policies})
        cache = PolicyCache(store)  # type: ignore[arg-type]
        self.views = {p: run(cache.view(p, EVE.subjects)) for p in POLICY_IDS}
        self.worlds = [World(1, cache, self.views), World(2, cache, self.views)]
        self.sent: set[str] = set()  # marker literals eve sent herself (her guesses)
        self.log: list[Any] = []

    # -- eve's inputs ---------------------------------------------------------------------

    def eve_value(self, spec: tuple[str, int]) -> Any:
        what, index = spec
        if what == "eve":
            return EVE_VALUES[index]
        guessed = jp.get_at(self.worlds[0].journal.state.doc or {}, list(PATHS[index]))
        guessed = "eve-guess" if guessed is jp.MISSING else guessed
        self.sent.update(MARKER.findall(orjson.dumps(guessed).decode()))
        return guessed

    def tag(self, spec: str | None, path: Path) -> list[str] | None:
        """A tag eve sends: '*', a revision tag, a stale one, or a digest of the whole (hidden
        included) or the readable value at ``path`` in world 1."""
        if spec is None:
            return None
        state = self.worlds[0].journal.state
        if spec == "*":
            return ["*"]
        if spec == "rev":
            return [etag.etag_of(None, state.revision, [])]
        if spec == "old-rev":
            return [etag.etag_of(None, state.revision - 1, [])]
        if spec == "stale":  # a 412 names the current tag
            return ['"hash:0123456789abcdef"']
        value = jp.get_at(state.doc or {}, list(path))
        if spec == "shown" and value is not jp.MISSING:
            value = self.views[self.worlds[0].policy_id()].filter("thing", list(path), value)
        value = None if value is jp.MISSING or value is MISSING else value
        return [etag.etag_of(value, state.revision, list(path))]

    def condition(self, spec: Any) -> rql.Node | None:
        if spec is None:
            return None
        op, index, value_spec = spec
        field_ = "/".join(PATHS[index]) or "thingId"
        value = self.eve_value(value_spec)
        if op == "exists" or not isinstance(value, str | int):
            text = f"exists({field_})"
        elif op == "like":
            text = f"like({field_},{json.dumps(str(value)[:7] + '*')})"
        else:
            text = f"{op}({field_},{json.dumps(value)})"
        self.sent.update(MARKER.findall(text))
        try:
            return rql.parse_condition(text)
        except DittoError:  # refused with the request (400, quoting eve's own text), before any read
            return None

    def eve_command(self, step: EveWrite) -> Command:
        where = pointer(step.path)
        if step.kind == "delete":
            return Delete(path=where)
        if step.kind != "patch":
            value = self.eve_value(step.value)
            return Modify(path=where, value=value) if step.kind == "put" else Merge(path=where, value=value)
        ops = []
        for op, target, source, value_spec in step.value:
            item: dict[str, Any] = {"op": op, "path": self.locate(step.path, target)}
            if op in ("copy", "move"):
                item["from"] = self.locate(step.path, source)
            if op in ("add", "replace", "test"):
                item["value"] = self.eve_value(value_spec)
            ops.append(item)
        return JsonPatch(path=where, value=ops)

    def locate(self, base: Path, spec: tuple[str, int]) -> str:
        """A JSON patch pointer (relative to ``base``): anywhere, or where world 1 now has a value
        eve may not read in full ('hidden'), or where she may write ('writable')."""
        kind, n = spec
        world = self.worlds[0]
        doc, view = world.journal.state.doc or {}, self.views[world.policy_id()]
        below = [p for p in PATHS if len(p) > len(base) and p[: len(base)] == base]
        if kind == "hidden":
            found = [
                p
                for p in below
                if jp.get_at(doc, list(p)) is not jp.MISSING and not view.has_unrestricted("thing", p, READ)
            ]
        elif kind == "writable":
            found = [
                p
                for p in below
                if view.has_unrestricted("thing", p, WRITE) and isinstance(jp.get_at(doc, list(p[:-1])), dict)
            ]
        else:
            found = []
        return relative(base, found[n % len(found)] if found else POINTERS[n % len(POINTERS)])

    # -- steps ----------------------------------------------------------------------------

    def live(self, world: World, event: Event | None) -> Any:
        """What eve is sent of an event live: judged by the thing's policy then."""
        return event_seen(self.views[world.policy_id()], event)

    def create(self) -> None:
        for world in self.worlds:
            doc = {"policyId": POLICY_IDS[0], **world.subtree((), self.scenario.initial)}
            event = world.ditto(Modify(path="/", value=doc))
            assert event is not None, "the initial thing must be valid"
        self.observe("created", [self.live(w, w.journal.events[-1]) for w in self.worlds])

    def ditto(self, step: DittoWrite) -> None:
        seen = []
        for world in self.worlds:
            where = pointer(step.path)
            if step.kind == "recreate":
                # Another life: the thing deleted, then created under either policy.
                deleted = self.live(world, world.ditto(Delete(path="/")))
                policy_id = POLICY_IDS[step.policy]
                world.view = self.views[policy_id]
                doc = {"policyId": policy_id, **world.subtree((), step.leaves)}
                seen.append((deleted, self.live(world, world.ditto(Modify(path="/", value=doc)))))
                continue
            world.view = self.views[world.policy_id()]
            if step.kind == "delete":
                command: Command = Delete(path=where)
            else:
                value = world.subtree(step.path, step.leaves)
                if step.path == ():
                    value = {"policyId": world.policy_id(), **value}
                command = (
                    Modify(path=where, value=value) if step.kind == "put" else Merge(path=where, value=value)
                )
            seen.append(self.live(world, world.ditto(command)))
        self.observe(f"ditto {step.kind} {pointer(step.path)}", seen)

    def eve(self, step: EveWrite) -> None:
        command = self.eve_command(step)
        request = WriteRequest(
            thing_id=THING_ID,
            command=command,
            originator="nginx:eve",
            if_match=self.tag(step.if_match, step.path),
            if_none_match=self.tag(step.if_none_match, step.path),
        )
        condition = self.condition(step.condition)
        seen = []
        for world in self.worlds:
            try:
                done = run(world.service.write(EVE, request, condition=condition))
            except DittoError as exc:
                seen.append({"error": error(exc)})
                continue
            seen.append({"action": done.event.action, "event": self.live(world, done.event)})
        self.observe(("eve", command, request.if_match, request.if_none_match, step.condition), seen)

    def read(self, step: Read) -> None:
        fields = None if step.fields is None else parse_fields(step.fields)
        condition = self.condition(step.condition)
        if_match = self.tag(step.if_match, step.path)
        if_none_match = self.tag(step.if_none_match, step.path)
        revision = None
        if step.revision is not None:
            revision = step.revision % (self.worlds[0].journal.state.revision + 1) + 1
        seen = []
        for world in self.worlds:
            try:
                got = run(
                    world.service.retrieve(
                        EVE,
                        THING_ID,
                        pointer(step.path),
                        fields=fields,
                        if_match=if_match,
                        if_none_match=if_none_match,
                        condition=condition,
                        at_revision=revision,
                    )
                )
            except DittoError as exc:
                seen.append({"error": error(exc)})
                continue
            history = None if got.event is None else (got.event.revision, got.event.originator)
            seen.append({"value": got.value, "etag": got.etag, "history": history})
        listed = [
            run(w.service.retrieve_many(EVE, [THING_ID], fields if step.path == () else None))
            for w in self.worlds
        ]
        self.observe(("read", step, if_match, if_none_match, revision), seen)
        self.observe("list", listed)

    def history(self) -> None:
        """Eve reads every revision, and what a history stream (SSE, WebSocket) sends her of each
        event: each judged by the service's view of that event's life (as api/history.py does)."""
        streamed = []
        for world in self.worlds:
            access = run(world.service.history_access(EVE.subjects, world.journal.state))
            events = []
            for event in world.journal.events:
                view = run(access.view_at(event.revision))
                events.append(None if event.action == "deleted" else event_seen(view, event))
            streamed.append(events)
        self.observe("history stream", streamed)
        for revision in range(1, self.worlds[0].journal.state.revision + 1):
            self.read(Read((), None, None, None, None, revision - 1))

    def observe(self, what: Any, seen: list[Any]) -> None:
        self.log.append((what, seen[0]))
        for world, got in zip(self.worlds, seen, strict=True):
            text = orjson.dumps(got, default=str).decode()
            leaked = set(MARKER.findall(text)) - self.sent
            assert not leaked, f"world {world.number}: eve received hidden values {leaked} at {what}: {text}"
        assert seen[0] == seen[1], (
            f"eve's observation depends on hidden values at {what}:\n world 1: {seen[0]}\n world 2: {seen[1]}"
        )


def relative(base: Path, target: Path) -> str:
    """A JSON pointer relative to ``base``: the target's rest below it, else the target as is."""
    if target[: len(base)] == base:
        return pointer(target[len(base) :]) if len(target) > len(base) else ""
    return pointer(target)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios)
def test_subject_never_learns_hidden_values(scenario: Scenario) -> None:
    for p in scenario.policies:
        note(f"{p['policyId']} entries: {json.dumps(p['entries'])}")
    note(f"initial leaves: {[(LEAVES[i], k) for i, k in scenario.initial]}")
    note(f"steps: {scenario.steps}")
    note(f"final reads: {scenario.reads}")
    runner = Runner(scenario)
    runner.create()
    for step in scenario.steps:
        if isinstance(step, EveWrite):
            runner.eve(step)
        elif isinstance(step, DittoWrite):
            runner.ditto(step)
        else:
            runner.read(step)
    for read in scenario.reads:
        runner.read(read)
    runner.history()
