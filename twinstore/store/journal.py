"""The journal of thing events, the projection of current state, snapshots, group commit.

Writes from any number of concurrent requests are queued and committed together: one
transaction, one fsync, two statements for a whole batch (group commit):

1. ``twinstore_lock_and_heads(partitions, ids)`` locks the batch's journal partitions (see
   :mod:`twinstore.store.recorder`: a lock per partition, in ascending order) and returns the
   revision and chain head of the batch's things;
2. the recorder's append inserts the events with their partition positions, and upserts the
   projection rows and due snapshots in the same statement.

The partition locks do two jobs:

* the heads each batch is checked against are read *after* the locks, so they are the latest
  committed ones: many processes may write the same thing and no update is lost, revisions
  stay gapless (the journal's primary key ``(entity, id, revision)`` guards it once more);
* each partition's ``seq`` is handed out in commit order, so a relay tailing a partition can
  never skip a row that commits late.

Requests are queued by partition. Each transaction commits the queued requests of one
partition (a single-shard transaction on a database distributed by partition); ``writers``
commit loops run one each, so writes in different partitions commit in parallel, on several
connections of one process and across processes. A process commits one batch of a partition at
a time, so one thing's writes stay in order. The one exception: a unit given to
:meth:`Journal.write_unit` with things of several partitions is committed in one transaction
that locks them all (ingestion never does this: its units follow the same partitions).

Decisions are made before the lock from a per-process cache and only verified under it (see
``_transaction``), so the critical section is the two statements and the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import asyncpg
import msgspec
import orjson

from twinstore.histogram import BATCH_BUCKETS, SECONDS_BUCKETS, Histogram
from twinstore.model import etag
from twinstore.model.errors import (
    ConflictError,
    DittoError,
    HeaderInvalidError,
    HeadersTooLargeError,
    InvalidInputError,
    JsonInvalidError,
    TooLargeError,
    UnavailableError,
    history_not_found,
)
from twinstore.model.ids import parse_pointer
from twinstore.model.patch import resized
from twinstore.model.thing import Command, Event, ThingState, decide, evolve, replay
from twinstore.store import Connection, is_unavailable
from twinstore.store.codec import GENESIS, canonical, dumps, loads, storable
from twinstore.store.recorder import Record, Recorder, append_statement, record
from twinstore.store.recorder import rows as records

__all__ = [
    "APPEND",
    "LOCK_AND_HEADS",
    "SELECT_FOR_WRITE",
    "Committed",
    "FencedError",
    "Journal",
    "Mark",
    "WriteRequest",
]

log = logging.getLogger("twinstore.store")

ENTITY = "thing"

# Locks the batch's partitions, then reads revision and chain head of its things (one round
# trip; see schema migration 16). Documents are read only for things the cache does not hold.
LOCK_AND_HEADS = "SELECT id, revision, hash FROM twinstore_lock_and_heads($1::int[], $2::text[])"
SELECT_FOR_WRITE = """
SELECT id, revision, created, modified, doc, hash FROM things
WHERE id = any($1::text[]) AND partition = any($2::int[])
"""
# Before the lock: the heads of a batch's things, with the document only where this process's
# cached revision ($2, NULL if none) is not the stored one (a miss, or another process wrote);
# $3: their partitions (part of the key, see migration 17).
PREFETCH = """
SELECT t.id, t.revision, t.created, t.modified, t.hash,
       CASE WHEN c.revision IS DISTINCT FROM t.revision THEN t.doc END AS doc
FROM unnest($1::text[], $2::bigint[]) AS c(id, revision)
JOIN things t ON t.id = c.id AND t.partition = any($3::int[])
"""
# Prefetch while more than this share of a batch's things were found stale (moving average):
# a process that is the only writer of its things skips the extra round trip.
PREFETCH_STALE_RATE = 0.02

# Projection rows and due snapshots of a batch, appended with its events in one statement (one
# round trip, see Recorder.append), each set as one JSON array parameter: one orjson call per
# set instead of asyncpg encoding every element of many arrays. Every row names its partition
# (the thing's), part of each table's key: see schema migration 17.
PROJECT = """
projected AS (
    INSERT INTO things (partition, id, revision, created, modified, policy_id, doc, hash)
    SELECT p.partition, p.id, p.revision, p.created, p.modified, p.doc ->> 'policyId', p.doc,
           decode(p.hash, 'hex')
    FROM jsonb_to_recordset($2::text::jsonb) AS p(partition int, id text, revision bigint,
        created timestamptz, modified timestamptz, doc jsonb, hash text)
    ON CONFLICT (id, partition) DO UPDATE SET revision = excluded.revision, created = excluded.created,
        modified = excluded.modified, policy_id = excluded.policy_id, doc = excluded.doc,
        hash = excluded.hash
)"""
SNAPSHOT = """
snapshotted AS (
    INSERT INTO snapshots (partition, entity, id, revision, created, modified, doc)
    SELECT s.partition, 'thing', s.id, s.revision, s.created, s.modified, s.doc
    FROM jsonb_to_recordset($3::text::jsonb) AS s(partition int, id text, revision bigint,
        created timestamptz, modified timestamptz, doc jsonb)
    ON CONFLICT DO NOTHING
)"""
APPEND = append_statement(PROJECT, SNAPSHOT)

# A unit's progress mark (ingestion): the partition's stream sequence moves only from the value
# its writer last saw (a fence: a second writer of the partition fails instead of applying
# twice), each source's sequence only grows. Rows are in the mark's partition (the unit's).
MARK = """
WITH moved AS (
    UPDATE ingest_progress p SET seq = m.seq, updated = now()
    FROM json_to_recordset($1::text::json) AS m(partition int, consumer text, expected bigint, seq bigint)
    WHERE p.consumer = m.consumer AND p.source = '' AND p.partition = m.partition AND p.seq = m.expected
    RETURNING p.consumer
), sourced AS (
    INSERT INTO ingest_progress (partition, consumer, source, seq)
    SELECT s.partition, s.consumer, s.source, s.seq
    FROM json_to_recordset($2::text::json) AS s(partition int, consumer text, source text, seq bigint)
    ON CONFLICT (consumer, source, partition) DO UPDATE
        SET seq = greatest(ingest_progress.seq, excluded.seq), updated = now()
)
SELECT consumer FROM moved
"""

# Reads name the partition of what they read (the last parameter) besides its id: on one
# database a condition more on the key's index; on a database distributed by partition (README,
# "Running on Citus") what routes the read to the one shard that holds the row.
SELECT_THING = "SELECT revision, created, modified, doc FROM things WHERE id = $1 AND partition = $2"
SELECT_THINGS = """
SELECT id, revision, created, modified, doc FROM things
WHERE id = any($1::text[]) AND partition = any($2::int[])
"""

SELECT_ALL = """
SELECT id, revision, created, modified, doc FROM things WHERE doc IS NOT NULL ORDER BY id LIMIT $1
"""

SELECT_SNAPSHOT = """
SELECT revision, created, modified, doc FROM snapshots
WHERE entity = 'thing' AND id = $1 AND revision <= $2 AND partition = $3 ORDER BY revision DESC LIMIT 1
"""

SELECT_EVENTS = """
SELECT id, revision, ts, action, path, value::text AS value, originator, correlation_id, headers
FROM journal WHERE entity = 'thing' AND id = $1 AND revision > $2 AND revision <= $3 AND partition = $4
ORDER BY revision
"""

SELECT_EVENTS_PAGE = """
SELECT id, revision, ts, action, path, value::text AS value, originator, correlation_id, headers
FROM journal WHERE entity = 'thing' AND id = $1 AND revision > $2 AND revision <= $3 AND partition = $5
ORDER BY revision LIMIT $4
"""

SELECT_EVENT = """
SELECT id, revision, ts, action, path, value::text AS value, originator, correlation_id, headers
FROM journal WHERE entity = 'thing' AND id = $1 AND revision = $2 AND partition = $3
"""

# The last revision at or before a time: one descent of the index journal_ts (entity, id, ts,
# revision), index only, however long the history. A thing's event times grow with its revisions
# (each is stamped when decided, one after the other; clock skew between processes aside), so the
# latest time at or before ``ts`` is the last revision; on equal times the higher revision wins.
SELECT_REVISION_AT = """
SELECT revision FROM journal WHERE entity = 'thing' AND id = $1 AND ts <= $2
ORDER BY ts DESC, revision DESC LIMIT 1
"""
# After a snapshot, the first event left (to tell a revision removed by retention from one
# beyond the newest).
SELECT_FIRST_REVISION = """
SELECT min(revision) FROM journal WHERE entity = 'thing' AND id = $1 AND partition = $2
"""
SELECT_NEXT_REVISION = """
SELECT min(revision) FROM journal WHERE entity = 'thing' AND id = $1 AND revision > $2 AND partition = $3
"""
# The deletions of the whole thing (path "/", or "//": empty segments are ignored), which end its
# lives: partial index journal_thing_deletions (migration 13), however long the history.
SELECT_DELETIONS = """
SELECT revision, position FROM journal
WHERE entity = 'thing' AND id = $1 AND action = 'deleted' AND path ~ '^/*$'
ORDER BY revision
"""


class Guard(Protocol):
    """A writer's permissions (see :class:`twinstore.enforcement.ThingGuard`)."""

    def __call__(self, before: ThingState, command: Command) -> None:
        """Refuse (raise a DittoError) the command on ``before``."""

    def readable(self, parts: list[str]) -> bool:
        """May the writer read all of the value at ``parts``?"""

    def visible(self, parts: list[str], value: Any) -> Any:
        """The part of ``value`` at ``parts`` the writer may read (``patch.MISSING``: none)."""


class WriteRequest(msgspec.Struct, kw_only=True):
    """A command for one thing with its preconditions and who sent it."""

    thing_id: str
    command: Command
    originator: str
    correlation_id: str | None = None
    if_match: list[str] | None = None
    if_none_match: list[str] | None = None
    # Authorization, run on the exact state the write is decided on (before preconditions, so
    # a 412 never tells an unauthorised caller anything); raises a DittoError to refuse. It also
    # bounds what the write reads: a JSON patch's from/test and the entity tags compared.
    guard: Guard | None = None
    # Kept with the event and hashed with it (see Event.headers).
    headers: dict[str, str] | None = None


class Mark(msgspec.Struct, frozen=True, kw_only=True):
    """Progress committed in the same transaction as a unit's events (ingestion: exactly once).

    ``consumer``'s stream sequence moves from ``expected`` to ``seq`` (or the unit fails with
    :class:`FencedError` and nothing of it is written); ``sources`` raise each source's last
    applied sequence.
    """

    consumer: str
    partition: int  # the consumer's partition: the unit's things are all in it
    expected: int
    seq: int
    sources: dict[str, int] = msgspec.field(default_factory=dict)


class FencedError(ConflictError):
    """A unit's mark did not find the progress it expected: another writer moved it."""


class Committed(msgspec.Struct, kw_only=True):
    """The outcome of a write: its event and the state before and after."""

    event: Event
    before: ThingState
    after: ThingState
    guard: Guard | None = None

    def tag(self, parts: list[str]) -> str | None:
        """The entity tag of the resource at ``parts`` after the write, as the writer may read it."""
        return etag.resource_tag(
            self.after.doc, self.after.revision, parts, None if self.guard is None else self.guard.visible
        )


@dataclass
class _Plan:
    """One thing's part of a batch: the state it was decided from and what it produced."""

    start: ThingState
    start_head: bytes
    outcomes: list[tuple[int, Committed | DittoError]]
    rows: list[_Row]
    final: ThingState
    head: bytes
    size: int | None = None  # of final.doc (compact JSON), when known


class _Row(NamedTuple):
    event: Event
    record: Record
    after: ThingState


Outcome = Committed | DittoError


@dataclass
class _Pending:
    """A unit: requests committed in one transaction (with its mark), one outcome each."""

    requests: list[WriteRequest]
    mark: Mark | None = None
    future: asyncio.Future[list[Outcome]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # Requests left out of the transaction, by index, with their outcome: refused because the
    # database refused their rows (see Journal._isolate), or, in a trial, not part of it.
    refused: dict[int, DittoError] = field(default_factory=dict)


class _Rollback(Exception):
    """Ends a trial transaction (Journal._trial) after its statements ran: nothing is kept."""


class _Drop(Exception):
    """Roll back and commit the batch again without ``pending``, which fails with ``error``."""

    def __init__(self, pending: _Pending, error: DittoError) -> None:
        self.pending = pending
        self.error = error


def event_from_row(row: asyncpg.Record) -> Event:
    """A journal row as an :class:`Event` (value decoded from its stored canonical text)."""
    value = row["value"]
    return Event(
        thing_id=row["id"],
        revision=row["revision"],
        timestamp=row["ts"],
        action=row["action"],
        path=row["path"],
        value=None if value is None else loads(value),
        originator=row["originator"],
        correlation_id=row["correlation_id"],
        headers=_headers(row.get("headers")),
    )


def _headers(value: Any) -> dict[str, str] | None:
    """An event's kept headers (jsonb: decoded by the pool's codec, text on a plain connection)."""
    decoded = loads(value) if isinstance(value, str) else value
    return decoded if isinstance(decoded, dict) else None


def _state(thing_id: str, row: asyncpg.Record | None) -> ThingState:
    if row is None:
        return ThingState.absent(thing_id)
    return ThingState(
        thing_id=thing_id,
        revision=row["revision"],
        created=row["created"],
        modified=row["modified"],
        doc=row["doc"],
    )


def refusal(exc: BaseException) -> DittoError:
    """The 4xx of a write whose own input failed its transaction (no driver text in it)."""
    if isinstance(exc, DittoError):
        return exc
    if isinstance(exc, asyncpg.ProgramLimitExceededError):  # e.g. "index row size exceeds maximum"
        return TooLargeError(
            "A value of this write is too large for the database to store or index (e.g. a long "
            "string at a path in search_indexes).",
            description="Write smaller values.",
        )
    if isinstance(exc, (asyncpg.DataError, RecursionError, TypeError, ValueError)):
        return JsonInvalidError(
            "A value of this write cannot be stored (e.g. nested too deeply, a number out of range "
            "or a character the database refuses)."
        )
    return InvalidInputError("This write cannot be stored; the database refused it.")


class Journal:
    """Event store for things: group-committed writes and immediately consistent reads."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        snapshot_every: int = 100,
        max_batch: int = 512,
        max_thing_bytes: int = 102_400,
        max_patch_ops: int = 100,
        max_header_bytes: int = 8192,
        on_commit: Callable[[list[Event]], None] | None = None,
        writers: int = 2,
        cache_size: int = 10_000,
        recorder: Recorder,
        group_size: int = 1,
    ) -> None:
        self.pool = pool
        self.recorder = recorder
        self.snapshot_every = snapshot_every
        self.max_batch = max_batch
        self.max_thing_bytes = max_thing_bytes
        self.max_patch_ops = max_patch_ops
        # An event's value and path together take at most max_thing_bytes, its originator,
        # correlation-id and kept headers at most max_header_bytes (JSON): so its envelope fits
        # NATS' max_payload (Runtime checks the sum at start) and the relay can publish it.
        self.max_header_bytes = max_header_bytes
        self.isolated = 0  # writes refused because the database refused their rows (isolated)
        self.on_commit = on_commit
        # ``writers`` commit loops, each committing one partition's queued requests at a time
        # (see the module): up to ``writers`` transactions in flight, on as many connections.
        self.writers = writers
        # Queued by group of ``group_size`` consecutive partitions (partition // group_size): a
        # transaction commits the queued writes of one group. 1: one partition per transaction
        # (single-shard); more: bigger group commits, more overlap between processes.
        self.group_size = max(1, group_size)
        self._pending: dict[int, deque[_Pending]] = {}  # group -> its queued units
        self._ready: asyncio.Queue[int] = asyncio.Queue()  # groups with units, none committing
        self._scheduled: set[int] = set()  # groups in _ready or being committed
        # The last batch's things and an event set once its plans are in the cache (_transaction).
        self._planned: tuple[frozenset[str], asyncio.Event] = (frozenset(), asyncio.Event())
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        # Last known (state, chain head) of things this process wrote: plans are made from it
        # and checked against the heads under the lock (never trusted without that check).
        self.cache_size = cache_size
        # The third member is the document's compact-JSON size (None: not known yet), kept so a
        # write's size check costs the changed member, not an encoding of the whole document.
        self._cache: OrderedDict[str, tuple[ThingState, bytes, int | None]] = OrderedDict()
        self.replans = 0
        self.prefetches = 0  # things planned before the lock from a fresh read (PREFETCH)
        self._stale_rate = 0.0  # moving average of the share of a batch's things found stale
        # Reads queue here first, in arrival order: asyncpg's pool hands a released connection
        # to whichever acquire runs next, which under load starves some requests (p99).
        self._readers = asyncio.Semaphore(max(1, pool.get_max_size() - writers))
        self.batches = 0
        self.events_appended = 0
        # read by /metrics: write requests per committed transaction, seconds per transaction
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.commit_seconds = Histogram(SECONDS_BUCKETS)
        # seconds per transaction waiting for its partition's lock (and reading the heads)
        self.lock_seconds = Histogram(SECONDS_BUCKETS)
        # From the partition locks granted to the commit: the serial section of a partition
        self.lock_held_seconds = Histogram(SECONDS_BUCKETS)

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"twinstore-group-commit-{i}")
                for i in range(self.writers)
            ]

    async def stop(self) -> None:
        """Commit what is queued and in flight, then stop the commit loops."""
        if not self._tasks:
            return
        while self._scheduled or self._in_flight:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # ---- writes -----------------------------------------------------------------------

    async def write(self, request: WriteRequest) -> Committed:
        """Queue one write for the next group commit and wait until it is durable."""
        (outcome,) = await self.write_unit([request])
        if isinstance(outcome, DittoError):
            raise outcome
        return outcome

    async def write_unit(self, requests: list[WriteRequest], mark: Mark | None = None) -> list[Outcome]:
        """Commit ``requests`` (in order) and ``mark`` in one transaction; an outcome per request.

        A refused request (policy, precondition, invalid) is its :class:`DittoError` and does not
        stop the others. With a ``mark``, the unit is all or nothing: a fenced mark fails it with
        :class:`FencedError`, a request that met a concurrent policy change (a
        :class:`ConflictError`) fails it with that error, and nothing of it is written.
        """
        if not self._tasks:
            raise UnavailableError("The journal is not running.")
        pending = _Pending(requests, mark)
        group = self.recorder.partition(requests[0].thing_id) // self.group_size if requests else 0
        self._pending.setdefault(group, deque()).append(pending)
        if group not in self._scheduled:
            self._scheduled.add(group)
            self._ready.put_nowait(group)
        return await pending.future

    def _take(self, group: int) -> list[_Pending]:
        """The next batch of a group of partitions: its queued units, up to max_batch requests."""
        queue = self._pending[group]
        batch = [queue.popleft()]
        size = len(batch[0].requests)
        while queue and size + len(queue[0].requests) <= self.max_batch:
            batch.append(queue.popleft())
            size += len(batch[-1].requests)
        if not queue:
            del self._pending[group]
        return batch

    async def _run(self) -> None:
        while True:
            group = await self._ready.get()
            batch = self._take(group)
            self._in_flight += 1
            try:
                await self._commit(batch)
            except Exception as exc:  # never let the loop die: fail this batch only
                if is_unavailable(exc):
                    log.warning("group commit failed: database unavailable", extra={"error": repr(exc)})
                else:
                    log.exception("group commit failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(
                            UnavailableError("The write could not be committed: the database is unreachable.")
                        )
            finally:
                self._in_flight -= 1
                # One batch of a group at a time in this process: the next one is decided on
                # this one's outcome (in the cache), its things' writes stay in order.
                if group in self._pending:
                    self._ready.put_nowait(group)
                else:
                    self._scheduled.discard(group)

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                outcomes, events = await self._transaction(batch)
                break
            except _Drop as drop:
                drop.pending.future.set_exception(drop.error)
                batch = [p for p in batch if p is not drop.pending]
                if not batch:
                    return
            except asyncpg.UniqueViolationError:
                # Only possible if a writer bypassed the partition locks; the state is re-read.
                log.warning("journal conflict, retrying batch", extra={"attempt": attempt})
                attempt += 1
                if attempt >= 3:
                    for pending in batch:
                        pending.future.set_exception(ConflictError("Concurrent writes kept conflicting."))
                    return
            except Exception as exc:
                # One member's input (a row PostgreSQL refuses, e.g. an index row too large) must
                # not fail the others: find it, refuse it alone, commit the rest.
                if is_unavailable(exc) or not await self._isolate(batch):
                    raise
        self.batches += 1
        self.events_appended += len(events)
        self.commit_seconds.observe(time.perf_counter() - started)
        self.batch_sizes.observe(sum(len(p.requests) for p in batch))
        for pending, outcome in zip(batch, outcomes, strict=True):
            if not pending.future.done():
                pending.future.set_result(outcome)
        if events and self.on_commit is not None:
            self.on_commit(events)

    async def _isolate(self, batch: list[_Pending]) -> bool:
        """Find the first request of ``batch`` whose rows make its transaction fail and mark it
        refused (a 4xx for that request alone); False when the failure does not recur.

        Trials run the same transaction on a prefix of the batch's requests and roll it back:
        a binary search over the prefix length, ~log2(n) trials, so requests keep the order
        their plans depend on (a later write of a thing builds on the earlier ones).
        """
        flat = [(p, i) for p in batch for i in range(len(p.requests)) if i not in p.refused]
        if not flat:
            return False
        low, high = 1, len(flat)  # the shortest failing prefix is in low..high
        error: BaseException | None = None
        while low < high:
            middle = (low + high) // 2
            found = await self._trial(batch, flat[:middle])
            if found is None:
                low = middle + 1
            else:
                high, error = middle, found
        if error is None:  # every shorter prefix passed: does the whole batch still fail?
            error = await self._trial(batch, flat)
            if error is None:
                return False
        pending, index = flat[high - 1]
        pending.refused[index] = refusal(error)
        self.isolated += 1
        log.warning(
            "write refused by the database, committing its batch without it",
            extra={"thing_id": pending.requests[index].thing_id, "error": type(error).__name__},
        )
        return True

    async def _trial(
        self, batch: list[_Pending], included: list[tuple[_Pending, int]]
    ) -> BaseException | None:
        """Run ``batch``'s transaction with only ``included`` requests (no marks), rolled back:
        the error it fails with, or None. An unavailable database ends the isolation."""
        keep: dict[int, set[int]] = {}
        for pending, index in included:
            keep.setdefault(id(pending), set()).add(index)
        out: DittoError = ConflictError("not in this trial")
        trial = [
            _Pending(
                p.requests,
                refused={i: out for i in range(len(p.requests)) if i not in keep.get(id(p), ())},
            )
            for p in batch
        ]
        try:
            await self._transaction(trial, rollback=True)
        except (_Rollback, _Drop):
            return None
        except Exception as exc:
            if is_unavailable(exc):
                raise
            return exc
        return None

    def _plan(
        self, state: ThingState, head: bytes, items: list[tuple[int, WriteRequest]], size: int | None = None
    ) -> _Plan:
        """Decide one thing's writes of a batch in order, from ``state`` (pure, no I/O);
        ``size``: that of ``state.doc`` if known."""
        plan = _Plan(start=state, start_head=head, outcomes=[], rows=[], final=state, head=head, size=size)
        partition = self.recorder.partition(state.thing_id)
        for index, req in items:
            before = plan.final
            try:
                event, after, after_size = self._decide(before, req, plan.size)
                value = None if event.action == "deleted" else storable(canonical(event.value))
                self._check_event(event, value)
            except DittoError as exc:
                plan.outcomes.append((index, exc))
                continue
            except Exception as exc:  # e.g. a recursion limit: this write's input, not the batch's
                log.warning("write refused while deciding it", extra={"error": repr(exc)[:200]})
                plan.outcomes.append((index, refusal(exc)))
                continue
            row = record(
                plan.head,
                partition,
                ENTITY,
                event.thing_id,
                event.revision,
                event.timestamp,
                event.action,
                event.path,
                value,
                event.originator,
                event.correlation_id,
                event.headers,
            )
            plan.head = row.hash
            plan.final = after
            plan.size = after_size
            plan.rows.append(_Row(event, row, after))
            plan.outcomes.append((index, Committed(event=event, before=before, after=after, guard=req.guard)))
        return plan

    def _check_event(self, event: Event, value: bytes | None) -> None:
        """Refuse an event whose envelope could exceed what the bus carries (see __init__)."""
        size = len(value or b"") + 6 * len(event.path) + 2  # JSON escapes: at most 6 bytes a character
        if size > self.max_thing_bytes:
            size = len(value or b"") + len(canonical(event.path))
        if size > self.max_thing_bytes:
            raise TooLargeError(
                f"The change (its value and path) has {size} bytes; at most {self.max_thing_bytes} "
                "bytes are allowed."
            )
        raw = len(event.correlation_id or "") + len(event.originator)
        if event.headers:
            raw += sum(len(k) + len(v) for k, v in event.headers.items())
        if 6 * raw + 64 > self.max_header_bytes:  # JSON escapes take at most 6 bytes a character
            meta = len(canonical([event.originator, event.correlation_id, event.headers]))
            if meta > self.max_header_bytes:
                raise HeadersTooLargeError(
                    f"The write's originator, correlation-id and headers have {meta} bytes; at most "
                    f"{self.max_header_bytes} bytes are allowed."
                )

    async def _transaction(
        self, batch: list[_Pending], *, rollback: bool = False
    ) -> tuple[list[list[Outcome]], list[Event]]:
        """Plan from the cache before taking the lock; re-plan the things whose head moved.

        The decisions are made outside the critical section when the cache is right (the
        usual case: this process wrote the thing last). Under the lock only the heads
        (revision, chain hash) are read and compared; equal heads mean an identical history,
        so the plan stands. The cache is updated with each plan at once, so the other commit
        loop plans its batch on top of this one; if this batch fails, the heads will not
        match and that plan is redone.
        """
        groups: dict[str, list[tuple[int, WriteRequest]]] = {}
        owner: list[int] = []  # flat request index -> its unit in the batch
        slots: list[int] = []  # flat request index -> its index in its unit
        for unit, pending in enumerate(batch):
            for slot, request in enumerate(pending.requests):
                if slot in pending.refused:
                    continue
                groups.setdefault(request.thing_id, []).append((len(owner), request))
                owner.append(unit)
                slots.append(slot)
        marks = [(p, p.mark) for p in batch if p.mark is not None]
        # A batch that writes things of the previous one is planned after it: it builds on that
        # batch's plans (in the cache), made before its lock or, if they were wrong, under it.
        # Without this, a loop planned its next batch while the other was still correcting its
        # own, and the two went on planning on stale states (every plan made twice). Batches
        # without a thing in common do not wait (the one before the previous ran on this loop).
        (previous_ids, previous), planned = self._planned, asyncio.Event()
        self._planned = (frozenset(groups), planned)
        try:
            if not previous_ids.isdisjoint(groups):
                await previous.wait()
            return await self._planned_transaction(batch, groups, owner, slots, marks, planned, rollback)
        finally:
            planned.set()

    async def _planned_transaction(
        self,
        batch: list[_Pending],
        groups: dict[str, list[tuple[int, WriteRequest]]],
        owner: list[int],
        slots: list[int],
        marks: list[tuple[_Pending, Mark]],
        planned: asyncio.Event,
        rollback: bool = False,
    ) -> tuple[list[list[Outcome]], list[Event]]:
        plans: dict[str, _Plan] = {}
        entered: dict[str, tuple[ThingState, bytes, int | None]] = {}  # what this batch put in the cache
        for thing_id, items in groups.items():
            cached = self._cache.get(thing_id)
            if cached is not None:
                plans[thing_id] = plan = self._plan(cached[0], cached[1], items, cached[2])
                self._cache[thing_id] = entered[thing_id] = (plan.final, plan.head, plan.size)
        ids = list(groups)
        # Things not planned from the cache, or a cache that other processes' writes keep making
        # stale: read their current state first and plan before the lock, so that the lock is
        # held for a comparison of heads, not for reads and decisions.
        prefetch = len(plans) < len(ids) or self._stale_rate > PREFETCH_STALE_RATE
        if not prefetch:
            planned.set()  # the next batch may plan on these now
        stale: list[str] = []
        found_stale = 0
        try:
            async with self.pool.acquire() as con, con.transaction():
                if prefetch:
                    known = [p.start.revision if (p := plans.get(i)) else None for i in ids]
                    fetched = await con.fetch(PREFETCH, ids, known, self._partitions(ids))
                    found_stale = self._prefetched(fetched, ids, groups, plans, entered)
                    planned.set()
                locking = time.perf_counter()
                locked = await con.fetch(LOCK_AND_HEADS, self._partitions(ids), ids)
                granted = time.perf_counter()
                self.lock_seconds.observe(granted - locking)
                heads = {r["id"]: (r["revision"], bytes(r["hash"])) for r in locked}
                if marks:
                    await self._mark(con, marks)
                stale = [
                    i
                    for i in ids
                    if i not in plans
                    or (plans[i].start.revision, plans[i].start_head) != heads.get(i, (0, GENESIS))
                ]
                if stale:
                    self.replans += len(stale)
                    rows = {
                        r["id"]: r for r in await con.fetch(SELECT_FOR_WRITE, stale, self._partitions(stale))
                    }
                    for i in stale:
                        row = rows.get(i)
                        head = bytes(row["hash"]) if row is not None else GENESIS
                        plans[i] = plan = self._plan(_state(i, row), head, groups[i])
                        # at once, so the other commit loop plans its next batch on this one
                        self._cache[i] = entered[i] = (plan.final, plan.head, plan.size)
                planned.set()
                if ids:  # (a unit may carry only its progress mark)
                    self._stale_rate += 0.1 * ((found_stale + len(stale)) / len(ids) - self._stale_rate)
                self._check_units(batch, owner, plans)
                appended = [r for i in ids for r in plans[i].rows]
                if appended:
                    finals = {i: plans[i].final for i in ids if plans[i].rows}
                    await self._append(con, appended, finals, {i: plans[i].head for i in finals})
                if rollback:
                    raise _Rollback()
            self.lock_held_seconds.observe(time.perf_counter() - granted)
        except BaseException:
            for thing_id in ids:
                self._cache.pop(thing_id, None)
            raise
        for thing_id in ids:
            # The other commit loop may have planned its batch on top of this one's meanwhile
            # (its entry replaced ours in the cache): it is ahead, so it stays; putting this
            # final back would make every later plan of the thing miss and be made again under
            # the lock.
            current = self._cache.get(thing_id)
            if current is None or current is entered.get(thing_id):
                plan = plans[thing_id]
                self._cache[thing_id] = (plan.final, plan.head, plan.size)
                self._cache.move_to_end(thing_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        flat: list[Outcome] = [ConflictError("not decided")] * len(owner)
        for plan in plans.values():
            for index, outcome in plan.outcomes:
                flat[index] = outcome
        outcomes: list[list[Outcome]] = [
            [p.refused.get(i, ConflictError("not decided")) for i in range(len(p.requests))] for p in batch
        ]
        for index, unit in enumerate(owner):
            outcomes[unit][slots[index]] = flat[index]
        return outcomes, [r.event for r in appended]

    def _prefetched(
        self,
        rows: list[asyncpg.Record],
        ids: list[str],
        groups: dict[str, list[tuple[int, WriteRequest]]],
        plans: dict[str, _Plan],
        entered: dict[str, tuple[ThingState, bytes, int | None]],
    ) -> int:
        """Plan, from :data:`PREFETCH`'s ``rows``, every thing of ``ids`` whose plan is missing
        or started from another revision than the stored one; how many had a stale plan."""
        found = {r["id"]: r for r in rows}
        stale = 0
        for i in ids:
            row, plan = found.get(i), plans.get(i)
            revision = row["revision"] if row is not None else 0
            if plan is not None and plan.start.revision == revision:
                continue  # its head is compared under the lock as always
            if plan is not None:
                stale += 1
            self.prefetches += 1
            head = bytes(row["hash"]) if row is not None else GENESIS
            plans[i] = plan = self._plan(_state(i, row), head, groups[i])
            self._cache[i] = entered[i] = (plan.final, plan.head, plan.size)
        return stale

    def _partitions(self, thing_ids: list[str]) -> list[int]:
        """The partitions of ``thing_ids`` (ascending, once each): the locks of a batch."""
        return sorted({self.recorder.partition(i) for i in thing_ids})

    async def _mark(self, con: Connection, marks: list[tuple[_Pending, Mark]]) -> None:
        """Write the units' marks (under the lock); a fenced one drops its unit (rolled back)."""
        moved = await con.fetch(
            MARK,
            dumps([
                {"partition": m.partition, "consumer": m.consumer, "expected": m.expected, "seq": m.seq}
                for _, m in marks
            ]),
            dumps([
                {"partition": m.partition, "consumer": m.consumer, "source": source, "seq": seq}
                for _, m in marks
                for source, seq in m.sources.items()
            ]),
        )
        done = {r["consumer"] for r in moved}
        for pending, mark in marks:
            if mark.consumer not in done:
                raise _Drop(
                    pending,
                    FencedError(f"The progress of '{mark.consumer}' is no longer at {mark.expected}."),
                )

    @staticmethod
    def _check_units(batch: list[_Pending], owner: list[int], plans: dict[str, _Plan]) -> None:
        """A unit with a mark is all or nothing: a request that met a concurrent change (e.g. of
        its thing's policy: the caller prepares it again) drops the whole unit."""
        for plan in plans.values():
            for index, outcome in plan.outcomes:
                pending = batch[owner[index]]
                if pending.mark is not None and isinstance(outcome, ConflictError):
                    raise _Drop(pending, outcome)

    def _decide(
        self, before: ThingState, req: WriteRequest, size: int | None = None
    ) -> tuple[Event, ThingState, int | None]:
        """The event of ``req`` on ``before``, the state after it and that state's document size
        (``size``: that of ``before.doc`` if known)."""
        guard = req.guard
        if guard is not None:
            guard(before, req.command)
        if req.if_match is not None or req.if_none_match is not None:
            # The tag of what the writer may read there: a hidden part must not decide a 412.
            visible = None if guard is None else guard.visible
            parts = parse_pointer(req.command.path)
            etag.check(
                req.if_match,
                req.if_none_match,
                current_tag=etag.resource_tag(before.doc, before.revision, parts, visible),
                thing_tag=etag.resource_tag(before.doc, before.revision, []),
                read=False,
            )
        if "\x00" in req.originator or "\x00" in (req.correlation_id or ""):
            # Like a NUL in a value (storable): PostgreSQL text cannot hold it; refused per write.
            raise HeaderInvalidError("The originator and correlation-id must not contain NUL.")
        now = datetime.now(UTC)
        event = decide(
            before,
            req.command,
            now,
            originator=req.originator,
            correlation_id=req.correlation_id,
            readable=None if guard is None else guard.readable,
            max_patch_ops=self.max_patch_ops,
            max_bytes=self.max_thing_bytes,
        )
        if req.headers:
            event = msgspec.structs.replace(event, headers=req.headers)
        after = evolve(before, event)
        if after.doc is None:
            return event, after, None
        after_size = None
        if size is not None and before.doc is not None:
            after_size = resized(size, before.doc, after.doc, parse_pointer(event.path))
        if after_size is None:
            after_size = len(orjson.dumps(after.doc))
        if after_size > self.max_thing_bytes:
            raise TooLargeError(
                f"The size of the Thing with ID '{before.thing_id}' would exceed the limit of "
                f"{self.max_thing_bytes} bytes."
            )
        return event, after, after_size

    async def _append(
        self,
        con: Connection,
        rows: list[_Row],
        finals: dict[str, ThingState],
        heads: dict[str, bytes],
    ) -> None:
        every = self.snapshot_every
        partition = self.recorder.partition
        projection = [
            {
                "partition": partition(s.thing_id),
                "id": s.thing_id,
                "revision": s.revision,
                "created": s.created,
                "modified": s.modified,
                "doc": s.doc,
                "hash": heads[s.thing_id].hex(),
            }
            for s in finals.values()
        ]
        snapshots = [
            {
                "partition": partition(s.thing_id),
                "id": s.thing_id,
                "revision": s.revision,
                "created": s.created,
                "modified": s.modified,
                "doc": s.doc,
            }
            for s in (r.after for r in rows if every > 0 and r.event.revision % every == 0)
        ]
        await con.execute(APPEND, records([r.record for r in rows]), dumps(projection), dumps(snapshots))

    # ---- reads ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[Connection]:
        """A pooled connection for a read, handed out in arrival order.

        A database that cannot be reached is :class:`UnavailableError` (503), the one place
        asyncpg's connection errors are translated for reads.
        """
        try:
            async with self._readers, self.pool.acquire() as con:
                yield con
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            raise UnavailableError("The database is not reachable; retry later.") from exc

    async def peek(self, thing_id: str) -> ThingState:
        """The state this process last wrote (it may be a batch still committing), else :meth:`load`.

        Good enough to prepare a write: the write's guard checks the state it is decided on.
        """
        cached = self._cache.get(thing_id)
        return cached[0] if cached is not None else await self.load(thing_id)

    async def peek_many(self, thing_ids: list[str]) -> dict[str, ThingState]:
        """:meth:`peek` of many things (one query for those this process did not write last)."""
        states: dict[str, ThingState] = {}
        missing: list[str] = []
        for thing_id in thing_ids:
            cached = self._cache.get(thing_id)
            if cached is not None:
                states[thing_id] = cached[0]
            else:
                missing.append(thing_id)
        if missing:
            missing = list(dict.fromkeys(missing))
            loaded = await self.load_many(missing)
            for thing_id in missing:
                states[thing_id] = loaded.get(thing_id) or ThingState.absent(thing_id)
        return states

    async def load(self, thing_id: str) -> ThingState:
        """The current state (reads see every acknowledged write)."""
        async with self._reader() as con:
            row = await con.fetchrow(SELECT_THING, thing_id, self.recorder.partition(thing_id))
        return _state(thing_id, row)

    async def load_many(self, thing_ids: list[str]) -> dict[str, ThingState]:
        async with self._reader() as con:
            rows = await con.fetch(SELECT_THINGS, thing_ids, self._partitions(thing_ids))
        return {r["id"]: _state(r["id"], r) for r in rows}

    async def load_all(self, limit: int) -> list[ThingState]:
        """Existing things sorted by id, at most ``limit``."""
        async with self._reader() as con:
            rows = await con.fetch(SELECT_ALL, limit)
        return [_state(r["id"], r) for r in rows]

    async def events(
        self,
        thing_id: str,
        after_revision: int = 0,
        to_revision: int = 2**62,
        *,
        con: Connection | None = None,
    ) -> list[Event]:
        """Events of one thing with ``after_revision < revision <= to_revision``."""
        partition = self.recorder.partition(thing_id)
        if con is None:
            async with self._reader() as c:
                rows = await c.fetch(SELECT_EVENTS, thing_id, after_revision, to_revision, partition)
        else:
            rows = await con.fetch(SELECT_EVENTS, thing_id, after_revision, to_revision, partition)
        return [event_from_row(r) for r in rows]

    async def load_at(self, thing_id: str, revision: int, *, con: Connection | None = None) -> ThingState:
        """The state at ``revision``: nearest snapshot at or before it plus later events.

        The events must continue the snapshot without a gap. A gap means the revision is before
        the thing's retained history (history retention removed those events and the snapshots
        below its anchor): :func:`history_not_found`. A retention cleanup committing between
        the two reads also leaves one, so the state is read once more before giving up.
        """
        if con is None:
            async with self._reader() as c:
                return await self.load_at(thing_id, revision, con=c)
        partition = self.recorder.partition(thing_id)
        for _ in range(2):
            row = await con.fetchrow(SELECT_SNAPSHOT, thing_id, revision, partition)
            base = _state(thing_id, row)
            events = await self.events(thing_id, base.revision, revision, con=con)
            if events:
                if all(e.revision == base.revision + 1 + i for i, e in enumerate(events)):
                    return replay(base, events)
            elif base.revision >= revision:
                return base  # exactly a snapshot
            elif await con.fetchval(SELECT_NEXT_REVISION, thing_id, base.revision, partition) is None:
                return base  # nothing after it: beyond the newest event
        raise history_not_found(thing_id, revision=revision)

    async def first_revision(self, thing_id: str) -> int:
        """The oldest revision of ``thing_id`` still in the journal (above 1 after a history
        cleanup; 0: no events)."""
        async with self._reader() as con:
            first = await con.fetchval(SELECT_FIRST_REVISION, thing_id, self.recorder.partition(thing_id))
        return 0 if first is None else int(first)

    async def deletions(self, thing_id: str) -> list[tuple[int, int]]:
        """(revision, journal position) of each deletion of the whole thing, oldest first: the ends
        of its lives (a deleted id may be created again, by anyone)."""
        async with self._reader() as con:
            rows = await con.fetch(SELECT_DELETIONS, thing_id)
        return [(int(r["revision"]), int(r["position"])) for r in rows]

    async def revision_at(self, thing_id: str, ts: datetime) -> int:
        """The last revision of ``thing_id`` written at or before ``ts`` (0: none)."""
        async with self._reader() as con:
            revision = await con.fetchval(SELECT_REVISION_AT, thing_id, ts)
        return 0 if revision is None else int(revision)

    async def load_historical(self, thing_id: str, revision: int) -> tuple[ThingState, Event | None]:
        """The state at ``revision`` and the event that produced it (``None``: no such revision)."""
        async with self._reader() as con:
            row = await con.fetchrow(SELECT_EVENT, thing_id, revision, self.recorder.partition(thing_id))
            if row is None:
                return ThingState.absent(thing_id), None
            return await self.load_at(thing_id, revision, con=con), event_from_row(row)

    async def event_pages(
        self, thing_id: str, after_revision: int, to_revision: int, *, page: int = 500
    ) -> AsyncIterator[list[Event]]:
        """Events with ``after_revision < revision <= to_revision`` in revision order, ``page`` at a
        time; each page on its own pooled connection (none is held between pages)."""
        after = after_revision
        partition = self.recorder.partition(thing_id)
        while after < to_revision:
            async with self._reader() as con:
                rows = await con.fetch(SELECT_EVENTS_PAGE, thing_id, after, to_revision, page, partition)
            if not rows:
                return
            events = [event_from_row(r) for r in rows]
            yield events
            if len(rows) < page:
                return
            after = events[-1].revision
