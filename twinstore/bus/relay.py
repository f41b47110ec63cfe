"""Relay: publish every committed journal event to NATS JetStream, exactly once in effect.

One relay per deployment is active at a time: every process runs one, and the one holding a
session-level PostgreSQL advisory lock (``RELAY_LOCK``) publishes; the others wait to take
over. The leader tails the journal by ``position`` (commit order, see the journal module) from
a cursor kept in ``relay_cursor`` and publishes each event as a Ditto Protocol envelope with
``Nats-Msg-Id: thing:<id>:<revision>``, so a republish after a crash is dropped by JetStream.
The cursor moves only after a whole batch was acknowledged by JetStream and is saved every
``CURSOR_SAVE_SECONDS`` off the publishing path, so a crash can only cause a republish of what
was published since, which the duplicate window drops (consumers also see the revision in every
envelope and ignore revisions they already have).

Waking: every journal commit runs ``pg_notify('twinstore_journal')``, which the leader listens
to on its lock connection, so events committed by any process are published at once; the
local journal also calls :meth:`Relay.notify`; ``poll_interval`` is only the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import nats.js
import nats.js.api
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS

from twinstore.bus.envelope import event_envelope
from twinstore.bus.publisher import JetStreamPublisher
from twinstore.bus.streams import ensure_stream
from twinstore.bus.subjects import Subjects
from twinstore.store.journal import event_from_row

__all__ = ["POSITION_HEADER", "Relay", "ensure_events_stream", "journal_head"]

log = logging.getLogger("twinstore.relay")

RELAY_LOCK = 7_242_003
CURSOR = "events"
POSITION_HEADER = "Twinstore-Position"
JOURNAL_CHANNEL = "twinstore_journal"  # NOTIFY'd by every journal commit (see journal.APPEND)
CURSOR_SAVE_SECONDS = 0.1

SELECT_AFTER = """
SELECT position, id, revision, ts, action, path, value::text AS value, originator, correlation_id, headers
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
    await ensure_stream(js, subjects.events_stream, [subjects.events_wildcard], max_age_seconds)


async def journal_head(pool: asyncpg.Pool) -> int:
    """The journal's highest committed position (0 when it is empty)."""
    async with pool.acquire() as con:
        return int(await con.fetchval(SELECT_HEAD))


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
    ) -> None:
        self.pool = pool
        # The leader lock is a session lock: it lives on a connection of its own, never on a
        # pooled one (pooled connections are not reset on release).
        self.connect = connect
        self.nc = nc
        self.js = nc.jetstream()
        self.publisher = JetStreamPublisher(nc)
        self.subjects = subjects
        self.poll_interval = poll_interval
        self.batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.is_leader = False
        self.published = 0
        self.position = 0
        self._saved = 0  # the position last stored in relay_cursor

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="twinstore-relay")

    async def stop(self) -> None:
        """Publish what is committed (if leader), then stop."""
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.publisher.stop()

    def notify(self) -> None:
        """Called after a local commit: publish without waiting for the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                lock_con = await self.connect()
                try:
                    while not await lock_con.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):
                        await asyncio.sleep(max(self.poll_interval, 1.0))
                    # Commits of every process notify; the local journal also calls notify().
                    await lock_con.add_listener(JOURNAL_CHANNEL, self._on_journal)
                    self.is_leader = True
                    log.info("relay is leader")
                    # Leading ends when the lock connection dies (another process takes over).
                    lead = asyncio.create_task(self._lead())
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
        self._wake.set()

    async def _watch(self, lock_con: asyncpg.Connection) -> None:
        """Return when the connection holding the leader lock is lost."""
        while not lock_con.is_closed():
            await asyncio.sleep(1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await lock_con.fetchval("SELECT 1", timeout=5)

    async def _lead(self) -> None:
        self.position = self._saved = await self._start_position()
        saver = asyncio.create_task(self._save_cursor_loop(), name="twinstore-relay-cursor")
        try:
            while True:
                self._wake.clear()  # before reading: a commit after this point wakes the next round
                published = await self.publish_pending()
                if published < self.batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        finally:
            saver.cancel()
            await asyncio.gather(saver, return_exceptions=True)
            with contextlib.suppress(Exception):  # e.g. a lost ack: restart after what was acked
                await self.save_cursor()

    async def _save_cursor_loop(self) -> None:
        """Save the cursor every CURSOR_SAVE_SECONDS when it moved, off the publishing path (a
        commit per round would delay every event behind it); a new leader republishes at most
        that much, which JetStream's duplicate window drops."""
        while True:
            await asyncio.sleep(CURSOR_SAVE_SECONDS)
            await self.save_cursor()

    async def save_cursor(self) -> None:
        """Store the position published so far (if it moved since the last save)."""
        position = self.position
        if position != self._saved:
            async with self.pool.acquire() as con:
                await con.execute(SAVE_CURSOR, CURSOR, position)
            self._saved = position

    async def _start_position(self) -> int:
        async with self.pool.acquire() as con:
            return int(await con.fetchval(SELECT_CURSOR, CURSOR) or 0)

    async def publish_pending(self) -> int:
        """Publish one batch after the cursor; returns how many events were published."""
        async with self.pool.acquire() as con:
            rows = await con.fetch(SELECT_AFTER, self.position, self.batch)
        if not rows:
            return 0
        futures: list[asyncio.Future[Any]] = []
        publish = self.publisher.publish
        for row in rows:
            event = event_from_row(row)
            headers = {
                "Nats-Msg-Id": f"thing:{event.thing_id}:{event.revision}",
                POSITION_HEADER: str(row["position"]),
                "Ditto-Thing-Id": event.thing_id,
            }
            futures.append(
                await publish(
                    self.subjects.event_subject(event.thing_id), orjson.dumps(event_envelope(event)), headers
                )
            )
        # All or nothing for the cursor: on any failure the batch is republished (dedup ids).
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
        finally:
            self.publisher.forget(futures)
        self.position = rows[-1]["position"]
        self.published += len(rows)
        return len(rows)
