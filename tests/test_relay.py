"""The relay publishes commits made through any process at once (NOTIFY), not at its next poll."""

from __future__ import annotations

import asyncio
import secrets
import time

import asyncpg
import nats

from tests.conftest import new_thing_id
from twinstore.bus.relay import Relay, ensure_events_stream
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
        relay.start()
        other_process.start()
        deadline = time.monotonic() + 10
        while not relay.is_leader and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert relay.is_leader
        await asyncio.sleep(0.2)  # the leader has done its first round and now waits (60 s poll)
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
        await other_process.stop()
        await relay.stop()
        await js.delete_stream(subjects.events_stream)
        await nc.close()
        await pool.close()
