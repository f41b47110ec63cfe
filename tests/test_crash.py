"""kill -9 a server while writes are in flight: no acknowledged write lost, every event published.

The server runs on a database and NATS prefix of its own (so the test process's runtime can
never be the relay leader) and reaches NATS through a TCP proxy the test can freeze. Freezing
it part-way through the load leaves the relay unable to publish or get acks while writes keep
committing; then the server is killed with SIGKILL. That makes "committed but not (known to
be) published" certain rather than a race the test may or may not hit. A new server, talking
to NATS directly, must catch up from the journal: the stream ends up with exactly one message
per journal event (``Nats-Msg-Id: thing:<id>:<revision>``), none duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from typing import Any

import asyncpg
import httpx
import nats
import nats.js.api
import orjson
import pytest

from tests.conftest import AUTH, SELECT_JOURNAL, ServerProcess, new_thing_id, verify_chain
from twinstore.bus.subjects import Subjects
from twinstore.settings import Settings

THINGS = 6
WRITERS = 32
ACKS_BEFORE_FREEZE = 300
ACKS_BEFORE_KILL = 1000


class FreezableProxy:
    """A TCP proxy to NATS; :meth:`freeze` stops forwarding in both directions (no close)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(Exception):
            dst.close()

    def freeze(self) -> None:
        self.flowing.clear()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        for w in self.writers:
            with contextlib.suppress(Exception):
                w.close()


async def read_stream(js: Any, stream: str, wildcard: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message of the stream as (Nats-Msg-Id, decoded envelope), in stream order."""
    total = (await js.stream_info(stream)).state.messages
    out: list[tuple[str, dict[str, Any]]] = []
    if total == 0:
        return out
    sub = await js.subscribe(
        wildcard, stream=stream, ordered_consumer=True, deliver_policy=nats.js.api.DeliverPolicy.ALL
    )
    try:
        while len(out) < total:
            msg = await sub.next_msg(timeout=5)
            out.append((msg.headers["Nats-Msg-Id"], orjson.loads(msg.data)))
    finally:
        await sub.unsubscribe()
    return out


async def journal_ids(database_url: str) -> set[str]:
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch("SELECT id, revision FROM journal WHERE entity = 'thing'")
    finally:
        await con.close()
    return {f"thing:{r['id']}:{r['revision']}" for r in rows}


class Load:
    """Concurrent writers of several kinds; remembers every write answered with a 2xx."""

    def __init__(self, url: str, things: list[str]) -> None:
        self.client = httpx.AsyncClient(
            base_url=url, auth=AUTH, timeout=10, limits=httpx.Limits(max_connections=WRITERS)
        )
        self.things = things
        self.acked: dict[str, tuple[str, int]] = {}  # correlation id -> (thing id, status)
        self.failed = 0
        self.counter = itertools.count()
        self.acks = asyncio.Condition()

    async def writer(self, n: int) -> None:
        while True:
            i = next(self.counter)
            thing_id = random.choice(self.things)
            cid = f"crash-{n}-{i}"
            base = f"/api/2/things/{thing_id}"
            kind = i % 4
            headers = {"correlation-id": cid}
            try:
                if kind == 0:
                    r = await self.client.put(f"{base}/attributes/w{n}", json=i, headers=headers)
                elif kind == 1:
                    r = await self.client.patch(
                        base,
                        content=orjson.dumps({"attributes": {f"m{n}": i}}),
                        headers={**headers, "content-type": "application/merge-patch+json"},
                    )
                elif kind == 2:
                    r = await self.client.put(
                        f"{base}/features/f{n % 4}/properties/p", json={"i": i}, headers=headers
                    )
                else:  # acknowledged with 202 once committed
                    r = await self.client.put(
                        f"{base}/attributes/r{n}",
                        json=i,
                        headers={**headers, "response-required": "false"},
                    )
            except httpx.HTTPError:
                self.failed += 1
                return  # the server is gone
            assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text)
            if 200 <= r.status_code < 300:
                async with self.acks:
                    self.acked[cid] = (thing_id, r.status_code)
                    self.acks.notify_all()

    async def wait_for(self, acks: int) -> None:
        async with self.acks:
            await asyncio.wait_for(self.acks.wait_for(lambda: len(self.acked) >= acks), 30)


@pytest.mark.slow
@pytest.mark.parametrize("nats_link", ["frozen", "flowing"])
async def test_kill_9_loses_no_acknowledged_write_and_publishes_every_event(
    own_settings: Settings, nats_link: str
) -> None:
    """``frozen``: the relay is cut off from NATS before the kill, so a backlog is certain;
    ``flowing``: a plain kill -9 while the relay publishes alongside the writes."""
    s = own_settings
    subjects = Subjects(s.nats_prefix, s.partitions)
    assert s.nats_url is not None and s.database_url is not None
    host, port = s.nats_url.removeprefix("nats://").rsplit(":", 1)
    proxy = FreezableProxy(host, int(port))
    first = ServerProcess(s, TWINSTORE_NATS_URL=await proxy.start())
    second: ServerProcess | None = None
    nc = await nats.connect(s.nats_url)
    js = nc.jetstream()
    started = time.monotonic()
    try:
        await asyncio.to_thread(first.start)
        things = [new_thing_id("org.crash") for _ in range(THINGS)]
        async with httpx.AsyncClient(base_url=first.url, auth=AUTH) as c:
            for thing_id in things:
                r = await c.put(f"/api/2/things/{thing_id}", json={"attributes": {}})
                assert r.status_code == 201, r.text

        load = Load(first.url, things)
        writers = [asyncio.create_task(load.writer(n)) for n in range(WRITERS)]
        await load.wait_for(ACKS_BEFORE_FREEZE)
        if nats_link == "frozen":
            proxy.freeze()  # from here on the relay can neither publish nor see acks
        await load.wait_for(ACKS_BEFORE_KILL)
        first.kill()  # SIGKILL with WRITERS requests in flight
        await asyncio.wait_for(asyncio.gather(*writers), 30)
        await load.client.aclose()
        await proxy.close()
        assert load.failed > 0, "no write was in flight when the server was killed"

        committed = await journal_ids(s.database_url)
        before = {mid for mid, _ in await read_stream(js, subjects.events_stream, subjects.events_wildcard)}
        assert before <= committed, "stream holds events the journal does not"
        backlog = committed - before
        if nats_link == "frozen":
            assert backlog, "every event was already published: the catch-up path was not exercised"

        # Every acknowledged write is in the journal (found by its correlation id).
        con = await asyncpg.connect(s.database_url)
        try:
            rows = await con.fetch(
                "SELECT correlation_id, id FROM journal WHERE correlation_id = any($1::text[])",
                list(load.acked),
            )
            in_journal = {r["correlation_id"]: r["id"] for r in rows}
            assert len(rows) == len(in_journal), "a write was journaled twice"
            lost = {cid for cid in load.acked if cid not in in_journal}
            assert not lost, (
                f"{len(lost)} acknowledged writes are missing from the journal: {sorted(lost)[:10]}"
            )
            assert all(in_journal[cid] == tid for cid, (tid, _) in load.acked.items())
            for thing_id in things:  # and each thing's journal is still gapless and chained
                verify_chain(await con.fetch(SELECT_JOURNAL, thing_id))
        finally:
            await con.close()

        # A new server (direct NATS connection) catches up from the journal.
        second = ServerProcess(s)
        await asyncio.to_thread(second.start)
        deadline = time.monotonic() + 30
        while True:
            published = await read_stream(js, subjects.events_stream, subjects.events_wildcard)
            ids = [mid for mid, _ in published]
            if set(ids) >= committed or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        missing = committed - set(ids)
        assert not missing, f"{len(missing)} journal events never published: {sorted(missing)[:10]}"
        assert len(ids) == len(set(ids)), "duplicate Nats-Msg-Id in the stream"
        assert set(ids) == committed, "stream holds events the journal does not"
        for mid, envelope in published:  # header and envelope agree
            thing_id, revision = mid.removeprefix("thing:").rsplit(":", 1)
            assert envelope["revision"] == int(revision)
            ns, name = thing_id.split(":", 1)
            assert envelope["topic"].startswith(f"{ns}/{name}/things/twin/events/")

        # The acknowledged writes are readable through the restarted server.
        async with httpx.AsyncClient(base_url=second.url, auth=AUTH) as c:
            for thing_id in things:
                r = await c.get(f"/api/2/things/{thing_id}", params={"fields": "_revision"})
                assert r.status_code == 200, r.text
        print(
            f"{len(load.acked)} acked, {load.failed} in flight at kill, {len(committed)} events, "
            f"{len(backlog)} published only after restart, {time.monotonic() - started:.1f}s"
        )
    finally:
        first.kill()
        if second is not None:
            second.stop()
        await proxy.close()
        await nc.close()
