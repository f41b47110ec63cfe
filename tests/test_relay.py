"""The relay on real PostgreSQL and JetStream: a relay per journal partition, spread over the
processes (PartitionGroup), each partition published in its ``seq`` order from a cursor of its own.

Commits made through any process are published at once (NOTIFY), not at the next poll; a lost ack
sends a partition back to the cursor of its last acknowledged batch (nothing lost, nothing stored
twice); relays of several processes split the partitions and hand them over without losing or
duplicating an event."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats
import nats.js
import pytest

from tests.conftest import ROOT, bounded, eventually, kill_process, new_thing_id
from twinstore.bus import relay as relay_module
from twinstore.bus.relay import (
    CURSOR,
    PARTITION_HEADER,
    POSITION_HEADER,
    SELECT_CURSOR,
    Relay,
    ensure_events_stream,
    journal_heads,
    relay_lock_class,
)
from twinstore.bus.subjects import Subjects
from twinstore.model.thing import Modify
from twinstore.runtime import create_pool
from twinstore.settings import Settings
from twinstore.store.journal import Journal, WriteRequest
from twinstore.store.recorder import Recorder
from twinstore.store.schema import migrate

SELECT_THING_EVENTS = """
SELECT partition, seq, id, revision FROM journal WHERE entity = 'thing' ORDER BY partition, seq
"""


@dataclass
class Bus:
    """A scratch database (migrated) with its recorder, and a NATS prefix with its stream."""

    pool: asyncpg.Pool
    recorder: Recorder
    url: str
    nc: Any
    js: nats.js.JetStreamContext
    subjects: Subjects

    def relay(self, nc: Any = None, **kw: Any) -> Relay:
        return Relay(self.pool, nc or self.nc, self.subjects, connect=lambda: asyncpg.connect(self.url), **kw)

    def journal(self, **kw: Any) -> Journal:
        return Journal(self.pool, recorder=self.recorder, **kw)

    async def stored(self) -> list[dict[str, str]]:
        """The headers of every message of the stream, in stream order."""
        info = await self.js.stream_info(self.subjects.events_stream)
        headers = []
        for seq in range(1, info.state.messages + 1):
            msg = await self.js.get_msg(self.subjects.events_stream, seq=seq)
            assert msg.headers is not None
            headers.append(msg.headers)
        return headers


@contextlib.asynccontextmanager
async def bus(settings: Settings, url: str, partitions: int | None = None) -> AsyncIterator[Bus]:
    pool = await create_pool(url, 4)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    subjects = Subjects(f"r{secrets.token_hex(4)}", 4)
    try:
        async with pool.acquire() as con:
            await migrate(con, partitions)
        await ensure_events_stream(js, subjects, 600)
        yield Bus(pool, await Recorder.load(pool), url, nc, js, subjects)
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(subjects.events_stream)
        await nc.close()
        await bounded(pool.close(), 20, "closing the pool")


def write(journal: Journal, thing_id: str, path: str, value: Any) -> Any:
    return journal.write(
        WriteRequest(thing_id=thing_id, command=Modify(path=path, value=value), originator="nginx:t")
    )


async def test_commit_of_another_journal_is_published_without_waiting_for_a_poll(
    settings: Settings, scratch_database: str
) -> None:
    async with bus(settings, scratch_database) as b:
        relay = b.relay(poll_interval=60.0)
        other_process = b.journal()  # no on_commit: like a journal in another process
        try:
            rounds = 0
            publish_pending = relay.publish_pending

            async def counted() -> int:
                nonlocal rounds
                published = await publish_pending()
                rounds += 1
                return published

            relay.publish_pending = counted  # type: ignore[method-assign]
            relay.start()
            other_process.start()
            # every partition held, and the relay's round done: it now waits (60 s poll) for a
            # notification
            await eventually(
                lambda: len(relay.partitions) == b.recorder.partitions and rounds >= 1,
                10,
                "the relay holding every partition",
            )
            await asyncio.sleep(0.2)  # the rounds the partitions' arrivals woke are over
            thing_id = new_thing_id()
            start = time.monotonic()
            await write(other_process, thing_id, "/", {})
            while relay.published < 1 and time.monotonic() - start < 5:
                await asyncio.sleep(0.01)
            assert relay.published == 1
            assert time.monotonic() - start < 2  # far below the 60 s poll interval
            msg = await b.js.get_msg(b.subjects.events_stream, seq=1)
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == f"thing:{thing_id}:1"
            assert msg.headers[PARTITION_HEADER] == str(b.recorder.partition(thing_id))
            assert msg.headers[POSITION_HEADER] == "1"
        finally:
            await bounded(other_process.stop(), 20, "stopping the journal")
            await bounded(relay.stop(), 20, "stopping the relay")


async def test_a_lost_ack_republishes_from_the_last_acknowledged_batch_and_loses_nothing(
    settings: Settings, scratch_database: str
) -> None:
    # One partition: one order of all 60 events, in which batches and the cursor are counted.
    async with bus(settings, scratch_database, partitions=1) as b:
        relay = b.relay(poll_interval=60.0, batch=5)
        journal = b.journal()
        try:
            journal.start()
            things = [new_thing_id() for _ in range(12)]
            await asyncio.gather(*(write(journal, t, "/", {"attributes": {}}) for t in things))
            await asyncio.gather(
                *(write(journal, t, f"/attributes/a{i}", i) for i in range(4) for t in things)
            )
            async with b.pool.acquire() as con:
                positions = [r["seq"] for r in await con.fetch("SELECT seq FROM journal ORDER BY seq")]
            assert positions == list(range(1, 61))

            # The ack of the 18th event (4th batch of 5) is lost: the message reaches the stream,
            # but the relay hears of a failure (0.2 s after the real ack).
            lost = positions[17]
            log: list[int] = []
            real_publish = relay.publisher.publish

            async def publish(subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[Any]:
                position = int(headers[POSITION_HEADER])
                log.append(position)
                future = await real_publish(subject, payload, headers)
                if position != lost or log.count(lost) > 1:
                    return future
                failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

                def fail(_: object) -> None:
                    asyncio.get_running_loop().call_later(
                        0.2, failed.set_exception, TimeoutError("ack lost (test)")
                    )

                future.add_done_callback(fail)
                return failed

            relay.publisher.publish = publish  # type: ignore[method-assign]
            relay.start()
            deadline = time.monotonic() + 10
            while relay.cursors.get(0) != positions[-1] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert relay.cursors == {0: positions[-1]}
            assert relay.published == 60  # counted once each: the failed batch counts when acknowledged

            again = log.index(lost, log.index(lost) + 1)  # the republish of the lost one
            restart = again - 2  # its batch starts at positions[15]
            first_pass, second_pass = log[:restart], log[restart:]
            # The relay stopped at the unacknowledged batch, went back to the cursor of the last
            # acknowledged one (15th event) and published everything after it again.
            assert first_pass == positions[:20]
            assert second_pass == positions[15:]

            # JetStream dropped the republished duplicates: each event once, in position order.
            stored = await b.stored()
            assert [int(h[POSITION_HEADER]) for h in stored] == positions
            assert {h[PARTITION_HEADER] for h in stored} == {"0"}

            # the cursor is saved off the publishing path, within CURSOR_SAVE_SECONDS
            async with b.pool.acquire() as con:
                await asyncio.wait_for(_until_cursor(con, 0, positions[-1]), 2)
                assert await con.fetchval(SELECT_CURSOR, CURSOR, 0) == positions[-1]
        finally:
            await bounded(journal.stop(), 20, "stopping the journal")
            await bounded(relay.stop(), 20, "stopping the relay")


async def test_an_ack_that_never_comes_is_given_up_after_the_idle_time_and_the_round_republished(
    settings: Settings, scratch_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ack lost without an answer (its connection or the stream's leader died) must not hold
    the relay longer than a leader election: the round is given up once no ack came for
    ACK_IDLE_SECONDS (it was 30 s in all), republished, and JetStream drops the duplicates."""
    monkeypatch.setattr(relay_module, "ACK_IDLE_SECONDS", 0.5)
    async with bus(settings, scratch_database, partitions=1) as b:
        relay = b.relay(poll_interval=60.0, batch=5)
        journal = b.journal()
        try:
            journal.start()
            things = [new_thing_id() for _ in range(10)]
            await asyncio.gather(*(write(journal, t, "/", {"attributes": {}}) for t in things))
            async with b.pool.acquire() as con:
                positions = [r["seq"] for r in await con.fetch("SELECT seq FROM journal ORDER BY seq")]
            silent = positions[7]  # its first publish gets no ack at all, ever
            real_publish = relay.publisher.publish
            tries: list[int] = []

            async def publish(subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[Any]:
                position = int(headers[POSITION_HEADER])
                tries.append(position)
                future = await real_publish(subject, payload, headers)
                if position == silent and tries.count(silent) == 1:
                    return asyncio.get_running_loop().create_future()  # never resolved
                return future

            relay.publisher.publish = publish  # type: ignore[method-assign]
            started = time.monotonic()
            relay.start()

            async def done() -> bool:
                return relay.cursors.get(0) == positions[-1]

            await eventually(done, 10, "every event acknowledged")
            assert time.monotonic() - started < 5  # the idle time and one retry, not 30 s
            assert tries.count(silent) == 2
            stored = await b.stored()
            assert [int(h[POSITION_HEADER]) for h in stored] == positions
        finally:
            await bounded(journal.stop(), 20, "stopping the journal")
            await bounded(relay.stop(), 20, "stopping the relay")


async def test_acks_due_on_a_connection_made_again_are_given_up_at_once() -> None:
    """Acks are replies to the connection that published: after a reconnect (its server died)
    they never come, so the round is given up at once, not after the idle time."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[Any] = loop.create_future()
    answered.set_result(b"{}")
    lost: asyncio.Future[Any] = loop.create_future()
    reconnects = [0]
    loop.call_later(0.3, lambda: reconnects.__setitem__(0, 1))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="reconnected"):
        await relay_module._acks([answered, lost], lambda: reconnects[0] != 0)
    assert time.monotonic() - started < 1.5  # not ACK_IDLE_SECONDS (5 s)
    assert await relay_module._acks([answered], lambda: True) == [b"{}"]  # nothing pending


def _check_stream(stored: list[dict[str, str]], events: list[asyncpg.Record]) -> None:
    """The stream holds every thing event of the journal once; each partition's events in its
    seq order, so each thing's in revision order."""
    ids = [h["Nats-Msg-Id"] for h in stored]
    assert len(ids) == len(set(ids)), "an event is stored twice"
    assert sorted(ids) == sorted(f"thing:{e['id']}:{e['revision']}" for e in events)
    by_partition: dict[int, list[int]] = {}
    for h in stored:
        by_partition.setdefault(int(h[PARTITION_HEADER]), []).append(int(h[POSITION_HEADER]))
    expected: dict[int, list[int]] = {}
    for e in events:
        expected.setdefault(e["partition"], []).append(e["seq"])
    assert by_partition == expected  # events ordered by partition, seq
    revisions: dict[str, list[int]] = {}
    for msg_id in ids:
        thing_id, revision = msg_id.removeprefix("thing:").rsplit(":", 1)
        revisions.setdefault(thing_id, []).append(int(revision))
    assert all(r == list(range(1, len(r) + 1)) for r in revisions.values())


async def test_each_partition_is_published_in_seq_order_and_its_cursor_ends_at_its_head(
    settings: Settings, scratch_database: str
) -> None:
    async with bus(settings, scratch_database, partitions=8) as b:
        journal = b.journal()
        relay = b.relay(poll_interval=0.2, batch=7)  # several rounds per partition
        try:
            journal.start()
            things = [new_thing_id() for _ in range(40)]
            await asyncio.gather(*(write(journal, t, "/", {"attributes": {}}) for t in things))
            relay.start()  # publishes while the writes go on
            for i in range(5):
                await asyncio.gather(*(write(journal, t, f"/attributes/a{i}", i) for t in things))
            heads = await journal_heads(b.pool)
            assert len(heads) == 8 and sum(heads.values()) == 240
            assert sum(1 for seq in heads.values() if seq) > 4  # the things are spread out
            await eventually(lambda: relay.cursors == heads, 20, "the relay's cursors at the heads")
            assert relay.published == 240
            async with b.pool.acquire() as con:
                events = await con.fetch(SELECT_THING_EVENTS)
            assert all(e["partition"] == b.recorder.partition(e["id"]) for e in events)
            _check_stream(await b.stored(), events)
        finally:
            await bounded(journal.stop(), 20, "stopping the journal")
            await bounded(relay.stop(), 20, "stopping the relay")
        async with b.pool.acquire() as con:  # saved at the latest when the relay stopped
            saved = {p: await con.fetchval(SELECT_CURSOR, CURSOR, p) for p in heads}
        assert {p: s or 0 for p, s in saved.items()} == heads


class Load:
    """Writers changing 24 things one revision at a time, until stopped."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.writing = asyncio.Event()
        self.tasks: list[asyncio.Task[int]] = []

    def start(self) -> None:
        self.writing.set()
        self.tasks = [asyncio.create_task(self._write(new_thing_id())) for _ in range(24)]

    async def _write(self, thing_id: str) -> int:
        await write(self.journal, thing_id, "/", {"attributes": {}})
        n = 1
        while self.writing.is_set():
            n += 1
            await write(self.journal, thing_id, "/attributes/n", n)
            await asyncio.sleep(random.uniform(0.005, 0.03))
        return n

    async def stop(self, pool: asyncpg.Pool) -> dict[int, int]:
        """Stop writing; the partitions' heads, which hold every event written."""
        self.writing.clear()
        counts = await bounded(asyncio.gather(*self.tasks), 20, "the writers")
        heads = await journal_heads(pool)
        assert sum(heads.values()) == sum(counts)
        return heads

    async def cancel(self) -> None:
        self.writing.clear()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_two_relays_split_the_partitions_and_publish_every_event_once_in_order(
    settings: Settings, scratch_database: str
) -> None:
    """Two processes' relays on one database share the partitions; the first one stops while
    writes go on: the second takes its partitions over from their saved cursors."""
    async with bus(settings, scratch_database, partitions=8) as b:
        other_nc = await nats.connect(settings.nats_url)  # the second process's connection
        first = b.relay(poll_interval=0.2, batch=20, rebalance_seconds=0.2)
        second = b.relay(other_nc, poll_interval=0.2, batch=20, rebalance_seconds=0.2)
        journal = b.journal()
        load = Load(journal)
        try:
            journal.start()
            first.start()
            await eventually(lambda: len(first.partitions) == 8, 10, "the first relay holding them all")
            load.start()
            await asyncio.sleep(0.5)
            second.start()

            def split() -> bool:
                return len(first.partitions) == len(second.partitions) == 4

            await eventually(split, 15, "the partitions split between the relays")
            assert set(first.partitions).isdisjoint(second.partitions)
            await asyncio.sleep(0.5)
            assert first.published > 0 and second.published > 0
            await bounded(first.stop(), 40, "stopping the first relay")  # mid-stream
            await eventually(lambda: len(second.partitions) == 8, 15, "the second relay taking over")
            await asyncio.sleep(0.5)
            heads = await load.stop(b.pool)
            await eventually(lambda: second.cursors == heads, 20, "the second relay at every head")
            async with b.pool.acquire() as con:
                events = await con.fetch(SELECT_THING_EVENTS)
            _check_stream(await b.stored(), events)
            # handed over at the saved cursor: nothing was even published twice
            assert first.published + second.published == len(events)
        finally:
            await load.cancel()
            await bounded(journal.stop(), 20, "stopping the journal")
            await bounded(first.stop(), 40, "stopping the first relay")
            await bounded(second.stop(), 40, "stopping the second relay")
            await other_nc.close()


# A relay process of its own: kill -9 ends it with no round finished and no cursor saved.
RELAY_PROCESS = """
import asyncio, sys
import asyncpg, nats
from twinstore.bus import relay as module
from twinstore.bus.relay import Relay
from twinstore.bus.subjects import Subjects
from twinstore.runtime import create_pool

async def main(url, nats_url, prefix, name, save_seconds):
    module.CURSOR_SAVE_SECONDS = float(save_seconds)
    pool = await create_pool(url, 2)
    nc = await nats.connect(nats_url)
    connect = lambda: asyncpg.connect(url, server_settings={"application_name": name})
    relay = Relay(pool, nc, Subjects(prefix, 4), connect=connect, poll_interval=0.2, batch=20,
                  rebalance_seconds=0.2)
    relay.start()
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""
# Partitions held, with the application_name of the holding connection.
SELECT_HOLDERS = """
SELECT a.application_name AS name, l.objid::int AS partition
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::bigint::oid AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
SELECT_CURSORS = "SELECT partition, seq FROM relay_cursors WHERE name = $1"


async def test_a_relay_process_killed_mid_stream_loses_nothing_and_its_republish_is_dropped(
    settings: Settings, scratch_database: str
) -> None:
    """Two relay processes share the partitions; one is killed with SIGKILL while writes go on:
    the other takes its partitions over from their last saved cursors (behind what was
    published), republishes from there, and JetStream keeps each event once."""
    async with bus(settings, scratch_database, partitions=8) as b:
        journal = b.journal()
        load = Load(journal)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        lock_class = relay_lock_class(b.subjects)

        async def holders() -> dict[str, set[int]]:
            found: dict[str, set[int]] = {}
            async with b.pool.acquire() as con:
                for r in await con.fetch(SELECT_HOLDERS, lock_class):
                    found.setdefault(r["name"], set()).add(r["partition"])
            return found

        async def held(expected: dict[str, int]) -> bool:
            return {name: len(held) for name, held in (await holders()).items()} == expected

        async def saved() -> dict[int, int]:
            async with b.pool.acquire() as con:
                cursors = {r["partition"]: r["seq"] for r in await con.fetch(SELECT_CURSORS, CURSOR)}
            return {p: cursors.get(p, 0) for p in range(8)}

        try:
            journal.start()
            load.start()
            # relay-a saves its cursors only when it hands a partition over: when it is killed,
            # what it published since it took its partitions is certainly republished
            for name, save_seconds in (("relay-a", "3600"), ("relay-b", "0.1")):
                args = [b.url, str(settings.nats_url), b.subjects.prefix, name, save_seconds]
                procs[name] = subprocess.Popen([sys.executable, "-c", RELAY_PROCESS, *args], cwd=ROOT)
            await eventually(lambda: held({"relay-a": 4, "relay-b": 4}), 30, "the partitions split")
            await asyncio.sleep(1.0)
            of_a = (await holders())["relay-a"]
            kill_process(procs["relay-a"])  # mid-stream
            cursors = await saved()
            published: dict[int, int] = {}
            for h in await b.stored():
                published[int(h[PARTITION_HEADER])] = int(h[POSITION_HEADER])
            assert any(published.get(p, 0) > cursors[p] for p in of_a), "relay-a published beyond its cursors"
            await eventually(lambda: held({"relay-b": 8}), 15, "relay-b taking every partition over")
            await asyncio.sleep(0.5)
            heads = await load.stop(b.pool)

            async def at_heads() -> bool:
                return await saved() == heads

            await eventually(at_heads, 20, "relay-b's saved cursors at every head")
            async with b.pool.acquire() as con:
                events = await con.fetch(SELECT_THING_EVENTS)
            _check_stream(await b.stored(), events)
        finally:
            for proc in procs.values():
                kill_process(proc)
            await load.cancel()
            await bounded(journal.stop(), 20, "stopping the journal")


async def test_an_event_that_cannot_be_published_is_passed_over_and_the_next_one_delivered(
    settings: Settings, scratch_database: str
) -> None:
    """Old data (or a limit raised and lowered): an event larger than the NATS server's
    max_payload, committed directly through a journal with lax limits, is logged, counted and
    passed over; the events after it are delivered (before, the relay retried it every second
    for ever and no live event reached anyone)."""
    async with bus(settings, scratch_database) as b:
        relay = b.relay(poll_interval=0.2)
        lax = b.journal(max_thing_bytes=8_000_000, max_header_bytes=8_000_000)  # no bound: old data
        try:
            lax.start()
            thing_id = new_thing_id()
            partition = b.recorder.partition(thing_id)

            async def put(path: str, value: Any, correlation_id: str | None = None) -> None:
                await lax.write(
                    WriteRequest(
                        thing_id=thing_id,
                        command=Modify(path=path, value=value),
                        originator="nginx:t",
                        correlation_id=correlation_id,
                    )
                )

            await put("/", {"attributes": {}})
            await put("/attributes/a", 1, correlation_id="c" * (4 << 20))  # the 4 MB header
            await put("/attributes/b", "x" * (2 << 20))  # a 2 MB value
            await put("/attributes/c", 3)
            assert b.nc.max_payload < 2 << 20
            relay.start()
            await asyncio.wait_for(_until(lambda: relay.published == 2), 20)
            assert relay.skipped == 2
            info = await b.js.stream_info(b.subjects.events_stream)
            assert info.state.messages == 2
            last = await b.js.get_msg(b.subjects.events_stream, seq=2)
            assert last.headers is not None and last.headers["Nats-Msg-Id"] == f"thing:{thing_id}:4"
            # the cursor passed them: a new holder of the partition does not try them again
            async with b.pool.acquire() as con:
                await asyncio.wait_for(_until_cursor(con, partition, 4), 10)
            await put("/attributes/d", 4)  # and live events go on
            await asyncio.wait_for(_until(lambda: relay.published == 3), 10)
            assert relay.skipped == 2
        finally:
            await bounded(lax.stop(), 20, "stopping the journal")
            await bounded(relay.stop(), 20, "stopping the relay")


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.02)


async def _until_cursor(con: Any, partition: int, seq: int) -> None:
    while (await con.fetchval(SELECT_CURSOR, CURSOR, partition) or 0) < seq:
        await asyncio.sleep(0.02)
