"""``twinstore audit cleanup``: history retention, removing the oldest events of things.

The default is to keep everything (``history_retention_days`` unset). A cleanup removes, per
thing, the longest prefix of its journal events that is entirely

* older than the cutoff (``ts < cutoff``),
* sealed by the latest audit checkpoint and already published by the NATS relay (an event is
  never removed before subscribers had it): its ``seq`` is at or below both the checkpoint's
  head of the event's partition and the relay's cursor of that partition (``relay_cursors``,
  name ``events``). No checkpoint, nothing is removed;
* below the thing's newest event (the chain head is never removed, so every thing keeps a
  chain that a checkpoint can seal and a deleted thing keeps its deletion),

and leaves in its place a *retention anchor* (``journal_retention``: the last removed revision,
its hash and time, the digest of the snapshot kept there) plus a snapshot of the state at that
revision, so the state at every retained revision stays reconstructible (history reads and
``replay`` start from it) and ``audit verify`` starts the chain at the anchor's hash instead of
GENESIS (see :mod:`twinstore.audit` for what is and is not detected then). Snapshots below the
anchor are removed with the events.

Why per partition: the journal is ordered per partition (:mod:`twinstore.store.recorder`), not
globally. The global ``position`` is unique but an event with a lower position can commit after
one with a higher position in another partition, so a bound on positions (what cleanup used
before the journal had partitions) could remove an event that committed after the checkpoint
and the relay had moved past its position. ``seq`` is in commit order within its partition, and
a checkpoint records the vector of partition heads it sealed; the bounds are that vector and the
relay's cursors, partition by partition (``_partition_bounds``).

Checkpoints made before the upgrade to partitions have no partition heads. Their
``journal_position`` was a cut in commit order then, and migration 15 numbered every existing
event in its partition in position order, so such a checkpoint sealed, in each partition,
exactly the events up to the highest ``seq`` whose position is at or below its
``journal_position``: cleanup derives the vector so (one scan of the events from before the
upgrade; a new ``twinstore audit checkpoint`` avoids it). That holds only for a checkpoint
taken before the upgrade (created before migration 15 was applied, :data:`PARTITIONED_SCHEMA`);
one without partition heads created later (an older twinstore writing to an upgraded
database) is refused with a message asking for a new checkpoint.

With ``audit_signing_key`` the checkpoint's signature is checked before its partition heads are
trusted (they say how far events may be removed): one that does not verify with that key is
refused (``audit verify`` says why).

Policy events are all kept: they are few, they are the record of who was allowed to read what
(a deleted thing's history is filtered by its last policy) and retention is asked for thing
history.

Every run is recorded in ``journal_cleanups`` (who, when, the cutoff, the checkpoint and the
per-partition bounds it respected, the scope, how many anchors, events and snapshots) with a
digest that starts from its bounds and folds in the anchors it set in order, signed with
``audit_signing_key`` like checkpoints; ``audit verify`` recomputes it
(:func:`twinstore.audit.cleanup_seed`). Its ``journal_position`` column is filled with the
checkpoint's, for readers of the old column; it bounds nothing. Things are processed in
batches in id order, each batch in one transaction that also updates the run's record, so an
interrupted run leaves a consistent record of what it did. Before a thing's events are
removed, their chain links are checked (from the anchor or GENESIS up to the first retained
event): a broken chain is left alone and reported, so retention never destroys the evidence of
tampering.

Locking (a deliberate departure from ``replay --repair``, which rewrites rows writers also
write and so takes the partition write locks): cleanup does *not* take the write lock.
Everything it changes is below every thing's newest event, where no writer ever writes:
writers append revisions above the head, upsert the projection (untouched here) and insert
snapshots at their new revisions (``ON CONFLICT DO NOTHING`` on both sides); the relay only
reads seqs above its cursors, and cleanup removes none of those. Holding the write lock
for a batch (reading and re-hashing up to a whole long history) would stall every write of
every process for nothing. What does need care is concurrent *readers*: a history read takes
a snapshot and then the events after it in two statements, so a cleanup committing in between
leaves a gap, which :meth:`twinstore.store.journal.Journal.load_at` detects and reads again;
``audit verify``, ``replay`` and ``export`` read in one snapshot. Cleanup runs exclude each
other with their own session advisory lock (:data:`RETENTION_LOCK`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

from twinstore.audit import (
    SELECT_ROWS,
    Row,
    Scope,
    Vector,
    anchor_leaf,
    canonical_vector,
    checkpoint_message,
    cleanup_message,
    cleanup_seed,
    fold_anchor,
    key_id,
    load_signing_key,
    parse_vector,
    row_hash,
    signature_problem,
    snapshot_digest,
)
from twinstore.model.thing import ThingState, evolve
from twinstore.store import connection
from twinstore.store.codec import GENESIS, dumps
from twinstore.store.journal import event_from_row
from twinstore.store.schema import stored_partitions

__all__ = [
    "PARTITIONED_SCHEMA",
    "RETENTION_LOCK",
    "CleanupBusy",
    "CleanupReport",
    "Scope",
    "Skipped",
    "cleanup_database",
]

# Serialises cleanup runs (a session advisory lock; a second run is refused, not queued).
RETENTION_LOCK = 7_242_005
BATCH = 200
# The schema version that split the journal into partitions (twinstore.store.schema): a
# checkpoint created before it was applied sealed a cut in global position order.
PARTITIONED_SCHEMA = 15

LATEST_CHECKPOINT = """
SELECT c.id, c.journal_position, c.partition_heads::text AS partition_heads, c.root, c.signature,
       c.key_id, c.created < m.applied AS before_partitions
FROM audit_checkpoints c LEFT JOIN twinstore_migrations m ON m.version = $1
ORDER BY c.id DESC LIMIT 1
"""
# What a checkpoint from before partitions sealed, per partition (see the module docstring).
SEALED_BY_POSITION = "SELECT partition, max(seq) AS seq FROM journal WHERE position <= $1 GROUP BY partition"
RELAY_CURSORS = "SELECT partition, seq FROM relay_cursors WHERE name = 'events'"
# Per thing of the batch (id order, after the last one done): its first and newest revision and
# the first revision that must stay (too new, or beyond its partition's sealed and published
# seq: ${bounds} is indexed by partition + 1, a partition without a bound keeps everything).
CANDIDATES = """
SELECT id, min(partition) AS partition, min(revision) AS first, max(revision) AS newest,
       min(revision) FILTER (
           WHERE ts >= ${cutoff} OR seq > coalesce((${bounds}::bigint[])[partition + 1], 0)
       ) AS first_kept
FROM journal{where}{glue}entity = 'thing' AND id > ${last}
GROUP BY id ORDER BY id LIMIT ${limit}
"""
ANCHORS = """
SELECT DISTINCT ON (id) id, revision, hash FROM journal_retention
WHERE entity = 'thing' AND id = any($1::text[]) ORDER BY id, revision DESC
"""
SNAPSHOT = """
SELECT revision, created, modified, doc::text AS doc FROM snapshots
WHERE entity = 'thing' AND id = $1 AND revision <= $2 ORDER BY revision DESC LIMIT 1
"""
WRITE_SNAPSHOT = """
INSERT INTO snapshots (entity, id, revision, created, modified, doc, partition)
VALUES ('thing', $1, $2, $3, $4, $5::text::jsonb, $6) ON CONFLICT DO NOTHING
"""
KEPT_SNAPSHOT = """
SELECT created, modified, doc::text AS doc FROM snapshots WHERE entity = 'thing' AND id = $1 AND revision = $2
"""
DELETE_EVENTS = """
DELETE FROM journal j USING unnest($1::text[], $2::bigint[]) AS c(id, cut)
WHERE j.entity = 'thing' AND j.id = c.id AND j.revision <= c.cut
"""
DELETE_SNAPSHOTS = """
DELETE FROM snapshots s USING unnest($1::text[], $2::bigint[]) AS c(id, cut)
WHERE s.entity = 'thing' AND s.id = c.id AND s.revision < c.cut
"""
INSERT_ANCHORS = """
INSERT INTO journal_retention (entity, id, revision, hash, ts, snapshot_hash, cleanup_id, seq)
SELECT 'thing', a.id, a.revision, a.hash, a.ts, a.snapshot_hash, $7, a.seq
FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::timestamptz[], $5::bytea[], $6::bigint[])
    AS a(id, revision, hash, ts, snapshot_hash, seq)
"""
START_RUN = """
INSERT INTO journal_cleanups (cutoff, checkpoint_id, journal_position, partition_bounds, scope, run_by,
                              digest)
VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7) RETURNING id
"""
UPDATE_RUN = """
UPDATE journal_cleanups SET entities = $2, events = $3, snapshots = $4, digest = $5, signature = $6,
    key_id = $7 WHERE id = $1
"""
FINISH_RUN = "UPDATE journal_cleanups SET finished = now() WHERE id = $1"


class CleanupBusy(Exception):
    """Another cleanup holds the retention lock."""


@dataclass(frozen=True)
class Skipped:
    """A thing whose old events were left in place, and why."""

    id: str
    reason: str

    def __str__(self) -> str:
        return f"thing {self.id}: {self.reason}"


@dataclass
class CleanupReport:
    cutoff: datetime
    dry_run: bool = False
    cleanup_id: int | None = None  # the run's record (none for a dry run or when nothing could run)
    checkpoint_id: int | None = None
    # Per partition, the highest seq that may be removed (sealed by the checkpoint and published).
    bounds: Vector = field(default_factory=dict)
    # The checkpoint predates partitions: its journal position was mapped to partition heads.
    legacy_checkpoint: bool = False
    reason: str | None = None  # why nothing could be removed at all
    examined: int = 0  # things looked at
    entities: int = 0  # things whose oldest events were (or, dry, would be) removed
    events: int = 0
    snapshots: int = 0  # snapshots written at the new anchors
    skipped: list[Skipped] = field(default_factory=list)
    digest: bytes = GENESIS
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "cutoff": self.cutoff.isoformat(),
            "cleanup_id": self.cleanup_id,
            "checkpoint_id": self.checkpoint_id,
            "legacy_checkpoint": self.legacy_checkpoint,
            "partition_bounds": {str(p): seq for p, seq in self.bounds.items()},
            "reason": self.reason,
            "examined": self.examined,
            "entities": self.entities,
            "events": self.events,
            "snapshots": self.snapshots,
            "skipped": [{"id": s.id, "reason": s.reason} for s in self.skipped],
            "digest": self.digest.hex(),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Cut:
    """One thing's removal: events up to ``revision`` go, the anchor keeps its hash."""

    id: str
    revision: int
    hash: bytes
    ts: datetime
    snapshot_hash: bytes = GENESIS
    events: int = 0
    wrote_snapshot: bool = False


def _scope_text(scope: Scope) -> str:
    if scope.thing is not None:
        return f"thing {scope.thing}"
    if scope.namespace is not None:
        return f"namespace {scope.namespace}"
    return "all"


async def _count_things(con: asyncpg.Connection, scope: Scope) -> int:
    """Things in scope (the projection has a row for each, deleted ones too): the progress total."""
    if scope.thing is not None:
        return int(await con.fetchval("SELECT count(*) FROM things WHERE id = $1", scope.thing))
    if scope.namespace is not None:
        query = "SELECT count(*) FROM things WHERE id >= $1 AND id < $2"
        return int(await con.fetchval(query, scope.namespace + ":", scope.namespace + ";"))
    return int(await con.fetchval("SELECT count(*) FROM things"))


def _candidates(scope: Scope) -> tuple[str, list[Any]]:
    where, args = scope.where()
    n = len(args)
    query = CANDIDATES.format(
        where=where,
        glue=" AND " if where else " WHERE ",
        cutoff=n + 1,
        bounds=n + 2,
        last=n + 3,
        limit=n + 4,
    )
    return query, args


def _cut_at(newest: int, first_kept: int | None) -> int:
    """The last revision to remove (at or below the thing's anchor: nothing).

    This is where retention is decided: the removed prefix ends before the first event that
    must stay (``first_kept``: not older than the cutoff, or beyond what the latest checkpoint
    sealed and the relay published in the thing's partition; a later event that would qualify
    on its own stays too, the chain is only ever cut at one place) and never reaches the newest
    event, the chain head.
    """
    last = newest - 1
    if first_kept is not None:
        last = min(last, first_kept - 1)
    return last


async def _plan(
    con: asyncpg.Connection,
    thing_id: str,
    partition: int,
    anchor: int,
    anchor_hash: bytes,
    cut: int,
    dry_run: bool,
) -> _Cut | str:
    """Check the chain from the anchor to the first retained event and, unless ``dry_run``,
    make sure the state at ``cut`` is kept as a snapshot; the cut, or why the thing is skipped."""
    snap = await con.fetchrow(SNAPSHOT, thing_id, cut)
    if snap is not None and snap["revision"] < anchor:
        snap = None  # below the anchor: left over, not a base
    if snap is None and anchor > 0:
        return f"no snapshot at its retention anchor (revision {anchor}): run audit verify"
    if snap is None:
        state = ThingState.absent(thing_id)
    else:
        doc = None if snap["doc"] is None else orjson.loads(snap["doc"])
        state = ThingState(
            thing_id=thing_id,
            revision=snap["revision"],
            created=snap["created"],
            modified=snap["modified"],
            doc=doc,
        )
    where = " WHERE entity = 'thing' AND id = $1 AND revision > $2 AND revision <= $3"
    previous, expected = anchor_hash, anchor + 1
    last: Row | None = None
    # Up to the first retained event: its link to the last removed one is checked too.
    async for record in con.cursor(SELECT_ROWS.format(where=where), thing_id, anchor, cut + 1):
        row = Row(*record)
        if row.revision != expected:
            return f"revision {expected} is missing: run audit verify"
        if row_hash(previous, row) != bytes(row.hash):
            return f"the hash chain breaks at revision {row.revision}: run audit verify"
        if not dry_run and state.revision < row.revision <= cut:
            state = evolve(state, event_from_row(record))
        if row.revision == cut:
            last = row
        previous, expected = bytes(row.hash), expected + 1
    if last is None or expected != cut + 2:
        return f"revision {expected} is missing: run audit verify"
    planned = _Cut(thing_id, cut, bytes(last.hash), last.ts, events=cut - anchor)
    if dry_run:
        return planned
    if state.revision != cut or state.modified is None:
        return f"the state at revision {cut} could not be rebuilt: run replay"
    if snap is None or snap["revision"] != cut:
        doc = None if state.doc is None else dumps(state.doc)
        await con.execute(WRITE_SNAPSHOT, thing_id, cut, state.created, state.modified, doc, partition)
        planned.wrote_snapshot = True
    kept = await con.fetchrow(KEPT_SNAPSHOT, thing_id, cut)
    assert kept is not None
    planned.snapshot_hash = snapshot_digest(kept["created"], kept["modified"], kept["doc"])
    return planned


async def _batch(
    con: asyncpg.Connection, report: CleanupReport, rows: list[asyncpg.Record], private: Any
) -> None:
    """One batch of things in one transaction: plan, remove, anchor, and update the run's record."""
    ids = [r["id"] for r in rows]
    anchors = {r["id"]: (int(r["revision"]), bytes(r["hash"])) for r in await con.fetch(ANCHORS, ids)}
    cuts: list[_Cut] = []
    for r in rows:
        report.examined += 1
        anchor, anchor_hash = anchors.get(r["id"], (0, GENESIS))
        if r["first"] != anchor + 1:
            where = f"its retention anchor (revision {anchor})" if anchor else "revision 1"
            reason = f"its chain starts at revision {r['first']}, not after {where}: run audit verify"
            report.skipped.append(Skipped(r["id"], reason))
            continue
        cut = _cut_at(int(r["newest"]), r["first_kept"])
        if cut <= anchor:
            continue
        planned = await _plan(con, r["id"], r["partition"], anchor, anchor_hash, cut, report.dry_run)
        if isinstance(planned, str):
            report.skipped.append(Skipped(r["id"], planned))
        else:
            cuts.append(planned)
    if not cuts:
        return
    report.entities += len(cuts)
    if report.dry_run:
        report.events += sum(c.events for c in cuts)
        return
    assert report.cleanup_id is not None
    first_seq = report.entities - len(cuts) + 1
    cut_ids, cut_revisions = [c.id for c in cuts], [c.revision for c in cuts]
    status = await con.execute(DELETE_EVENTS, cut_ids, cut_revisions)
    report.events += int(status.split()[-1])
    await con.execute(DELETE_SNAPSHOTS, cut_ids, cut_revisions)
    await con.execute(
        INSERT_ANCHORS,
        cut_ids,
        cut_revisions,
        [c.hash for c in cuts],
        [c.ts for c in cuts],
        [c.snapshot_hash for c in cuts],
        list(range(first_seq, first_seq + len(cuts))),
        report.cleanup_id,
    )
    for c in cuts:
        report.digest = fold_anchor(
            report.digest, anchor_leaf("thing", c.id, c.revision, c.hash, c.snapshot_hash)
        )
    report.snapshots += sum(c.wrote_snapshot for c in cuts)
    signature = kid = None
    if private is not None:
        message = cleanup_message(
            report.cleanup_id, report.cutoff, report.entities, report.events, report.digest
        )
        signature, kid = private.sign(message), key_id(private.public_key())
    await con.execute(
        UPDATE_RUN,
        report.cleanup_id,
        report.entities,
        report.events,
        report.snapshots,
        report.digest,
        signature,
        kid,
    )


async def cleanup_database(
    url: str,
    cutoff: datetime,
    scope: Scope | None = None,
    *,
    run_by: str,
    dry_run: bool = False,
    signing_key: str | None = None,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH,
) -> CleanupReport:
    """Remove thing events older than ``cutoff`` within ``scope`` (see the module docstring)."""
    scope = scope or Scope()
    report = CleanupReport(cutoff=cutoff, dry_run=dry_run)
    started = time.monotonic()
    key = load_signing_key(signing_key) if signing_key else None
    con = await connection.connect(url)
    try:
        if not await con.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK):
            raise CleanupBusy("another cleanup is running")
        try:
            await _run(con, report, scope, run_by, key, on_total, progress, batch_size)
        finally:
            await con.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
    finally:
        await con.close()
    report.seconds = time.monotonic() - started
    return report


class _Sealed(NamedTuple):
    bounds: Vector  # per partition, the highest seq sealed and published
    journal_position: int  # the checkpoint's (kept in the run's record for old readers)


async def _partition_bounds(con: asyncpg.Connection, report: CleanupReport, key: Any) -> _Sealed | None:
    """Per partition, the highest seq the latest checkpoint sealed and the relay published
    (``None`` with ``report.reason`` set when nothing may be removed); sets the report's
    checkpoint and bounds. ``key``: the signing key whose public half must verify the
    checkpoint (``None``: not checked)."""
    checkpoint = await con.fetchrow(LATEST_CHECKPOINT, PARTITIONED_SCHEMA)
    if checkpoint is None:
        report.reason = (
            "no audit checkpoint yet: nothing is removed before `twinstore audit checkpoint` sealed it"
        )
        return None
    report.checkpoint_id = name = int(checkpoint["id"])
    sealed: Vector | None = None
    if checkpoint["partition_heads"] is not None:
        try:
            sealed = parse_vector(checkpoint["partition_heads"])
        except ValueError:
            report.reason = f"checkpoint {name} has unreadable partition heads: run `twinstore audit verify`"
            return None
    elif not checkpoint["before_partitions"]:
        report.reason = (
            f"checkpoint {name} records no partition heads although it was made after the journal "
            "was split into partitions (by an older twinstore?): run `twinstore audit checkpoint`"
        )
        return None
    if key is not None:
        message = checkpoint_message(bytes(checkpoint["root"]), sealed, checkpoint["journal_position"])
        problem = signature_problem(
            key.public_key(), checkpoint["signature"], checkpoint["key_id"], message, f"checkpoint {name}"
        )
        if problem is not None:
            report.reason = (
                f"checkpoint {name} does not verify with audit_signing_key ({problem}): nothing is "
                "removed on its word; run `twinstore audit verify`"
            )
            return None
    if sealed is None:
        report.legacy_checkpoint = True
        rows = await con.fetch(SEALED_BY_POSITION, checkpoint["journal_position"])
        sealed = {int(r["partition"]): int(r["seq"]) for r in rows}
    published = {int(r["partition"]): int(r["seq"]) for r in await con.fetch(RELAY_CURSORS)}
    partitions = await stored_partitions(con)
    bounds = {p: min(sealed.get(p, 0), published.get(p, 0)) for p in range(partitions)}
    report.bounds = bounds
    if not any(bounds.values()):
        if not any(published.values()):
            report.reason = "the NATS relay has not published any event yet: nothing is removed before it did"
        elif not any(sealed.values()):
            report.reason = f"checkpoint {name} sealed no events"
        else:
            report.reason = (
                f"no partition has events both sealed by checkpoint {name} and published by the relay"
            )
        return None
    return _Sealed(bounds, int(checkpoint["journal_position"]))


async def _run(
    con: asyncpg.Connection,
    report: CleanupReport,
    scope: Scope,
    run_by: str,
    key: Any,
    on_total: Callable[[int], None] | None,
    progress: Callable[[int], None] | None,
    batch_size: int,
) -> None:
    if scope.entity == "policy":
        report.reason = "policy events are always kept (retention applies to thing history)"
        return
    sealed = await _partition_bounds(con, report, key)
    if sealed is None:
        return
    bounds = sealed.bounds
    report.digest = cleanup_seed(bounds)
    if on_total is not None:
        on_total(await _count_things(con, scope))
    if not report.dry_run:
        report.cleanup_id = int(
            await con.fetchval(
                START_RUN,
                report.cutoff,
                report.checkpoint_id,
                sealed.journal_position,  # for readers of the old column only: not a bound
                canonical_vector(bounds).decode(),
                _scope_text(scope),
                run_by,
                report.digest,
            )
        )
    private = None if report.dry_run else key
    # bounds[p] at index p + 1 of the array (PostgreSQL arrays start at 1).
    by_partition = [bounds[p] for p in range(len(bounds))]
    query, args = _candidates(scope)
    last_id = ""
    while True:
        async with con.transaction(readonly=report.dry_run):
            rows = await con.fetch(query, *args, report.cutoff, by_partition, last_id, batch_size)
            if rows:
                await _batch(con, report, rows, private)
        if progress is not None and rows:
            progress(len(rows))
        if len(rows) < batch_size:
            break
        last_id = rows[-1]["id"]
    if report.cleanup_id is not None:
        await con.execute(FINISH_RUN, report.cleanup_id)
