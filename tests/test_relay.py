"""The relay publishes commits made through any process at once (NOTIFY), not at its next poll;
a lost ack sends it back to the cursor of the last batch that was acknowledged: nothing lost,
nothing stored twice."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import asyncpg
import nats

from tests.conftest import bounded, eventually, new_thing_id
from twinstore.bus.relay import CURSOR, SELECT_CURSOR, Relay, ensure_events_stream
from twinstore.bus.subjects import Subjects
from twinstore.model.thing import Modify
from twinstore.runtime import create_pool
from twinstore.settings import Settings
from twinstore.store.journal import Journal, WriteRequest
from twinstore.store.schema import migrate


async def test_commit_of_another_journal_is_published_without_waiting_for_a_poll(
    settings: Settings, scratch_database: str
) -> None:
    pool = await create_pool(scratch_database, 4)
    nc = await nats.connect(settings.nats_url)
    subjects = Subjects(f"r{secrets.token_hex(4)}", 4)
    js = nc.jetstream()
    relay = Relay(pool, nc, subjects, poll_interval=60.0, connect=lambda: asyncpg.connect(scratch_database))
    other_process = Journal(pool)  # no on_commit: like a journal in another process
    try:
        async with pool.acquire() as con:
            await migrate(con)
        await ensure_events_stream(js, subjects, 600)
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
        # the leader has done its first round and now waits (60 s poll) for a notification
        await eventually(lambda: relay.is_leader and rounds >= 1, 10, "the relay's first round as leader")
        thing_id = new_thing_id()
        start = time.monotonic()
        await other_process.write(
            WriteRequest(thing_id=thing_id, command=Modify(path="/", value={}), originator="nginx:t")
        )
        while relay.published < 1 and time.monotonic() - start < 5:
            await asyncio.sleep(0.01)
        assert relay.published == 1
        assert time.monotonic() - start < 2  # far below the 60 s poll interval
        msg = await js.get_msg(subjects.events_stream, seq=1)
        assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == f"thing:{thing_id}:1"
    finally:
        await bounded(other_process.stop(), 20, "stopping the journal")
        await bounded(relay.stop(), 20, "stopping the relay")
        await js.delete_stream(subjects.events_stream)
        await nc.close()
        await bounded(pool.close(), 20, "closing the pool")


async def test_a_lost_ack_republishes_from_the_last_acknowledged_batch_and_loses_nothing(
    settings: Settings, scratch_database: str
) -> None:
    pool = await create_pool(scratch_database, 4)
    nc = await nats.connect(settings.nats_url)
    subjects = Subjects(f"r{secrets.token_hex(4)}", 4)
    js = nc.jetstream()
    relay = Relay(
        pool,
        nc,
        subjects,
        poll_interval=60.0,
        batch=5,
        connect=lambda: asyncpg.connect(scratch_database),
    )
    journal = Journal(pool)
    try:
        async with pool.acquire() as con:
            await migrate(con)
        await ensure_events_stream(js, subjects, 600)
        journal.start()
        things = [new_thing_id() for _ in range(12)]

        def write(thing_id: str, path: str, value: Any) -> Any:
            return journal.write(
                WriteRequest(thing_id=thing_id, command=Modify(path=path, value=value), originator="nginx:t")
            )

        await asyncio.gather(*(write(t, "/", {"attributes": {}}) for t in things))
        await asyncio.gather(*(write(t, f"/attributes/a{i}", i) for i in range(4) for t in things))
        async with pool.acquire() as con:
            positions = [
                r["position"] for r in await con.fetch("SELECT position FROM journal ORDER BY position")
            ]
        assert len(positions) == 60

        # The ack of the 18th event (4th batch of 5) is lost: the message reaches the stream, but
        # the relay hears of a failure (0.2 s after the real ack).
        lost = positions[17]
        log: list[int] = []
        real_publish = relay.publisher.publish

        async def publish(subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[Any]:
            position = int(headers["Twinstore-Position"])
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
        while relay.position < positions[-1] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert relay.position == positions[-1]
        assert relay.published == 60  # counted once each: the failed batch counts when acknowledged

        again = log.index(lost, log.index(lost) + 1)  # the republish of the lost one
        restart = again - 2  # its batch starts at positions[15]
        first_pass, second_pass = log[:restart], log[restart:]
        # The relay stopped at the unacknowledged batch, went back to the cursor saved after the
        # last acknowledged one (15th event) and published everything after it again.
        assert first_pass == positions[:20]
        assert second_pass == positions[15:]

        # JetStream dropped the republished duplicates: each event once, in position order.
        info = await js.stream_info(subjects.events_stream)
        assert info.state.messages == 60
        stored = [
            int((await js.get_msg(subjects.events_stream, seq=seq)).headers["Twinstore-Position"])  # type: ignore[index]
            for seq in range(1, 61)
        ]
        assert stored == positions

        # the cursor is saved off the publishing path, within CURSOR_SAVE_SECONDS
        deadline = time.monotonic() + 2
        async with pool.acquire() as con:
            while await con.fetchval(SELECT_CURSOR, CURSOR) != positions[-1] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert await con.fetchval(SELECT_CURSOR, CURSOR) == positions[-1]
    finally:
        await bounded(journal.stop(), 20, "stopping the journal")
        await bounded(relay.stop(), 20, "stopping the relay")
        await js.delete_stream(subjects.events_stream)
        await nc.close()
        await bounded(pool.close(), 20, "closing the pool")


async def test_an_event_that_cannot_be_published_is_passed_over_and_the_next_one_delivered(
    settings: Settings, scratch_database: str
) -> None:
    """Old data (or a limit raised and lowered): an event larger than the NATS server's
    max_payload, committed directly through a journal with lax limits, is logged, counted and
    passed over; the events after it are delivered (before, the relay retried it every second
    for ever and no live event reached anyone)."""
    pool = await create_pool(scratch_database, 4)
    nc = await nats.connect(settings.nats_url)
    subjects = Subjects(f"r{secrets.token_hex(4)}", 4)
    js = nc.jetstream()
    relay = Relay(pool, nc, subjects, poll_interval=0.2, connect=lambda: asyncpg.connect(scratch_database))
    lax = Journal(pool, max_thing_bytes=8_000_000, max_header_bytes=8_000_000)  # no bound: old data
    try:
        async with pool.acquire() as con:
            await migrate(con)
        await ensure_events_stream(js, subjects, 600)
        lax.start()
        thing_id = new_thing_id()

        async def write(path: str, value: Any, correlation_id: str | None = None) -> None:
            await lax.write(
                WriteRequest(
                    thing_id=thing_id,
                    command=Modify(path=path, value=value),
                    originator="nginx:t",
                    correlation_id=correlation_id,
                )
            )

        await write("/", {"attributes": {}})
        await write("/attributes/a", 1, correlation_id="c" * (4 << 20))  # the 4 MB header
        await write("/attributes/b", "x" * (2 << 20))  # a 2 MB value
        await write("/attributes/c", 3)
        assert nc.max_payload < 2 << 20
        relay.start()
        await asyncio.wait_for(_until(lambda: relay.published == 2), 20)
        assert relay.skipped == 2
        info = await js.stream_info(subjects.events_stream)
        assert info.state.messages == 2
        last = await js.get_msg(subjects.events_stream, seq=2)
        assert last.headers is not None and last.headers["Nats-Msg-Id"] == f"thing:{thing_id}:4"
        # the cursor passed them: a new leader does not try them again
        async with pool.acquire() as con:
            await asyncio.wait_for(_until_cursor(con, 4), 10)
        await write("/attributes/d", 4)  # and live events go on
        await asyncio.wait_for(_until(lambda: relay.published == 3), 10)
        assert relay.skipped == 2
    finally:
        await asyncio.wait_for(lax.stop(), 20)
        await asyncio.wait_for(relay.stop(), 20)
        await js.delete_stream(subjects.events_stream)
        await nc.close()
        await asyncio.wait_for(pool.close(), 20)


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.02)


async def _until_cursor(con: Any, position: int) -> None:
    while (await con.fetchval(SELECT_CURSOR, CURSOR) or 0) < position:
        await asyncio.sleep(0.02)
