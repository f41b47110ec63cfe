"""Relay: publish every committed journal event to NATS JetStream, exactly once in effect.

The journal is split into partitions (:mod:`twinstore.store.recorder`), each ordered by its own
``seq``; the relay is too. Every process runs a relay, a member of one partition group
(:class:`~twinstore.bus.partitions.PartitionGroup`): each partition is published by the one
member holding its lock, and the partitions are spread evenly over the live members (a member
that dies loses its locks; the others take its partitions within a rebalance round).

The member tails each partition it holds by ``seq`` (commit order within the partition) from a
cursor kept in ``relay_cursors`` and publishes each event as a Ditto Protocol envelope with
``Nats-Msg-Id: thing:<id>:<revision>``, so a republish after a crash or a handover is dropped by
JetStream. One query reads every held partition's next events; they are published in order per
partition. A cursor moves only after its events were acknowledged by JetStream and is saved
every ``CURSOR_SAVE_SECONDS`` off the publishing path, so a crash can only cause a republish of
what was published since, which the duplicate window drops (consumers also see the revision in
every envelope and ignore revisions they already have). A partition is handed over only after
its round in flight ended and its cursor was saved.

Never stalled by one event: an event that cannot be published at all (its message is over the
server's ``max_payload``, it cannot be encoded, or JetStream refuses it with a 4xx such as the
stream's message size limit) is logged, counted (``skipped``, ``twinstore_relay_events_skipped``
in /metrics) and passed over; the journal keeps it. Errors that may pass (NATS unreachable, no
ack, no responders) make the round be published again, as before.

Waking: every journal commit runs ``pg_notify('twinstore_journal')``, which each relay listens
to, so events committed by any process are published at once; the local journal also calls
:meth:`Relay.notify`; ``poll_interval`` is only the fallback.

Every published event carries its partition and ``seq`` (``Twinstore-Partition``,
``Twinstore-Position``): a live subscription starts after the partitions' heads
(:func:`journal_heads`) and drops what is at or below them (:mod:`twinstore.fanout`).
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
from twinstore.bus.partitions import PartitionGroup, lock_key
from twinstore.bus.publisher import JetStreamPublisher, PublishError
from twinstore.bus.streams import ensure_stream
from twinstore.bus.subjects import Subjects
from twinstore.store.journal import event_from_row
from twinstore.store.recorder import JOURNAL_CHANNEL
from twinstore.store.schema import stored_partitions

__all__ = [
    "ENVELOPE_OVERHEAD",
    "PARTITION_HEADER",
    "POSITION_HEADER",
    "Relay",
    "check_event_bound",
    "ensure_events_stream",
    "journal_heads",
    "relay_lock_class",
]

log = logging.getLogger("twinstore.relay")

GROUP = "twinstore-relay"
CURSOR = "events"
POSITION_HEADER = "Twinstore-Position"
PARTITION_HEADER = "Twinstore-Partition"
CURSOR_SAVE_SECONDS = 0.1
# A round whose acks stop coming for this long is published again. Acks are lost with the
# connection they were due on (its server died) or with a stream leader that died before
# answering; waiting longer than a JetStream cluster's leader election would make the relay
# stall beyond it. While acks keep coming (a big round on a slow server) the round waits.
ACK_IDLE_SECONDS = 5.0
ACK_POLL_SECONDS = 0.25
# A failed round is published again after a pause that doubles from the first to the most:
# short while a stream's leader election answers 503 (it ends any moment, and every second
# waited past it is a second of stall), rare enough not to hammer a database or NATS that is down.
RETRY_FIRST_SECONDS = 0.25
RETRY_MAX_SECONDS = 1.0

# An event's message beyond its value+path (<= max_thing_bytes) and originator+correlation-id+
# kept headers (<= max_header_bytes, see Journal._check_event): the topic and the NATS headers
# each carry the thing id (<= 256 characters, <= 1 KiB of UTF-8), plus the envelope's fixed keys.
ENVELOPE_OVERHEAD = 4096

# The next events of each held partition after its cursor, in seq order per partition: one
# index range scan of journal_partition_seq each. Policies and labels are not published (their
# seqs are passed over with the next thing event, or when the round finds none).
SELECT_AFTER = """
SELECT j.partition, j.seq, j.entity, j.id, j.revision, j.ts, j.action, j.path, j.value::text AS value,
       j.originator, j.correlation_id, j.headers
FROM unnest($1::int[], $2::bigint[]) AS c(partition, seq)
CROSS JOIN LATERAL (
    SELECT * FROM journal WHERE partition = c.partition AND seq > c.seq ORDER BY seq LIMIT $3
) j
ORDER BY j.partition, j.seq
"""
SELECT_CURSOR = "SELECT seq FROM relay_cursors WHERE name = $1 AND partition = $2"
# Each partition's seq is handed out in commit order (its write lock), so every change that
# commits after this statement's snapshot gets a higher one in its partition.
SELECT_HEADS = "SELECT partition, seq FROM partition_heads"
SAVE_CURSORS = """
INSERT INTO relay_cursors (name, partition, seq)
SELECT $1, c.partition, c.seq FROM unnest($2::int[], $3::bigint[]) AS c(partition, seq)
ON CONFLICT (name, partition) DO UPDATE SET seq = greatest(relay_cursors.seq, excluded.seq)
"""


async def ensure_events_stream(
    js: nats.js.JetStreamContext, subjects: Subjects, max_age_seconds: float, replicas: int = 1
) -> None:
    """Create or update the events stream (file storage, dedup window 2 minutes)."""
    await ensure_stream(js, subjects.events_stream, [subjects.events_wildcard], max_age_seconds, replicas)


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


def relay_lock_class(subjects: Subjects) -> int:
    """The advisory-lock class of the relay group of ``subjects``' prefix: whoever holds the
    lock ``(class, partition)`` publishes that partition (see :class:`PartitionGroup`)."""
    return lock_key(_group_name(subjects))


def _group_name(subjects: Subjects) -> str:
    return f"{GROUP}:{subjects.prefix}"


async def journal_heads(pool: asyncpg.Pool) -> dict[int, int]:
    """Each partition's highest committed ``seq`` (partitions without events: 0)."""
    async with pool.acquire() as con:
        return {r["partition"]: r["seq"] for r in await con.fetch(SELECT_HEADS)}


class Relay:
    """Publishes the journal partitions this process holds to JetStream (see the module)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NATS,
        subjects: Subjects,
        *,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        poll_interval: float = 0.2,
        batch: int = 1000,
        rebalance_seconds: float = 2.0,
        group_size: int = 1,
    ) -> None:
        self.pool = pool
        # Cursors are saved by group of ``group_size`` consecutive partitions, a statement each:
        # the journal's grouping (journal_partitions_per_transaction), so that with 1 every
        # transaction of the relay, like every journal write, writes one partition.
        self.group_size = max(1, group_size)
        # Locks and LISTEN are session state: they live on connections of their own, never on
        # pooled ones (pooled connections are not reset on release).
        self.connect = connect
        self.nc = nc
        self.js = nc.jetstream()
        self.publisher = JetStreamPublisher(nc)
        self.subjects = subjects
        self.poll_interval = poll_interval
        self.batch = batch
        self.rebalance_seconds = rebalance_seconds
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._group: PartitionGroup | None = None
        # partition -> seq published (acknowledged) so far, for the partitions held
        self.cursors: dict[int, int] = {}
        self._saved: dict[int, int] = {}
        self._round = asyncio.Lock()  # a partition is handed over between rounds
        self.published = 0
        self.skipped = 0  # events that could never be published (see the module)

    @property
    def is_leader(self) -> bool:
        """Does this process publish any partition?"""
        return bool(self.cursors)

    @property
    def partitions(self) -> list[int]:
        """The journal partitions this process publishes."""
        return sorted(self.cursors)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name="twinstore-relay"),
                asyncio.create_task(self._listen(), name="twinstore-relay-listener"),
                asyncio.create_task(self._save_cursor_loop(), name="twinstore-relay-cursor"),
            ]

    async def stop(self) -> None:
        """Give every partition back (each after its round and with its cursor saved), then stop."""
        if not self._tasks:
            return
        tasks, self._tasks = self._tasks, []
        if self._group is not None:
            await self._group.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.save_cursor()
        await self.publisher.stop()

    def notify(self) -> None:
        """Called after a local commit: publish without waiting for the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        async with self.pool.acquire() as con:
            partitions = await stored_partitions(con)
        self._group = PartitionGroup(
            _group_name(self.subjects),
            partitions,
            self._hold,
            connect=self.connect,
            rebalance_seconds=self.rebalance_seconds,
            label="relay",
        )
        self._group.start()
        backoff = RETRY_FIRST_SECONDS
        while True:
            self._wake.clear()  # before reading: a commit after this point wakes the next round
            try:
                published = await self.publish_pending()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("relay round failed; retrying", extra={"error": repr(exc), "after": backoff})
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_MAX_SECONDS)
                continue  # published again at once, not at the next commit or poll
            backoff = RETRY_FIRST_SECONDS
            if published < self.batch:
                # Not wait_for: on 3.11 it swallows a cancellation that arrives as the event is
                # set (a commit's NOTIFY during stop()), and this loop would never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._wake.wait()

    async def _hold(self, partition: int, stop: asyncio.Event) -> None:
        """Publish ``partition`` until ``stop``: join the rounds from its saved cursor; leave them
        after the round in flight, with the cursor saved (the next holder starts there)."""
        async with self.pool.acquire() as con:
            seq = await con.fetchval(SELECT_CURSOR, CURSOR, partition)
        async with self._round:
            self.cursors[partition] = self._saved[partition] = int(seq or 0)
        self._wake.set()
        try:
            await stop.wait()
        finally:
            async with self._round:
                cursor = self.cursors.pop(partition, None)
                saved = self._saved.pop(partition, None)
            if cursor is not None and cursor != saved:
                async with self.pool.acquire() as con:
                    await con.execute(SAVE_CURSORS, CURSOR, [partition], [cursor])

    async def _listen(self) -> None:
        """Wake on every journal commit of any process (NOTIFY), on a connection of its own."""
        while True:
            con: asyncpg.Connection | None = None
            try:
                con = await self.connect()
                await con.add_listener(JOURNAL_CHANNEL, self._on_journal)
                self._wake.set()  # commits while it was down
                while not con.is_closed():
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await con.fetchval("SELECT 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("relay listener lost its connection", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
            finally:
                if con is not None:
                    with contextlib.suppress(Exception):
                        await con.close(timeout=2)

    def _on_journal(self, *_: object) -> None:
        self._wake.set()

    async def _save_cursor_loop(self) -> None:
        """Save the cursors every CURSOR_SAVE_SECONDS when they moved, off the publishing path (a
        commit per round would delay every event behind it); a new holder republishes at most
        that much, which JetStream's duplicate window drops."""
        while True:
            await asyncio.sleep(CURSOR_SAVE_SECONDS)
            with contextlib.suppress(Exception):
                await self.save_cursor()

    async def save_cursor(self) -> None:
        """Store the cursors published so far (those that moved since the last save)."""
        moved = {p: s for p, s in self.cursors.items() if self._saved.get(p) != s}
        if not moved:
            return
        groups: dict[int, dict[int, int]] = {}
        for partition, seq in moved.items():
            groups.setdefault(partition // self.group_size, {})[partition] = seq
        async with self.pool.acquire() as con:
            for group in groups.values():
                await con.execute(SAVE_CURSORS, CURSOR, list(group), list(group.values()))
                for partition, seq in group.items():
                    if partition in self._saved:
                        self._saved[partition] = seq

    async def publish_pending(self) -> int:
        """Publish the next events of every held partition; returns how many rows were read
        (at most ``batch`` from each partition).

        One round at a time (also when called from outside the relay's loop, e.g. a flush at
        shutdown): two rounds reading the same cursors would publish the same events twice and
        could move a cursor back."""
        async with self._round:
            return await self._publish_round()

    async def _publish_round(self) -> int:
        held = dict(self.cursors)
        if not held:
            return 0
        async with self.pool.acquire() as con:
            rows = await con.fetch(SELECT_AFTER, list(held), list(held.values()), self.batch)
        if not rows:
            return 0
        futures: list[asyncio.Future[Any]] = []
        sent: list[asyncpg.Record] = []
        skipped: list[tuple[asyncpg.Record, str]] = []
        publish = self.publisher.publish
        max_payload = self.nc.max_payload
        reconnects = self.nc.stats["reconnects"]
        for row in rows:
            if row["entity"] != "thing":
                continue
            try:
                event = event_from_row(row)
                payload = orjson.dumps(event_envelope(event))
                headers = {
                    "Nats-Msg-Id": f"thing:{event.thing_id}:{event.revision}",
                    PARTITION_HEADER: str(row["partition"]),
                    POSITION_HEADER: str(row["seq"]),
                    "Ditto-Thing-Id": event.thing_id,
                }
            except Exception as exc:  # e.g. a value too deeply nested to encode (old data)
                skipped.append((row, f"cannot be encoded ({type(exc).__name__})"))
                continue
            # The server counts the header block too, and closes the connection of a client
            # that sends more than max_payload: such an event could never be published.
            # (characters bound UTF-8 bytes from above by 4: the exact count only near the limit)
            size = len(payload) + 12 + sum(4 * (len(k) + len(v)) + 4 for k, v in headers.items())
            if size > max_payload:
                size = len(payload) + _header_bytes(headers)
            if size > max_payload:
                skipped.append((row, f"{size} bytes exceed the NATS server's max_payload of {max_payload}"))
                continue
            futures.append(await publish(self.subjects.event_subject(event.thing_id), payload, headers))
            sent.append(row)
        # All or nothing for the cursors: on a failure that may pass the round is republished
        # (dedup ids); a message JetStream refuses for itself (4xx) is passed over.
        try:
            results = await _acks(futures, lambda: self.nc.stats["reconnects"] != reconnects)
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
                    "partition": row["partition"],
                    "seq": row["seq"],
                    "reason": reason,
                },
            )
        self.skipped += len(skipped)
        for row in rows:  # rows are in seq order per partition: the last one of each wins
            if row["partition"] in self.cursors:
                self.cursors[row["partition"]] = row["seq"]
        refused = {id(r) for r, _ in skipped}
        self.published += sum(1 for r in sent if id(r) not in refused)
        return len(rows)


async def _acks(futures: list[asyncio.Future[Any]], reconnected: Callable[[], bool]) -> list[Any]:
    """Each future's result or exception, in order. TimeoutError when none of those still
    pending completes for ``ACK_IDLE_SECONDS``, or at once when the connection was made again
    meanwhile: acks due on the old one never come (the round is published again)."""
    pending: set[asyncio.Future[Any]] = set(futures)
    idle = 0.0
    while pending:
        done, pending = await asyncio.wait(pending, timeout=ACK_POLL_SECONDS)
        idle = 0.0 if done else idle + ACK_POLL_SECONDS
        if pending and reconnected():
            raise TimeoutError(f"reconnected to NATS with {len(pending)} of {len(futures)} acks pending")
        if idle >= ACK_IDLE_SECONDS:
            raise TimeoutError(
                f"no JetStream ack for {ACK_IDLE_SECONDS:g} s ({len(pending)} of {len(futures)} pending)"
            )
    return [f.exception() if f.exception() is not None else f.result() for f in futures]


def _header_bytes(headers: dict[str, str]) -> int:
    """Bytes of a NATS header block (``NATS/1.0\\r\\n``, ``name: value\\r\\n`` each, ``\\r\\n``)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
