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

Never stalled by one event: an event that cannot be published at all (its message is over the
server's ``max_payload``, it cannot be encoded, or JetStream refuses it with a 4xx such as the
stream's message size limit) is logged, counted (``skipped``, ``twinstore_relay_events_skipped``
in /metrics) and passed over; the journal keeps it. Errors that may pass (NATS unreachable, no
ack, no responders) make the batch be published again, as before.

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
from twinstore.bus.publisher import JetStreamPublisher, PublishError
from twinstore.bus.streams import ensure_stream
from twinstore.bus.subjects import Subjects
from twinstore.store.journal import event_from_row

__all__ = [
    "ENVELOPE_OVERHEAD",
    "POSITION_HEADER",
    "Relay",
    "check_event_bound",
    "ensure_events_stream",
    "journal_head",
]

log = logging.getLogger("twinstore.relay")

RELAY_LOCK = 7_242_003
CURSOR = "events"
POSITION_HEADER = "Twinstore-Position"
JOURNAL_CHANNEL = "twinstore_journal"  # NOTIFY'd by every journal commit (see journal.APPEND)
CURSOR_SAVE_SECONDS = 0.1

# An event's message beyond its value+path (<= max_thing_bytes) and originator+correlation-id+
# kept headers (<= max_header_bytes, see Journal._check_event): the topic and the NATS headers
# each carry the thing id (<= 256 characters, <= 1 KiB of UTF-8), plus the envelope's fixed keys.
ENVELOPE_OVERHEAD = 4096

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


def check_event_bound(max_payload: int, max_thing_bytes: int, max_header_bytes: int) -> None:
    """Refuse to start when an event the journal accepts might not fit the NATS server's
    ``max_payload`` (the relay would have to pass it over)."""
    need = max_thing_bytes + max_header_bytes + ENVELOPE_OVERHEAD
    if need > max_payload:
        raise RuntimeError(
            f"max_thing_bytes ({max_thing_bytes}) + max_header_bytes ({max_header_bytes}) + "
            f"{ENVELOPE_OVERHEAD} bytes of envelope = {need} bytes, more than the NATS server's "
            f"max_payload ({max_payload}): lower max_thing_bytes to at most "
            f"{max_payload - max_header_bytes - ENVELOPE_OVERHEAD} or raise the server's max_payload"
        )


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
        self.skipped = 0  # events that could never be published (see the module)
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
        sent: list[asyncpg.Record] = []
        skipped: list[tuple[asyncpg.Record, str]] = []
        publish = self.publisher.publish
        max_payload = self.nc.max_payload
        for row in rows:
            try:
                event = event_from_row(row)
                payload = orjson.dumps(event_envelope(event))
                headers = {
                    "Nats-Msg-Id": f"thing:{event.thing_id}:{event.revision}",
                    POSITION_HEADER: str(row["position"]),
                    "Ditto-Thing-Id": event.thing_id,
                }
            except Exception as exc:  # e.g. a value too deeply nested to encode (old data)
                skipped.append((row, f"cannot be encoded ({type(exc).__name__})"))
                continue
            # The server counts the header block too, and closes the connection of a client
            # that sends more than max_payload: such an event could never be published.
            size = len(payload) + _header_bytes(headers)
            if size > max_payload:
                skipped.append((row, f"{size} bytes exceed the NATS server's max_payload of {max_payload}"))
                continue
            futures.append(await publish(self.subjects.event_subject(event.thing_id), payload, headers))
            sent.append(row)
        # All or nothing for the cursor: on a failure that may pass the batch is republished
        # (dedup ids); a message JetStream refuses for itself (4xx) is passed over.
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout=30)
        finally:
            self.publisher.forget(futures)
        for row, result in zip(sent, results, strict=True):
            if isinstance(result, PublishError) and result.code is not None and 400 <= result.code < 500:
                skipped.append((row, f"refused by JetStream ({result})"))
            elif isinstance(result, BaseException):
                raise result
        for row, reason in skipped:
            log.error(
                "relay: event cannot be published, passed over (it stays in the journal)",
                extra={
                    "thing_id": row["id"],
                    "revision": row["revision"],
                    "position": row["position"],
                    "reason": reason,
                },
            )
        self.skipped += len(skipped)
        self.position = rows[-1]["position"]
        self.published += len(rows) - len(skipped)
        return len(rows)


def _header_bytes(headers: dict[str, str]) -> int:
    """Bytes of a NATS header block (``NATS/1.0\\r\\n``, ``name: value\\r\\n`` each, ``\\r\\n``)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
