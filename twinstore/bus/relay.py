"""Relay: publish every committed journal event to NATS JetStream, exactly once in effect.

One relay per deployment is active at a time: every process runs one, and the one holding a
session-level PostgreSQL advisory lock (``RELAY_LOCK``) publishes; the others wait to take
over. The leader tails the journal by ``position`` (commit order, see the journal module) and
publishes each event as a Ditto Protocol envelope with ``Nats-Msg-Id: thing:<id>:<revision>``,
so a republish is dropped by JetStream's duplicate window (consumers also see the revision in
every envelope and ignore revisions they already have).

Pipelined while catching up: after reading a full batch (a backlog), the leader reads and
publishes the next one without waiting for the acks, with up to ``max_in_flight`` batches
awaiting theirs. When it keeps up (the last read was not full), the next read waits for the
acks of the batch out, so the commits of that time go out together: pipelining every small
batch measured slower at the fan-out of the leader's process (BENCHMARKS.md, fan-out).
Batches are settled in order, and ``position`` only moves past a batch once it and every
batch before it were fully acknowledged. When an ack fails (error or ``ack_timeout``), every
batch after that position is dropped and the leader publishes again from there (nothing is
lost; what had been stored already is deduplicated). Publishes leave in position order on
one connection, so under normal operation each partition's subject sees its events in
position order.

The cursor in ``relay_cursor`` is only a restart hint: the position up to which every event
is known to be in JetStream. It is saved at most every ``cursor_interval`` seconds, on the
lock connection, without waiting for the WAL flush (``synchronous_commit`` is off on that
connection), and when the relay stops; after a crash the next leader republishes from an
older cursor, which the duplicate window drops (so keep ``cursor_interval`` far below its 2
minutes). Before, every round waited for an fsynced cursor update.

Waking: every journal commit runs ``pg_notify('twinstore_journal')``, which the leader
listens to on its lock connection, so events committed by any process are published at once;
the local journal also calls :meth:`Relay.notify`; ``poll_interval`` is only the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats.js
import nats.js.api
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS

from twinstore.bus.envelope import event_envelope
from twinstore.bus.subjects import Subjects
from twinstore.store.journal import event_from_row

__all__ = ["POSITION_HEADER", "Relay", "ensure_events_stream", "journal_head"]

log = logging.getLogger("twinstore.relay")

RELAY_LOCK = 7_242_003
CURSOR = "events"
POSITION_HEADER = "Twinstore-Position"
JOURNAL_CHANNEL = "twinstore_journal"  # NOTIFY'd by every journal commit (see journal.APPEND)

SELECT_AFTER = """
SELECT position, id, revision, ts, action, path, value::text AS value, originator, correlation_id
FROM journal WHERE position > $1 AND entity = 'thing' ORDER BY position LIMIT $2
"""
SELECT_CURSOR = "SELECT position FROM relay_cursor WHERE name = $1"
# Positions are handed out in commit order (the journal's write lock), so every change that
# commits after this statement's snapshot gets a higher one. One backward step of an index.
SELECT_HEAD = "SELECT coalesce(max(position), 0) FROM journal"
SAVE_CURSOR = """
INSERT INTO relay_cursor (name, position) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET position = greatest(relay_cursor.position, excluded.position)
"""


async def ensure_events_stream(
    js: nats.js.JetStreamContext, subjects: Subjects, max_age_seconds: float
) -> None:
    """Create or update the events stream (file storage, dedup window 2 minutes)."""
    config = nats.js.api.StreamConfig(
        name=subjects.events_stream,
        subjects=[subjects.events_wildcard],
        storage=nats.js.api.StorageType.FILE,
        retention=nats.js.api.RetentionPolicy.LIMITS,
        max_age=max_age_seconds,
        duplicate_window=120.0,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)


async def journal_head(pool: asyncpg.Pool) -> int:
    """The journal's highest committed position (0 when it is empty)."""
    async with pool.acquire() as con:
        return int(await con.fetchval(SELECT_HEAD))


class AckFailedError(Exception):
    """A published batch was not fully acknowledged by JetStream."""


@dataclass
class _Batch:
    """A published batch awaiting its acks: ``acks`` resolves once every message is acked."""

    first: int
    last: int
    count: int
    acks: asyncio.Future[None]


class Relay:
    """Publishes the journal to JetStream while it holds the relay lock."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NATS,
        subjects: Subjects,
        *,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        poll_interval: float = 0.2,
        batch: int = 1000,
        max_in_flight: int = 8,
        ack_timeout: float = 30.0,
        cursor_interval: float = 0.2,
        retry_delay: float = 0.5,
    ) -> None:
        self.pool = pool
        # The leader lock is a session lock: it lives on a connection of its own, never on a
        # pooled one (pooled connections are not reset on release).
        self.connect = connect
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.poll_interval = poll_interval
        self.batch = batch
        self.max_in_flight = max(1, max_in_flight)
        self.ack_timeout = ack_timeout
        self.cursor_interval = cursor_interval
        self.retry_delay = retry_delay
        # Set by notify() and by every batch whose acks are settled: the leader has work.
        self._signal = asyncio.Event()
        self._commits = True  # a commit may be unpublished: read the journal
        self._con_lock = asyncio.Lock()  # the lead loop and the watchdog share the lock connection
        self._task: asyncio.Task[None] | None = None
        self.is_leader = False
        self.published = 0  # events whose batch was fully acknowledged
        self.position = 0  # every event at or below it is acknowledged by JetStream
        self.saved = 0  # the position last written to relay_cursor
        self.republishes = 0  # how often an ack failure sent the leader back to ``position``

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="twinstore-relay")

    async def stop(self) -> None:
        """Stop, and save the cursor if it moved since it was last saved."""
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self.position > self.saved:
            with contextlib.suppress(Exception):
                async with self.pool.acquire(timeout=2) as con:
                    await con.execute(SAVE_CURSOR, CURSOR, self.position, timeout=2)
                self.saved = self.position

    def notify(self) -> None:
        """Called after a local commit: publish without waiting for the next poll."""
        self._commits = True
        self._signal.set()

    async def _run(self) -> None:
        while True:
            try:
                lock_con = await self.connect()
                try:
                    while not await lock_con.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):
                        await asyncio.sleep(max(self.poll_interval, 1.0))
                    # The cursor is a restart hint (see the module): no wait for the WAL flush.
                    await lock_con.execute("SET synchronous_commit = off")
                    # Commits of every process notify; the local journal also calls notify().
                    await lock_con.add_listener(JOURNAL_CHANNEL, self._on_journal)
                    self.is_leader = True
                    log.info("relay is leader")
                    # Leading ends when the lock connection dies (another process takes over).
                    lead = asyncio.create_task(self._lead(lock_con))
                    watch = asyncio.create_task(self._watch(lock_con))
                    try:
                        done, _ = await asyncio.wait({lead, watch}, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()
                    finally:
                        for task in (lead, watch):
                            task.cancel()
                        await asyncio.gather(lead, watch, return_exceptions=True)
                finally:
                    self.is_leader = False
                    with contextlib.suppress(Exception):
                        await lock_con.close(timeout=2)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("relay failed; retrying")
                await asyncio.sleep(1.0)

    def _on_journal(self, *_: object) -> None:
        self.notify()

    async def _watch(self, lock_con: asyncpg.Connection) -> None:
        """Return when the connection holding the leader lock is lost."""
        while not lock_con.is_closed():
            await asyncio.sleep(1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                async with self._con_lock:
                    await lock_con.fetchval("SELECT 1", timeout=5)

    async def _lead(self, con: asyncpg.Connection) -> None:
        """Read, publish and settle batches while leading (see the module on pipelining)."""
        loop = asyncio.get_running_loop()
        async with self._con_lock:
            cursor = int(await con.fetchval(SELECT_CURSOR, CURSOR) or 0)
        # What this relay saw acknowledged itself is as good as the cursor (both are in JetStream).
        self.position = max(self.position, cursor)
        self.saved = max(self.saved, cursor)
        sent = self.position  # the last position published (acknowledged or not)
        in_flight: deque[_Batch] = deque()
        backlog = True  # the last read was a full batch, or none was made yet
        poll_at = loop.time()
        save_at = loop.time() + self.cursor_interval
        try:
            while True:
                self._signal.clear()  # a notify or an ack from here on wakes the wait below
                try:
                    self._settle(in_flight)
                except AckFailedError as exc:
                    log.warning("relay: %s; publishing again after position %d", exc, self.position)
                    self.republishes += 1
                    self._abandon(in_flight)
                    sent = self.position
                    backlog = True
                    await asyncio.sleep(self.retry_delay)
                    continue
                now = loop.time()
                if self.position > self.saved and now >= save_at:
                    position = self.position
                    async with self._con_lock:
                        await con.execute(SAVE_CURSOR, CURSOR, position)
                    self.saved = max(self.saved, position)
                    save_at = now + self.cursor_interval
                # Several batches in flight only while catching up (the last read was full); when
                # keeping up, the next read waits for the acks, gathering the commits meanwhile
                # (pipelining then measured slower at the fan-out, see BENCHMARKS.md).
                free = len(in_flight) < (self.max_in_flight if backlog else 1)
                if free and (backlog or self._commits or now >= poll_at):
                    self._commits = False  # before reading: a commit after this point reads again
                    rows = await self._read(sent)
                    poll_at = loop.time() + self.poll_interval
                    backlog = len(rows) == self.batch
                    if rows:
                        in_flight.append(await self._publish(rows))
                        sent = rows[-1]["position"]
                    continue
                waits = [poll_at - now] if free else []
                if self.position > self.saved:
                    waits.append(save_at - now)
                timeout = max(0.0, min(waits)) if waits else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._signal.wait(), timeout)
        finally:
            self._abandon(in_flight)

    async def _read(self, after: int) -> list[asyncpg.Record]:
        async with self.pool.acquire() as pooled:
            return list(await pooled.fetch(SELECT_AFTER, after, self.batch))

    def _settle(self, in_flight: deque[_Batch]) -> None:
        """Move ``position`` past the leading batches whose acks all arrived."""
        while in_flight and in_flight[0].acks.done():
            batch = in_flight.popleft()
            exc = None if batch.acks.cancelled() else batch.acks.exception()
            if batch.acks.cancelled() or exc is not None:
                in_flight.appendleft(batch)  # dropped by the caller with the rest
                raise AckFailedError(f"batch {batch.first}..{batch.last} not acknowledged: {exc!r}")
            self.position = max(self.position, batch.last)
            self.published += batch.count

    def _abandon(self, in_flight: deque[_Batch]) -> None:
        for batch in in_flight:
            if not batch.acks.done():
                batch.acks.cancel()
        in_flight.clear()

    async def _publish(self, rows: list[asyncpg.Record]) -> _Batch:
        """Publish ``rows`` (in order) without waiting for the acks."""
        futures: list[asyncio.Future[Any]] = []
        for row in rows:
            event = event_from_row(row)
            headers = {
                "Nats-Msg-Id": f"thing:{event.thing_id}:{event.revision}",
                POSITION_HEADER: str(row["position"]),
                "Ditto-Thing-Id": event.thing_id,
            }
            futures.append(
                await self.js.publish_async(
                    self.subjects.event_subject(event.thing_id),
                    orjson.dumps(event_envelope(event)),
                    headers=headers,
                )
            )
        return _Batch(rows[0]["position"], rows[-1]["position"], len(rows), self._all_acked(futures))

    def _all_acked(self, futures: list[asyncio.Future[Any]]) -> asyncio.Future[None]:
        """One future for a batch's acks: done when all arrived, failed on the first failure or
        after ``ack_timeout``; cancelling it (or its failure) cancels the acks still awaited."""
        loop = asyncio.get_running_loop()
        acks: asyncio.Future[None] = loop.create_future()
        remaining = len(futures)

        def on_ack(future: asyncio.Future[Any]) -> None:
            nonlocal remaining
            exc = asyncio.CancelledError() if future.cancelled() else future.exception()
            if acks.done():
                return
            if exc is not None:
                acks.set_exception(AckFailedError(repr(exc)))
                return
            remaining -= 1
            if remaining == 0:
                acks.set_result(None)

        def timed_out() -> None:
            if not acks.done():
                acks.set_exception(AckFailedError(f"no ack within {self.ack_timeout} s"))

        def finished(_: asyncio.Future[None]) -> None:
            timer.cancel()
            for future in futures:  # frees nats-py's pending-ack slots of the lost ones
                if not future.done():
                    future.cancel()
            if not acks.cancelled():
                acks.exception()  # retrieved: an abandoned batch's failure is not an error
            self._signal.set()

        timer = loop.call_later(self.ack_timeout, timed_out)
        for future in futures:
            future.add_done_callback(on_ack)
        acks.add_done_callback(finished)
        return acks

    async def publish_pending(self) -> int:
        """Publish one batch after ``position`` and wait for its acks (not pipelined: for a
        flush at shutdown); returns how many events were published."""
        async with self.pool.acquire() as con:
            rows = await con.fetch(SELECT_AFTER, self.position, self.batch)
        if not rows:
            return 0
        batch = await self._publish(rows)
        await batch.acks  # all or nothing: on any failure the batch is republished (dedup ids)
        self.position = max(self.position, batch.last)
        self.published += batch.count
        async with self.pool.acquire() as con:
            await con.execute(SAVE_CURSOR, CURSOR, self.position)
        self.saved = max(self.saved, self.position)
        return len(rows)
