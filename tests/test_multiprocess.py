"""Three ``twinstore serve`` and two ``twinstore ingest`` processes on one PostgreSQL and NATS,
under load; mid-load one server gets SIGTERM, another SIGKILL, and one ingest worker SIGTERM.

Load: HTTP writers spread over the live servers (each owns some things and writes 0, 1, 2, ...
to ``/attributes/n``, remembering what was answered 2xx), adapter-like publishers on JetStream
(telemetry rows, and Ditto ``modify`` commands from a second source), and one WebSocket client
per server following the HTTP things' events. A client whose server goes away reconnects to a
live one: ``START-SEND-EVENTS`` again, then for each thing the persisted events after the last
revision it saw (Ditto's ``subscribeForPersistedEvents``), so nothing is missed in between.

Afterwards: every acknowledged HTTP write is in the journal once, in order, and nothing that was
not sent; every acknowledged publish exactly once and in order; revisions gapless with intact
hash chains; the SIGTERM'd server and worker exited 0 well within the grace period (and the
server closed its WebSocket with 1001); each client saw every revision of its things from its
first event to the last, live events in revision order; writes were acknowledged both before
and after the kills (they landed mid-load).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    AUTH,
    INGEST_SOURCES,
    SELECT_JOURNAL,
    ServerProcess,
    bounded,
    cancel_and_wait,
    verify_chain,
)
from tests.processes import PATH, Feed, IngestProcess, Publisher, assert_exactly_once_in_order
from twinstore.bus.ingest import IngestSubjects, Update
from twinstore.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

BASIC = {"authorization": "Basic " + base64.b64encode(b"ditto:ditto").decode()}
HTTP_THINGS = 12
WRITERS = 6  # each owns HTTP_THINGS / WRITERS things: its values of a thing go up one by one
INGEST_THINGS = 6
COMMAND_THINGS = 3
ACKS_BEFORE_KILL = 150
ACKS_AFTER_KILL = 150
LOAD_AFTER_KILL = 4.0  # seconds of load after the kill at least (ingest partitions move over)
GRACE = 25.0  # shutdown_grace_seconds (the default)
# 5 processes with their pools, relay and lock connections: ~40 PostgreSQL connections, not ~70
SMALL_POOL = {"TWINSTORE_POOL_SIZE": "4"}
SOURCES = {**INGEST_SOURCES, "ditto-cmd": ["nginx:ditto"]}  # a second source for commands


class Writers:
    """HTTP writers over the live servers; remember what was tried and what was acknowledged."""

    def __init__(self, urls: list[str], things: list[str]) -> None:
        self.live = urls  # the servers still up (shared with the test, as a load balancer)
        self.things = things
        self.tried: dict[str, list[int]] = {t: [] for t in things}
        self.acked: dict[str, list[int]] = {t: [] for t in things}
        self.acked_at: list[float] = []
        self.failed = 0
        self.reasons: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._write(i)) for i in range(WRITERS)]

    async def _write(self, index: int) -> None:
        mine = self.things[index::WRITERS]
        clients: dict[str, httpx.AsyncClient] = {}
        step = 0
        try:
            while not self._stop.is_set():
                thing_id = mine[step % len(mine)]
                url = self.live[(step + index) % len(self.live)]
                step += 1
                if url not in clients:
                    clients[url] = httpx.AsyncClient(base_url=url, auth=AUTH, timeout=10)
                value = len(self.tried[thing_id])
                self.tried[thing_id].append(value)
                try:
                    r = await clients[url].put(f"/api/2/things/{thing_id}/attributes/n", json=value)
                except httpx.HTTPError as exc:
                    self.failed += 1  # unknown outcome (e.g. the server was killed): go on
                    self.reasons[type(exc).__name__] = self.reasons.get(type(exc).__name__, 0) + 1
                    await asyncio.sleep(0.02)
                    continue
                if r.status_code in (201, 204):
                    self.acked[thing_id].append(value)
                    self.acked_at.append(time.monotonic())
                else:
                    self.failed += 1
                    self.reasons[str(r.status_code)] = self.reasons.get(str(r.status_code), 0) + 1
        finally:
            for client in clients.values():
                await client.aclose()

    def count(self) -> int:
        return len(self.acked_at)

    async def stop(self) -> None:
        self._stop.set()
        await bounded(asyncio.gather(*self._tasks), 30, "the writers' last requests")


class Watcher:
    """A WebSocket client following some things' events across server restarts."""

    def __init__(self, url: str, live: list[str], namespace: str, things: list[str]) -> None:
        self.url = url
        self.live = live  # the servers still up (shared with the test)
        self.namespace = namespace
        self.seen: dict[str, set[int]] = {t: set() for t in things}
        # The things were created (revision 1) before the client subscribed: a client that
        # reconnects before any of a thing's live events asks for what follows that.
        self.last: dict[str, int] = {t: 1 for t in things}
        self.out_of_order: list[tuple[str, int, int]] = []
        self.closes: list[int | None] = []  # close code received (None: no close frame)
        self.connections = 0
        self.events_after_reconnect = 0
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def ready(self) -> None:
        await asyncio.wait_for(self._ready.wait(), 15)

    async def _run(self) -> None:
        while not self._stop.is_set():
            ws: ClientConnection | None = None
            try:
                async with connect(self.url.replace("http", "ws") + "/ws/2", additional_headers=BASIC) as ws:
                    await self._follow(ws)  # returns when closed with 1000 / 1001
            except (ConnectionClosed, OSError):
                pass  # closed without a close frame, or refused: that server is gone
            if ws is not None and self._ready.is_set():
                self.closes.append(ws.close_code)  # 1006: no close frame
            if not self._stop.is_set():
                await asyncio.sleep(0.1)
                self.url = (
                    self.live[self.connections % len(self.live)] if self.url not in self.live else self.url
                )

    async def _follow(self, ws: ClientConnection) -> None:
        await ws.send(f"START-SEND-EVENTS?namespaces={self.namespace}")
        while await ws.recv() != "START-SEND-EVENTS:ACK":
            pass
        self.connections += 1
        if self.connections > 1:  # what was committed while away: persisted events after `last`
            for thing_id in self.seen:
                await ws.send(
                    self._streaming(
                        thing_id,
                        "subscribeForPersistedEvents",
                        {"fromHistoricalRevision": self.last[thing_id] + 1},
                    )
                )
        self._ready.set()
        last_live: dict[str, int] = {}
        async for text in ws:
            message = json.loads(text)
            topic: str = message["topic"]
            if "/things/twin/events/" in topic:
                thing_id = _thing(topic)
                revision = int(message["revision"])
                if revision <= last_live.get(thing_id, 0):
                    self.out_of_order.append((thing_id, last_live[thing_id], revision))
                last_live[thing_id] = revision
                self._saw(thing_id, revision)
                if self.connections > 1:
                    self.events_after_reconnect += 1
            elif topic.endswith("/streaming/created"):
                stream_id = message["value"]["subscriptionId"]
                await ws.send(
                    self._streaming(
                        _thing(topic), "request", {"subscriptionId": stream_id, "demand": 1_000_000}
                    )
                )
            elif topic.endswith("/streaming/next"):
                self._saw(_thing(topic), int(message["value"]["item"]["revision"]))
            # streaming/complete; streaming/failed: nothing was committed after `last`

    def _saw(self, thing_id: str, revision: int) -> None:
        self.seen[thing_id].add(revision)
        self.last[thing_id] = max(self.last[thing_id], revision)

    @staticmethod
    def _streaming(thing_id: str, action: str, value: dict[str, Any]) -> str:
        ns, name = thing_id.split(":", 1)
        return json.dumps(
            {
                "topic": f"{ns}/{name}/things/twin/streaming/{action}",
                "headers": {"correlation-id": secrets.token_hex(4)},
                "path": "/",
                "value": value,
            }
        )

    async def stop(self) -> None:
        self._stop.set()
        await cancel_and_wait(self._task)


def _thing(topic: str) -> str:
    ns, name = topic.split("/")[:2]
    return f"{ns}:{name}"


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:.0f} s: {what}")
        await asyncio.sleep(0.05)


async def exit_of(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """The exit status of ``proc`` and when it was seen."""
    code = await asyncio.to_thread(proc.wait, timeout)
    return code, time.monotonic()


def modify(thing_id: str, value: Any) -> dict[str, Any]:
    ns, name = thing_id.split(":", 1)
    return {"topic": f"{ns}/{name}/things/twin/commands/modify", "path": PATH, "value": value, "headers": {}}


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(
    own_settings: Settings, tmp_path: Path
) -> AsyncIterator[tuple[list[ServerProcess], list[IngestProcess]]]:
    own = msgspec.structs.replace(own_settings, ingest_sources=SOURCES)
    assert own.database_url is not None and own.nats_url is not None
    servers = [
        ServerProcess(own, TWINSTORE_INGEST_ENABLED="false", TWINSTORE_ANOMALY_ENABLED="false", **SMALL_POOL)
        for _ in range(3)
    ]
    workers = [
        IngestProcess(
            own.database_url, own.nats_url, own.nats_prefix, tmp_path, SOURCES, own.partitions
        )
        for _ in range(2)
    ]
    try:
        await asyncio.to_thread(servers[0].start)  # migrates the fresh database
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers[1:]))
        for w in workers:
            w.start()
        await asyncio.gather(*(w.ready() for w in workers))
        yield servers, workers
    finally:
        for proc in [*servers, *workers]:
            proc.kill()


async def test_sigterm_and_kill_mid_load_lose_nothing(
    own_settings: Settings, cluster: tuple[list[ServerProcess], list[IngestProcess]]
) -> None:
    servers, workers = cluster
    url = own_settings.database_url
    assert url is not None and own_settings.nats_url is not None
    run = secrets.token_hex(3)
    http_ns, ingest_ns = f"org.mp{run}", f"org.mpi{run}"
    http_things = [f"{http_ns}:t{i}" for i in range(HTTP_THINGS)]
    telemetry_things = [f"{ingest_ns}:t{i}" for i in range(INGEST_THINGS)]
    command_things = [f"{ingest_ns}:c{i}" for i in range(COMMAND_THINGS)]
    async with httpx.AsyncClient(base_url=servers[0].url, auth=AUTH, timeout=10) as client:
        for thing_id in http_things:
            assert (await client.put(f"/api/2/things/{thing_id}", json={})).status_code == 201
        for thing_id in [*telemetry_things, *command_things]:
            body = {"features": {"t": {"properties": {}}}}
            assert (await client.put(f"/api/2/things/{thing_id}", json=body)).status_code == 201

    live = [s.url for s in servers]
    watchers = [Watcher(s.url, live, http_ns, http_things) for s in servers]
    await asyncio.gather(*(w.ready() for w in watchers))
    nc = await nats.connect(own_settings.nats_url)
    subjects = IngestSubjects(own_settings.nats_prefix, own_settings.partitions)
    telemetry = Publisher(nc, subjects, "ditto-user")
    commands = Publisher(nc, subjects, "ditto-cmd")

    async def send_commands(updates: list[Update]) -> None:
        for u in updates:
            await commands.command(modify(u.thing_id, u.value))

    feeds = [
        Feed(telemetry.values, telemetry_things).start(0.05),
        Feed(send_commands, command_things).start(0.05),
    ]
    writers = Writers(live, http_things)
    terminated, killed = servers[1], servers[2]
    assert terminated.proc is not None and killed.proc is not None and workers[0].proc is not None
    try:
        await wait_for(lambda: writers.count() >= ACKS_BEFORE_KILL, 30, "writes before the kill")
        # A crash is not announced: requests are in flight to the killed server. A SIGTERM'd
        # one's readiness goes down, and the load balancer stops sending to it a little later.
        kill_at = time.monotonic()
        killed.proc.kill()
        live.remove(killed.url)
        terminated.proc.send_signal(signal.SIGTERM)
        workers[0].proc.send_signal(signal.SIGTERM)
        stopped = asyncio.create_task(exit_of(terminated.proc, GRACE))
        await asyncio.sleep(0.3)
        live.remove(terminated.url)
        acked_at_kill = writers.count()
        await wait_for(
            lambda: writers.count() >= acked_at_kill + ACKS_AFTER_KILL, 30, "writes after the kill"
        )
        await asyncio.sleep(max(0.0, kill_at + LOAD_AFTER_KILL - time.monotonic()))
        await wait_for(lambda: all(w.events_after_reconnect for w in watchers[1:]), 15, "clients reconnected")
        exit_code, stopped_at = await stopped
        stopped_in = stopped_at - kill_at
        worker_code = await asyncio.to_thread(workers[0].proc.wait, GRACE)
    finally:
        await writers.stop()
        sent = [await feed.stop() for feed in feeds]
        await nc.close()

    print(
        f"\nacked {writers.count()} HTTP writes ({acked_at_kill} before the kill, {writers.reasons} failed), "
        f"published {sum(len(v) for f in sent for v in f.values())} values; "
        f"server stopped in {stopped_in:.1f} s; "
        f"client connections {[w.connections for w in watchers]}, closes {[w.closes for w in watchers]}"
    )
    # The kill landed mid-load; the SIGTERM'd processes stopped gracefully.
    assert any(t < kill_at for t in writers.acked_at) and any(t > kill_at + 1 for t in writers.acked_at)
    assert exit_code == 0, terminated.logs()[-3000:]
    assert stopped_in < 10, stopped_in
    assert worker_code == 0, workers[0].logs()[-3000:]

    # Every acknowledged HTTP write exactly once, in order; revisions gapless, chains intact.
    con = await asyncpg.connect(url)
    try:
        final: dict[str, int] = {}
        for thing_id in http_things:
            rows = await con.fetch(SELECT_JOURNAL, thing_id)
            verify_chain(rows)
            final[thing_id] = rows[-1]["revision"]
            values = [json.loads(r["value"]) for r in rows if r["path"] == "/attributes/n"]
            assert values == sorted(set(values)), f"{thing_id}: duplicated or out of order: {values}"
            assert set(writers.acked[thing_id]) <= set(values), f"{thing_id}: acknowledged write lost"
            assert set(values) <= set(writers.tried[thing_id])
            assert len(rows) == 1 + len(values)
    finally:
        await con.close()
    # Every acknowledged publish exactly once and in order (the audit verifies the journal).
    await assert_exactly_once_in_order(url, {**sent[0], **sent[1]}, 30)

    # Each client saw every revision of its things from its first event on, live ones in order.
    await wait_for(
        lambda: all(w.last[t] >= final[t] for w in watchers for t in http_things), 15, "clients caught up"
    )
    for w in watchers:
        await w.stop()
    for i, w in enumerate(watchers):
        assert not w.out_of_order, (i, w.out_of_order[:5])
        for thing_id in http_things:
            first = min(w.seen[thing_id])
            missing = set(range(first, final[thing_id] + 1)) - w.seen[thing_id]
            assert not missing, f"client {i} missed {sorted(missing)[:10]} of {thing_id}"
            assert first == 2  # followed from before the first write
    assert watchers[0].connections == 1
    assert watchers[1].connections >= 2 and watchers[1].closes[0] == 1001  # going away
    assert watchers[2].connections >= 2 and watchers[2].closes[0] == 1006  # killed: no close frame
