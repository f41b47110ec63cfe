"""``twinstore replay``: rebuild current state from the journal alone and compare it with the projection.

Journal rows are streamed ordered by ``(entity, id, revision)`` through a server-side cursor in
one consistent snapshot (never loaded whole) and folded with the same functions the stores use
(:func:`twinstore.model.thing.evolve`, :func:`twinstore.model.policy.evolve_policy`), one entity
at a time, keeping only its current state. Finished entities are compared in batches with their
projection rows (``things`` / ``policies``: revision, created, modified, document, chain head
hash, and ``policy_id`` of things or ``readers`` of policies). Projection rows without any event
are found afterwards with an anti-join.

A thing whose oldest events were removed by history retention (``twinstore audit cleanup``)
is folded from the snapshot kept at its newest retention anchor instead of from revision 1
(the rows come with the anchor and its snapshot merged in front, :data:`SELECT_ROWS_ANCHORED`);
without that snapshot it cannot be replayed (``unreplayable``, never repaired).

With ``repair`` the differing rows are rewritten from the journal, one transaction per batch and
partition, under that partition's write lock (writes to other partitions go on), and only while
the entity's newest event is still the one replayed (a write committed meanwhile already brought
its row up to date); projection rows without events are deleted.

>>> first_difference({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": [1, 3]}})
'/a/c/1'
>>> first_difference({"a~b": 1}, {"a~b": 2})
'/a~0b'
>>> first_difference({"a": 1}, {"a": 1}) is None
True
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from twinstore.audit import NEWEST_ANCHOR, Scope, has_retention
from twinstore.model.policy import PolicyEvent, PolicyState, evolve_policy, thing_readers
from twinstore.model.thing import ThingState, evolve
from twinstore.store import connection
from twinstore.store.codec import dumps
from twinstore.store.journal import event_from_row
from twinstore.store.recorder import Recorder
from twinstore.store.schema import stored_partitions

__all__ = ["Difference", "Report", "Scope", "first_difference", "replay_database"]

BATCH = 500

SELECT_ROWS = """
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash,
       false AS anchor
FROM journal{where} ORDER BY entity, id, revision
"""
# Each entity's newest retention anchor with the snapshot kept there (its state at the anchor's
# revision: modified as ts, created, doc) merged in front of its rows; both branches in primary
# key order (a Merge Append, still streamed).
SELECT_ROWS_ANCHORED = f"""
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash,
       false AS anchor, NULL::timestamptz AS created, NULL::text AS doc, false AS snapshot
FROM journal{{where}}
UNION ALL
SELECT r.entity, r.id, r.revision, s.modified, '', '', NULL, '', NULL, r.hash,
       true, s.created, s.doc::text, s.revision IS NOT NULL
FROM (SELECT * FROM journal_retention r{{where}}{{glue}}{NEWEST_ANCHOR}) r
LEFT JOIN snapshots s ON s.entity = r.entity AND s.id = r.id AND s.revision = r.revision
ORDER BY entity, id, revision
"""
SELECT_THINGS = (
    "SELECT id, revision, created, modified, doc, hash, policy_id, partition FROM things "
    "WHERE id = any($1::text[])"
)
SELECT_POLICIES = (
    "SELECT id, revision, created, modified, doc, hash, readers, partition FROM policies "
    "WHERE id = any($1::text[])"
)
# Projection rows of no entity in the journal ({table} and {entity} are fixed strings).
SELECT_EXTRA = """
SELECT p.id FROM {table} p{where}{glue}NOT EXISTS (
    SELECT 1 FROM journal j WHERE j.entity = '{entity}' AND j.id = p.id
) ORDER BY p.id
"""
HEAD = "SELECT revision, hash FROM journal WHERE entity = $1 AND id = $2 ORDER BY revision DESC LIMIT 1"
REPAIR_THING = """
INSERT INTO things (id, revision, created, modified, policy_id, doc, hash, partition)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8)
ON CONFLICT (id, partition) DO UPDATE SET revision = excluded.revision, created = excluded.created,
    modified = excluded.modified, policy_id = excluded.policy_id, doc = excluded.doc, hash = excluded.hash
"""
# The generated columns of policies (full_readers, ...) follow doc by themselves.
REPAIR_POLICY = """
INSERT INTO policies (id, revision, created, modified, doc, hash, readers, partition)
VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7::text[], $8)
ON CONFLICT (id, partition) DO UPDATE SET revision = excluded.revision, created = excluded.created,
    modified = excluded.modified, doc = excluded.doc, hash = excluded.hash, readers = excluded.readers
"""
# A row in another partition than its id's (written by hand: every reader looks in the id's own
# partition, so for them the entity has no row) goes before the row is written where it belongs.
DELETE_MISPLACED = "DELETE FROM {table} WHERE id = $1 AND partition <> $2"
DELETE_EXTRA = """
DELETE FROM {table} p WHERE p.id = $1
AND NOT EXISTS (SELECT 1 FROM journal j WHERE j.entity = '{entity}' AND j.id = p.id)
"""
TABLES = {"thing": "things", "policy": "policies"}


@dataclass(frozen=True)
class Difference:
    """How one entity's projection row differs from its replayed state."""

    entity: str
    id: str
    # 'missing' (no projection row), 'extra' (no events), 'mismatch', or 'unreplayable' (no
    # snapshot at the retention anchor: never repaired)
    kind: str
    fields: tuple[str, ...] = ()
    detail: str = ""
    repaired: bool = False

    def __str__(self) -> str:
        text = f"{self.entity} {self.id}: {self.kind}"
        if self.detail:
            text += f": {self.detail}"
        return text + (" (repaired)" if self.repaired else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "id": self.id,
            "kind": self.kind,
            "fields": list(self.fields),
            "detail": self.detail,
            "repaired": self.repaired,
        }


@dataclass
class Report:
    entities: int = 0
    events: int = 0
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0
    repair: bool = False

    @property
    def repaired(self) -> int:
        return sum(d.repaired for d in self.differences)

    @property
    def ok(self) -> bool:
        """No difference, or (with repair) every difference repaired."""
        return all(d.repaired for d in self.differences) if self.repair else not self.differences

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entities": self.entities,
            "events": self.events,
            "differences": [d.as_dict() for d in self.differences],
            "repaired": self.repaired,
            "seconds": round(self.seconds, 3),
        }


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def first_difference(a: Any, b: Any, at: str = "") -> str | None:
    """The JSON pointer of the first place where ``a`` and ``b`` differ (``None`` if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b:
                return f"{at}/{_escape(key)}"
            found = first_difference(a[key], b[key], f"{at}/{_escape(key)}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            found = first_difference(x, y, f"{at}/{i}")
            if found is not None:
                return found
        return None if len(a) == len(b) else f"{at}/{min(len(a), len(b))}"
    if a == b and isinstance(a, bool) == isinstance(b, bool):
        return None
    return at or "/"


@dataclass
class _Replayed:
    """An entity's state folded from its events, and its newest event's chain hash."""

    entity: str
    id: str
    revision: int
    created: datetime | None
    modified: datetime | None
    doc: dict[str, Any] | None
    hash: bytes
    problem: str | None = None  # why the state could not be folded (then it is not compared)

    def extra(self) -> tuple[str, Any]:
        if self.entity == "thing":
            return "policy_id", None if self.doc is None else self.doc.get("policyId")
        return "readers", thing_readers(self.doc)


def _compare(r: _Replayed, row: asyncpg.Record | None, partition: int) -> Difference | None:
    if r.problem is not None:
        return Difference(r.entity, r.id, "unreplayable", (), r.problem)
    if row is None:
        return Difference(
            r.entity, r.id, "missing", (), f"no projection row (journal at revision {r.revision})"
        )
    fields: list[str] = []
    details: list[str] = []
    if row["revision"] != r.revision:
        fields.append("revision")
        details.append(f"revision {row['revision']} in the projection, {r.revision} in the journal")
    pointer = first_difference(r.doc, row["doc"])
    if pointer is not None:
        fields.append("doc")
        details.append(f"document differs at {pointer}")
    for name in ("created", "modified"):
        if row[name] != getattr(r, name):
            fields.append(name)
            details.append(f"{name} {row[name]} in the projection, {getattr(r, name)} in the journal")
    name, expected = r.extra()
    stored = list(row[name]) if name == "readers" else row[name]
    if stored != expected:
        fields.append(name)
        details.append(f"{name} {stored!r} in the projection, {expected!r} in the journal")
    if bytes(row["hash"]) != r.hash:
        fields.append("hash")
        details.append("chain head hash differs")
    if row["partition"] != partition:
        fields.append("partition")
        details.append(f"partition {row['partition']} in the projection, {partition} for its id")
    if not fields:
        return None
    return Difference(r.entity, r.id, "mismatch", tuple(fields), "; ".join(details))


class _Folder:
    """Folds one entity's rows with the stores' own evolve functions."""

    def __init__(self, entity: str, entity_id: str) -> None:
        self.entity = entity
        self.id = entity_id
        self.thing = ThingState.absent(entity_id) if entity == "thing" else None
        self.policy = PolicyState(policy_id=entity_id) if entity == "policy" else None
        self.hash = b""
        self.problem: str | None = None

    def add(self, row: asyncpg.Record) -> None:
        if row["anchor"]:
            self._anchor(row)
        elif self.thing is not None:
            self.thing = evolve(self.thing, event_from_row(row))
        elif self.policy is not None:
            value = row["value"]
            event = PolicyEvent(
                policy_id=row["id"],
                revision=row["revision"],
                timestamp=row["ts"],
                action=row["action"],
                path=row["path"],
                value=None if value is None else orjson.loads(value),
                originator=row["originator"],
                correlation_id=row["correlation_id"],
            )
            self.policy = evolve_policy(self.policy, event)
        self.hash = bytes(row["hash"])

    def _anchor(self, row: asyncpg.Record) -> None:
        """Start from the snapshot kept at a retention anchor (only things have anchors)."""
        revision = row["revision"]
        self.hash = bytes(row["hash"])
        if not row["snapshot"] or self.thing is None:
            self.problem = f"no snapshot at the retention anchor (revision {revision}): the state is unknown"
            return
        doc = None if row["doc"] is None else orjson.loads(row["doc"])
        self.thing = ThingState(
            thing_id=self.id, revision=revision, created=row["created"], modified=row["ts"], doc=doc
        )

    def result(self) -> _Replayed:
        s: ThingState | PolicyState | None = self.thing if self.thing is not None else self.policy
        assert s is not None
        return _Replayed(
            self.entity, self.id, s.revision, s.created, s.modified, s.doc, self.hash, self.problem
        )


# The entities with a projection to rebuild (other entities' events, such as anomaly labels,
# are hash-chained and verified by audit verify, and have nothing to replay).
FOLDED = ("thing", "policy")


async def _init(con: asyncpg.Connection) -> None:
    await con.set_type_codec("jsonb", encoder=dumps, decoder=orjson.loads, schema="pg_catalog")


async def _repair(
    con: asyncpg.Connection, recorder: Recorder, batch: list[tuple[Difference, _Replayed | None]]
) -> list[Difference]:
    """Rewrite the batch's rows, one transaction per partition under that partition's write lock
    (writes elsewhere go on); the differences marked as repaired where done, in batch order."""
    by_partition: dict[int, list[int]] = {}
    for i, (diff, _) in enumerate(batch):
        by_partition.setdefault(recorder.partition(diff.id), []).append(i)
    done: dict[int, Difference] = {}
    for partition, indexes in sorted(by_partition.items()):
        async with con.transaction():
            await recorder.lock(con, [partition])
            for i in indexes:
                done[i] = await _repair_one(con, partition, *batch[i])
    return [done[i] for i in range(len(batch))]


async def _repair_one(
    con: asyncpg.Connection, partition: int, diff: Difference, r: _Replayed | None
) -> Difference:
    """One row rewritten (its partition locked by the caller's transaction)."""
    if r is None:
        delete = DELETE_EXTRA.format(table=TABLES[diff.entity], entity=diff.entity)
        status = await con.execute(delete, diff.id)
        return replace(diff, repaired=status != "DELETE 0")
    head = await con.fetchrow(HEAD, r.entity, r.id)
    if head is None or head["revision"] != r.revision or bytes(head["hash"]) != r.hash:
        return diff  # written meanwhile: the writer has brought the row up to date itself
    doc = None if r.doc is None else dumps(r.doc)
    _, extra = r.extra()
    await con.execute(DELETE_MISPLACED.format(table=TABLES[r.entity]), r.id, partition)
    if r.entity == "thing":
        await con.execute(
            REPAIR_THING, r.id, r.revision, r.created, r.modified, extra, doc, r.hash, partition
        )
    else:
        await con.execute(
            REPAIR_POLICY, r.id, r.revision, r.created, r.modified, doc, r.hash, extra, partition
        )
    return replace(diff, repaired=True)


def _extra_where(scope: Scope, entity: str) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if scope.thing is not None:
        args.append(scope.thing)
        clauses.append(f"p.id = ${len(args)}")
    if scope.namespace is not None:
        args += [scope.namespace + ":", scope.namespace + ";"]
        clauses.append(f"p.id >= ${len(args) - 1} AND p.id < ${len(args)}")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


async def replay_database(
    url: str,
    scope: Scope | None = None,
    *,
    repair: bool = False,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH,
    prefetch: int = 2000,
) -> Report:
    """Replay the journal at ``url`` (streamed, one snapshot) and compare with the projection."""
    scope = scope or Scope()
    report = Report(repair=repair)
    started = time.monotonic()
    con = await connection.connect(url)
    writer = await connection.connect(url) if repair else None
    try:
        await _init(con)
        placing = Recorder(await stored_partitions(con))  # where each id's rows belong
        recorder: Recorder | None = None
        if writer is not None:
            await _init(writer)
            recorder = placing
        where, args = scope.where()
        entities = (
            ["thing"] if scope.thing is not None else [scope.entity] if scope.entity else ["thing", "policy"]
        )
        async with con.transaction(isolation="repeatable_read", readonly=True):
            if on_total is not None:
                on_total(int(await con.fetchval(f"SELECT count(*) FROM journal{where}", *args)))
            pending: list[_Replayed] = []

            async def settle(found: list[tuple[Difference, _Replayed | None]]) -> None:
                report.differences.extend(d for d, _ in found if d.kind == "unreplayable")
                found = [(d, r) for d, r in found if d.kind != "unreplayable"]
                if not found:
                    return
                if writer is not None and recorder is not None:
                    report.differences.extend(await _repair(writer, recorder, found))
                else:
                    report.differences.extend(d for d, _ in found)

            async def flush() -> None:
                found: list[tuple[Difference, _Replayed | None]] = []
                for entity in ("thing", "policy"):
                    group = [r for r in pending if r.entity == entity]
                    if not group:
                        continue
                    query = SELECT_THINGS if entity == "thing" else SELECT_POLICIES
                    rows = {row["id"]: row for row in await con.fetch(query, [r.id for r in group])}
                    for r in group:
                        diff = _compare(r, rows.get(r.id), placing.partition(r.id))
                        if diff is not None:
                            found.append((diff, r))
                pending.clear()
                await settle(found)

            if await has_retention(con):
                glue = " AND " if where else " WHERE "
                query = SELECT_ROWS_ANCHORED.format(where=where, glue=glue)
            else:
                query = SELECT_ROWS.format(where=where)

            async def rows() -> AsyncIterator[asyncpg.Record]:
                async for row in con.cursor(query, *args, prefetch=prefetch):
                    yield row

            current: _Folder | None = None
            count = 0
            async for row in rows():
                if row["entity"] not in FOLDED:
                    continue  # e.g. anomaly labels: events with no projection (audit verify checks them)
                if current is None or (row["entity"], row["id"]) != (current.entity, current.id):
                    if current is not None:
                        pending.append(current.result())
                        if len(pending) >= batch_size:
                            await flush()
                    current = _Folder(row["entity"], row["id"])
                    report.entities += 1
                current.add(row)
                if row["anchor"]:
                    continue
                report.events += 1
                count += 1
                if progress is not None and count >= 1000:
                    progress(count)
                    count = 0
            if current is not None:
                pending.append(current.result())
            await flush()
            if progress is not None and count:
                progress(count)

            for entity in entities:
                extra_where, extra_args = _extra_where(scope, entity)
                query = SELECT_EXTRA.format(
                    table=TABLES[entity],
                    entity=entity,
                    where=extra_where,
                    glue=" AND " if extra_where else " WHERE ",
                )
                found: list[tuple[Difference, _Replayed | None]] = []
                async for row in con.cursor(query, *extra_args, prefetch=prefetch):
                    found.append(
                        (Difference(entity, row["id"], "extra", (), "projection row without events"), None)
                    )
                    if len(found) >= batch_size:
                        await settle(found)
                        found = []
                await settle(found)
    finally:
        await con.close()
        if writer is not None:
            await writer.close()
    report.seconds = time.monotonic() - started
    return report
