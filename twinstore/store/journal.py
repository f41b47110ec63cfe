"""The journal of thing events, the projection of current state, snapshots, group commit.

Writes from any number of concurrent requests are queued and committed together: one
transaction, one fsync, one ``INSERT ... SELECT FROM unnest(...)`` for all events and one for
all projection rows (group commit). A transaction-scoped advisory lock (``WRITE_LOCK``) is
taken first in every write transaction, by every process. It does two jobs:

* the state each batch decides on is read *after* the lock, so it is the latest committed
  state: many processes may write the same thing and no update is lost, revisions stay
  gapless (the journal's primary key ``(entity, id, revision)`` guards it once more);
* ``position`` (an identity column, assigned at insert, not at commit) is handed out in
  commit order, so the relay that tails the journal by position can never skip a row that
  commits late (the ``_lock_table`` reasoning of pyeventsourcing).

The lock serialises write transactions across processes, not requests: each transaction
carries a whole batch, so throughput is bounded by batch size / commit latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

import asyncpg
import msgspec

from twinstore.model import etag
from twinstore.model import patch as jp
from twinstore.model.errors import (
    ConflictError,
    DittoError,
    TooLargeError,
    UnavailableError,
)
from twinstore.model.ids import parse_pointer
from twinstore.model.thing import Command, Event, ThingState, decide, evolve, replay
from twinstore.store import Connection
from twinstore.store.codec import GENESIS, canonical, chain_hash, dumps, loads, storable
from twinstore.store.schema import WRITE_LOCK

__all__ = ["APPEND", "LOCK_AND_READ", "WRITE_LOCK", "Committed", "Journal", "WriteRequest"]

log = logging.getLogger("twinstore.store")

ENTITY = "thing"

# Takes WRITE_LOCK, then reads the locked state (one round trip; see schema migration 2).
LOCK_AND_READ = """
SELECT id, revision, created, modified, doc, hash FROM twinstore_lock_and_read($1::text[])
"""

# Events, projection rows and due snapshots of a batch in one statement (one round trip).
APPEND = """
WITH appended AS (
    INSERT INTO journal (entity, id, revision, ts, action, path, value, originator, correlation_id, hash)
    SELECT 'thing', * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[],
                                 $6::json[], $7::text[], $8::text[], $9::bytea[])
), projected AS (
    INSERT INTO things (id, revision, created, modified, policy_id, doc, hash)
    SELECT * FROM unnest($10::text[], $11::bigint[], $12::timestamptz[], $13::timestamptz[], $14::text[],
                         $15::jsonb[], $16::bytea[])
    ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, created = excluded.created,
        modified = excluded.modified, policy_id = excluded.policy_id, doc = excluded.doc,
        hash = excluded.hash
)
INSERT INTO snapshots (entity, id, revision, created, modified, doc)
SELECT 'thing', * FROM unnest($17::text[], $18::bigint[], $19::timestamptz[], $20::timestamptz[],
                             $21::jsonb[])
ON CONFLICT DO NOTHING
"""

SELECT_THING = "SELECT revision, created, modified, doc FROM things WHERE id = $1"
SELECT_THINGS = "SELECT id, revision, created, modified, doc FROM things WHERE id = any($1::text[])"

SELECT_ALL = """
SELECT id, revision, created, modified, doc FROM things WHERE doc IS NOT NULL ORDER BY id LIMIT $1
"""

SELECT_SNAPSHOT = """
SELECT revision, created, modified, doc FROM snapshots
WHERE entity = 'thing' AND id = $1 AND revision <= $2 ORDER BY revision DESC LIMIT 1
"""

SELECT_EVENTS = """
SELECT id, revision, ts, action, path, value::text AS value, originator, correlation_id
FROM journal WHERE entity = 'thing' AND id = $1 AND revision > $2 AND revision <= $3
ORDER BY revision
"""


class WriteRequest(msgspec.Struct, kw_only=True):
    """A command for one thing with its preconditions and who sent it."""

    thing_id: str
    command: Command
    originator: str
    correlation_id: str | None = None
    if_match: list[str] | None = None
    if_none_match: list[str] | None = None


class Committed(msgspec.Struct, kw_only=True):
    """The outcome of a write: its event and the state before and after."""

    event: Event
    before: ThingState
    after: ThingState


class _Row(NamedTuple):
    event: Event
    value: bytes | None
    head: bytes
    after: ThingState


@dataclass
class _Pending:
    request: WriteRequest
    future: asyncio.Future[Committed] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


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
    )


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


class Journal:
    """Event store for things: group-committed writes and immediately consistent reads."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        snapshot_every: int = 100,
        max_batch: int = 512,
        max_thing_bytes: int = 102_400,
        on_commit: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.snapshot_every = snapshot_every
        self.max_batch = max_batch
        self.max_thing_bytes = max_thing_bytes
        self.on_commit = on_commit
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.events_appended = 0

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="twinstore-group-commit")

    async def stop(self) -> None:
        """Finish queued writes, then stop the commit loop."""
        if self._task is None:
            return
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    # ---- writes -----------------------------------------------------------------------

    async def write(self, request: WriteRequest) -> Committed:
        """Queue one write for the next group commit and wait until it is durable."""
        if self._task is None:
            raise UnavailableError("The journal is not running.")
        pending = _Pending(request)
        self._queue.put_nowait(pending)
        return await pending.future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except Exception as exc:  # never let the loop die: fail this batch only
                log.exception("group commit failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(
                            UnavailableError(f"The write could not be committed: {exc}")
                        )

    async def _commit(self, batch: list[_Pending]) -> None:
        for attempt in range(3):
            try:
                outcomes, events = await self._transaction(batch)
                break
            except asyncpg.UniqueViolationError:
                # Only possible if a writer bypassed WRITE_LOCK; the state is re-read.
                log.warning("journal conflict, retrying batch", extra={"attempt": attempt})
        else:
            for pending in batch:
                pending.future.set_exception(ConflictError("Concurrent writes kept conflicting."))
            return
        self.batches += 1
        self.events_appended += len(events)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        if events and self.on_commit is not None:
            self.on_commit(events)

    async def _transaction(
        self, batch: list[_Pending]
    ) -> tuple[list[Committed | BaseException], list[Event]]:
        ids = list({p.request.thing_id for p in batch})
        outcomes: list[Committed | BaseException] = []
        events: list[Event] = []
        rows: list[_Row] = []
        async with self.pool.acquire() as con, con.transaction():
            current = {r["id"]: r for r in await con.fetch(LOCK_AND_READ, ids)}
            states = {i: _state(i, current.get(i)) for i in ids}
            heads = {i: (current[i]["hash"] if i in current else GENESIS) for i in ids}
            for pending in batch:
                req = pending.request
                before = states[req.thing_id]
                try:
                    event, after = self._decide(before, req)
                    value = None if event.action == "deleted" else storable(canonical(event.value))
                except DittoError as exc:
                    outcomes.append(exc)
                    continue
                head = chain_hash(
                    heads[req.thing_id],
                    ENTITY,
                    event.thing_id,
                    event.revision,
                    event.timestamp,
                    event.action,
                    event.path,
                    value,
                    event.originator,
                    event.correlation_id,
                )
                heads[req.thing_id] = head
                states[req.thing_id] = after
                events.append(event)
                rows.append(_Row(event, value, head, after))
                outcomes.append(Committed(event=event, before=before, after=after))
            if events:
                await self._append(con, rows, {e.thing_id: states[e.thing_id] for e in events}, heads)
        return outcomes, events

    def _decide(self, before: ThingState, req: WriteRequest) -> tuple[Event, ThingState]:
        parts = parse_pointer(req.command.path)
        if req.if_match is not None or req.if_none_match is not None:
            target = jp.get_at(before.doc, parts) if before.doc is not None else jp.MISSING
            etag.check(
                req.if_match,
                req.if_none_match,
                current_tag=None if target is jp.MISSING else etag.etag_of(target, before.revision, parts),
                thing_tag=etag.etag_of(None, before.revision, []) if before.exists else None,
                read=False,
            )
        now = datetime.now(UTC)
        event = decide(before, req.command, now)
        event = msgspec.structs.replace(event, originator=req.originator, correlation_id=req.correlation_id)
        after = evolve(before, event)
        if after.doc is not None and len(dumps(after.doc)) > self.max_thing_bytes:
            raise TooLargeError(
                f"The size of the Thing with ID '{before.thing_id}' would exceed the limit of "
                f"{self.max_thing_bytes} bytes."
            )
        return event, after

    async def _append(
        self,
        con: Connection,
        rows: list[_Row],
        finals: dict[str, ThingState],
        heads: dict[str, bytes],
    ) -> None:
        states = list(finals.values())
        every = self.snapshot_every
        snaps = [r.after for r in rows if every > 0 and r.event.revision % every == 0]
        await con.execute(
            APPEND,
            [r.event.thing_id for r in rows],
            [r.event.revision for r in rows],
            [r.event.timestamp for r in rows],
            [r.event.action for r in rows],
            [r.event.path for r in rows],
            [None if r.value is None else r.value.decode() for r in rows],
            [r.event.originator for r in rows],
            [r.event.correlation_id for r in rows],
            [r.head for r in rows],
            [s.thing_id for s in states],
            [s.revision for s in states],
            [s.created for s in states],
            [s.modified for s in states],
            [(s.doc or {}).get("policyId") for s in states],
            [s.doc for s in states],
            [heads[s.thing_id] for s in states],
            [s.thing_id for s in snaps],
            [s.revision for s in snaps],
            [s.created for s in snaps],
            [s.modified for s in snaps],
            [s.doc for s in snaps],
        )

    # ---- reads ------------------------------------------------------------------------

    async def load(self, thing_id: str) -> ThingState:
        """The current state (reads see every acknowledged write)."""
        async with self.pool.acquire() as con:
            return _state(thing_id, await con.fetchrow(SELECT_THING, thing_id))

    async def load_many(self, thing_ids: list[str]) -> dict[str, ThingState]:
        async with self.pool.acquire() as con:
            rows = await con.fetch(SELECT_THINGS, thing_ids)
        return {r["id"]: _state(r["id"], r) for r in rows}

    async def load_all(self, limit: int) -> list[ThingState]:
        """Existing things sorted by id, at most ``limit``."""
        async with self.pool.acquire() as con:
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
        if con is None:
            async with self.pool.acquire() as c:
                rows = await c.fetch(SELECT_EVENTS, thing_id, after_revision, to_revision)
        else:
            rows = await con.fetch(SELECT_EVENTS, thing_id, after_revision, to_revision)
        return [event_from_row(r) for r in rows]

    async def load_at(self, thing_id: str, revision: int, *, con: Connection | None = None) -> ThingState:
        """The state at ``revision``: nearest snapshot at or before it plus later events."""
        if con is None:
            async with self.pool.acquire() as c:
                return await self.load_at(thing_id, revision, con=c)
        row = await con.fetchrow(SELECT_SNAPSHOT, thing_id, revision)
        base = _state(thing_id, row)
        return replay(base, await self.events(thing_id, base.revision, revision, con=con))
