"""twinstore survives the loss of its PostgreSQL primary (issue 17, "Highly available").

Topology (:class:`tests.ha.postgres.PgPair`): a primary with a synchronous streaming standby,
reached through the multi-host URL ``postgresql://…@primary,standby/db?target_session_attrs=
read-write``; a real ``twinstore serve`` process on it and on the machine's NATS.

Under a load of concurrent HTTP writers, without touching twinstore:

* the primary is killed with SIGKILL (postmaster and all its backends) and the standby promoted;
* the synchronous standby is lost (every commit waits for it) and started again later;
* the primary vanishes without a reset (a :class:`tests.ha.blackhole.BlackHole` between twinstore
  and it swallows everything, as a lost machine or a partition does) and the standby is promoted.

Then:

* every write answered 2xx is in the journal (of the promoted server), with the value it wrote;
* every write answered otherwise got a 503 in Ditto's error format, never a 500, and no request
  took longer than ``REQUEST_BOUND``;
* writes are acknowledged again without restarting twinstore, within ``RECOVERY_BOUND`` of the
  promotion (the time is printed);
* ``/health`` stays 200 throughout (a database failover must not restart the pod); ``/ready``
  says 503 while no writable database answers and 200 again after the promotion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import pytest

from tests.conftest import AUTH, ServerProcess, bounded, eventually, new_thing_id, twinstore_on
from tests.ha.blackhole import BlackHole
from tests.ha.postgres import PgPair
from tests.processes import Publisher
from tests.test_crash import journal_ids, read_stream
from twinstore.bus.ingest import IngestSubjects, Update
from twinstore.bus.streams import delete_streams
from twinstore.bus.subjects import Subjects
from twinstore.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

WRITERS = 12
THINGS = 4
ACKS_BEFORE_KILL = 150
ACKS_AFTER_RECOVERY = 150
REQUEST_BOUND = 20.0  # no request may hang longer than this (s)
RECOVERY_BOUND = 15.0  # from the promotion to the first acknowledged write again (s)
DATABASE_TIMEOUT = 2.0  # database_timeout_seconds of the standby-lost test


class Load:
    """Concurrent writers; remembers every write answered 2xx (by correlation id) and every
    other answer."""

    def __init__(self, url: str, things: list[str]) -> None:
        self.client = httpx.AsyncClient(
            base_url=url,
            auth=AUTH,
            timeout=REQUEST_BOUND + 5,
            limits=httpx.Limits(max_connections=WRITERS),
        )
        self.things = things
        # correlation id -> (thing id, feature property, value, time sent, time answered)
        self.acked: dict[str, tuple[str, str, int, float, float]] = {}
        self.refused: list[tuple[int, dict[str, Any], float]] = []  # status, body, duration
        self.refused_at: dict[str, float] = {}  # correlation id -> time answered
        self.slowest = 0.0
        self.changed = asyncio.Condition()
        self.stop = asyncio.Event()

    async def writer(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            thing_id = self.things[(n + i) % len(self.things)]
            prop = f"w{n}"
            cid = f"ha-{n}-{i}"
            sent = time.monotonic()
            r = await self.client.put(
                f"/api/2/things/{thing_id}/features/f/properties/{prop}",
                json=i,
                headers={"correlation-id": cid},
            )
            took = time.monotonic() - sent
            self.slowest = max(self.slowest, took)
            async with self.changed:
                if 200 <= r.status_code < 300:
                    self.acked[cid] = (thing_id, prop, i, sent, time.monotonic())
                else:
                    self.refused.append((r.status_code, r.json(), took))
                    self.refused_at[cid] = time.monotonic()
                    if r.status_code == 503:
                        await asyncio.sleep(0.05)  # a client backs off a little
                self.changed.notify_all()

    async def wait_for(self, what: str, condition: Any, timeout: float) -> None:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(condition), timeout)
            except TimeoutError:
                raise AssertionError(f"not in {timeout:g} s: {what}") from None


class Probes:
    """Polls /health and /ready and keeps (time, path, status)."""

    def __init__(self, url: str) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=5)
        self.seen: list[tuple[float, str, int]] = []

    async def run(self) -> None:
        while True:
            for path in ("/health", "/ready"):
                try:
                    status = (await self.client.get(path)).status_code
                except httpx.HTTPError:
                    status = 0
                self.seen.append((time.monotonic(), path, status))
            await asyncio.sleep(0.1)

    def statuses(self, path: str, since: float = 0.0, until: float = float("inf")) -> list[int]:
        return [s for t, p, s in self.seen if p == path and since <= t <= until]


async def journal_by_correlation(url: str, ids: list[str]) -> dict[str, tuple[str, str, Any]]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(
            "SELECT correlation_id, id, path, value::text AS value FROM journal "
            "WHERE entity = 'thing' AND correlation_id = any($1::text[])",
            ids,
        )
    finally:
        await con.close()
    return {r["correlation_id"]: (r["id"], r["path"], r["value"]) for r in rows}


@dataclasses.dataclass
class Setup:
    pair: PgPair
    server: ServerProcess
    things: list[str]
    hole: BlackHole | None  # between twinstore and the primary, when asked for
    prefix: str  # twinstore's NATS prefix
    partitions: int


@contextlib.asynccontextmanager
async def pair_and_server(settings: Settings, *, hole: bool = False, **env: str) -> AsyncIterator[Setup]:
    """A synchronous pair, ``twinstore serve`` on its multi-host URL (and NATS, a prefix of its
    own) and THINGS things; with ``hole``, twinstore reaches the primary through a
    :class:`BlackHole`. The logs of both printed when the test fails, all removed after."""
    pair = PgPair()
    server: ServerProcess | None = None
    proxy: BlackHole | None = None
    prefix = f"ha{secrets.token_hex(4)}"
    try:
        await asyncio.to_thread(pair.start)
        await pair.create_database()
        await eventually(lambda: _is_sync(pair), 30, "the standby streaming synchronously")
        if hole:
            proxy = BlackHole("127.0.0.1", pair.primary_port)
            url = pair.url(primary_port=await proxy.start())
        else:
            url = pair.url()
        own = msgspec.structs.replace(settings, database_url=url, nats_prefix=prefix)
        server = ServerProcess(own, TWINSTORE_POOL_SIZE="8", **env)
        await asyncio.to_thread(server.start, 60)
        things = [new_thing_id("org.ha") for _ in range(THINGS)]
        async with httpx.AsyncClient(base_url=server.url, auth=AUTH, timeout=10) as c:
            for thing_id in things:
                r = await c.put(f"/api/2/things/{thing_id}", json={"features": {"f": {"properties": {}}}})
                assert r.status_code == 201, r.text
        yield Setup(pair, server, things, proxy, prefix, own.partitions or 4)
    except BaseException:
        print(pair.logs())
        if server is not None and server.proc is not None:
            print(server.logs()[-20000:])
        raise
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        if proxy is not None:
            await proxy.close()
        await asyncio.to_thread(pair.stop)
        nc = await nats.connect(settings.nats_url)
        with contextlib.suppress(Exception):
            await bounded(delete_streams(nc.jetstream(), prefix), 30, "deleting streams")
        await nc.close()


@contextlib.asynccontextmanager
async def running(load: Load, probes: Probes) -> AsyncIterator[None]:
    """The writers and the probes run inside; stopped (bounded) on the way out."""
    probing = asyncio.create_task(probes.run())
    writers = [asyncio.create_task(load.writer(n)) for n in range(WRITERS)]
    try:
        yield
    finally:
        load.stop.set()
        await bounded(asyncio.gather(*writers, return_exceptions=True), REQUEST_BOUND + 10, "the writers")
        probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probing
        await load.client.aclose()
        await probes.client.aclose()
    for w in writers:
        assert w.exception() is None, f"a writer failed: {w.exception()!r}"


def check_refusals(load: Load) -> None:
    """Every write not acknowledged was answered 503 in Ditto's format, none hung."""
    statuses = sorted({s for s, _, _ in load.refused})
    assert statuses in ([], [503]), f"answers other than 2xx/503: {statuses}: {load.refused[:5]}"
    for _, body, _ in load.refused:
        assert body["status"] == 503 and body["error"] == "things:persistence.unavailable", body
    assert load.slowest <= REQUEST_BOUND, f"a request took {load.slowest:.1f} s"


async def check_acknowledged(load: Load, url: str) -> None:
    """No acknowledged write lost: each is in the journal (of the server ``url`` finds), as written."""
    found = await journal_by_correlation(url, list(load.acked))
    lost = sorted(set(load.acked) - set(found))
    assert not lost, f"{len(lost)} acknowledged writes missing: {lost[:10]}"
    for cid, (thing_id, prop, value, _, _) in load.acked.items():
        assert found[cid] == (thing_id, f"/features/f/properties/{prop}", str(value)), (cid, found[cid])


async def check_workers(setup: Setup, settings: Settings) -> None:
    """The workers reconnected to the promoted server: NATS ingestion applies a new update, and
    the relay has published every journal event, once (Nats-Msg-Id), none the journal lacks."""
    url = setup.pair.url()
    subjects = Subjects(setup.prefix, setup.partitions)
    nc = await nats.connect(settings.nats_url)
    try:
        publisher = Publisher(nc, IngestSubjects(setup.prefix, setup.partitions), "ditto-user")
        thing_id = setup.things[0]
        await publisher.values([Update(thing_id, "/features/f/properties/ingested", 42)])

        async def ingested() -> bool:
            con = await asyncpg.connect(url)
            try:
                return bool(
                    await con.fetchval(
                        "SELECT count(*) FROM journal WHERE entity = 'thing' AND id = $1 AND path = $2",
                        thing_id,
                        "/features/f/properties/ingested",
                    )
                )
            finally:
                await con.close()

        await eventually(ingested, 30, "an update ingested from NATS after the failover", interval=0.2)
        js = nc.jetstream()
        committed = await journal_ids(url)
        published: list[str] = []

        async def caught_up() -> bool:
            published[:] = [
                m for m, _ in await read_stream(js, subjects.events_stream, subjects.events_wildcard)
            ]
            return set(published) >= committed

        await eventually(caught_up, 30, "every journal event published after the failover", interval=0.3)
        assert len(published) == len(set(published)), "duplicate Nats-Msg-Id in the stream"
        assert set(published) == committed, (
            f"events the journal lacks: {sorted(set(published) - committed)[:5]}"
        )
    finally:
        await nc.close()


def first_ack_after(load: Load, instant: float) -> float | None:
    done = [answered for _, _, _, sent, answered in load.acked.values() if sent >= instant]
    return min(done) if done else None


async def promote_and_recover(pair: PgPair, load: Load, probes: Probes) -> float:
    """Promote the standby, then wait until writes are acknowledged again (and go on being)
    and /ready says 200; when the promotion was made."""
    await asyncio.to_thread(pair.promote)
    promoted = time.monotonic()
    acked_at_promotion = len(load.acked)
    await load.wait_for(
        "a write acknowledged after the promotion",
        lambda: first_ack_after(load, promoted) is not None,
        RECOVERY_BOUND + 15,
    )
    await load.wait_for(
        "writes acknowledged after the recovery",
        lambda: len(load.acked) >= acked_at_promotion + ACKS_AFTER_RECOVERY,
        30,
    )
    await eventually(lambda: probes.statuses("/ready")[-1:] == [200], 15, "/ready 200 after the promotion")
    return promoted


async def test_primary_lost_mid_load_standby_promoted_no_acknowledged_write_lost(settings: Settings) -> None:
    async with pair_and_server(settings) as setup:
        pair = setup.pair
        load = Load(setup.server.url, setup.things)
        probes = Probes(setup.server.url)
        async with running(load, probes):
            await load.wait_for(
                "writes acknowledged before the kill", lambda: len(load.acked) >= ACKS_BEFORE_KILL, 30
            )
            killed = time.monotonic()
            await asyncio.to_thread(pair.kill_primary)
            # Detection: readiness goes down while no writable database answers (an operator
            # such as CloudNativePG promotes after its own detection delay; here, at once after).
            await eventually(
                lambda: 503 in probes.statuses("/ready", since=killed), 15, "/ready 503 after the kill"
            )
            promoted = await promote_and_recover(pair, load, probes)
        recovered = first_ack_after(load, promoted)
        assert recovered is not None
        outage = recovered - promoted
        print(
            f"\nfailover: primary killed -> /ready 503 -> promoted in {promoted - killed:.2f} s; "
            f"first write acknowledged {outage:.2f} s after the promotion "
            f"({recovered - killed:.2f} s after the kill); {len(load.acked)} writes acknowledged, "
            f"{len(load.refused)} refused (503); slowest request {load.slowest:.2f} s"
        )
        check_refusals(load)
        assert outage <= RECOVERY_BOUND, f"writes acknowledged again only {outage:.1f} s after the promotion"
        assert set(probes.statuses("/health")) == {200}, probes.statuses("/health")
        await check_acknowledged(load, pair.url())
        await check_workers(setup, settings)
        # The CLIs take the same URL (its first host dead now): the chains verify, the
        # projections match a replay, the journal exports.
        for command in (["audit", "verify"], ["replay", "--all"], ["export", "--all", "--output", "-"]):
            done = await asyncio.to_thread(run_cli, pair.url(), *command)
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
            if command[0] == "export":
                assert len(done.stdout.splitlines()) >= len(load.acked), done.stdout[-500:]


async def test_synchronous_standby_lost_writes_answered_503_in_bounded_time(settings: Settings) -> None:
    """The primary stays, its synchronous standby is lost: PostgreSQL holds every commit until a
    standby confirms it (it has committed locally, but must not be reported as durable). Such a
    write is answered 503 after ``database_timeout_seconds`` (not acknowledged: its outcome is
    unknown), never left hanging; when the standby is back, writes are acknowledged again."""
    async with pair_and_server(settings, TWINSTORE_DATABASE_TIMEOUT_SECONDS=str(DATABASE_TIMEOUT)) as setup:
        pair = setup.pair
        load = Load(setup.server.url, setup.things)
        probes = Probes(setup.server.url)
        async with running(load, probes):
            await load.wait_for(
                "writes acknowledged before the kill", lambda: len(load.acked) >= ACKS_BEFORE_KILL, 30
            )
            await asyncio.to_thread(pair.kill_standby)
            lost = time.monotonic()
            await load.wait_for(
                "every writer answered 503 after the standby's loss",
                lambda: (
                    len({cid.rsplit("-", 1)[0] for cid, at in load.refused_at.items() if at > lost})
                    == WRITERS
                ),
                DATABASE_TIMEOUT * 3 + 10,
            )
            acked_while_lost = [c for c, (*_, sent, _) in load.acked.items() if sent > lost + 0.5]
            restarted = time.monotonic()
            await asyncio.to_thread(pair.start_standby)
            await load.wait_for(
                "a write acknowledged after the standby is back",
                lambda: first_ack_after(load, restarted) is not None,
                RECOVERY_BOUND + 15,
            )
            back = first_ack_after(load, restarted)
            acked_at_back = len(load.acked)
            await load.wait_for(
                "writes acknowledged after the standby is back",
                lambda: len(load.acked) >= acked_at_back + ACKS_AFTER_RECOVERY,
                30,
            )
        assert back is not None
        print(
            f"\nstandby lost: writes answered 503 after {DATABASE_TIMEOUT:g} s (database_timeout_seconds); "
            f"acknowledged again {back - restarted:.2f} s after the standby's restart; "
            f"{len(load.acked)} acknowledged, {len(load.refused)} refused; slowest {load.slowest:.2f} s"
        )
        # A commit sent after the loss cannot have been confirmed by a standby: none acknowledged.
        assert not acked_while_lost, f"acknowledged without a standby: {acked_while_lost[:5]}"
        check_refusals(load)
        assert set(probes.statuses("/health")) == {200}
        await check_acknowledged(load, pair.url())
        await check_workers(setup, settings)


async def test_primary_vanished_without_a_reset_standby_promoted(settings: Settings) -> None:
    """The primary's machine is lost rather than its server crashed: twinstore's connections to
    it go silent (no RST, no FIN; new ones are never answered), as through a network partition.
    The writes in flight are answered 503 after ``database_timeout_seconds`` (their outcome is
    unknown), and after the promotion new connections reach the standby, the second host of the
    URL, because each host gets a connection timeout of its own: asyncpg alone gives the silent
    first host its whole 60 s and never tries the second."""
    async with pair_and_server(
        settings, hole=True, TWINSTORE_DATABASE_TIMEOUT_SECONDS=str(DATABASE_TIMEOUT)
    ) as setup:
        pair, hole = setup.pair, setup.hole
        assert hole is not None
        load = Load(setup.server.url, setup.things)
        probes = Probes(setup.server.url)
        async with running(load, probes):
            await load.wait_for(
                "writes acknowledged before the loss", lambda: len(load.acked) >= ACKS_BEFORE_KILL, 30
            )
            lost = time.monotonic()
            hole.swallow()
            await asyncio.to_thread(pair.kill_primary)
            promoted = await promote_and_recover(pair, load, probes)
        recovered = first_ack_after(load, promoted)
        assert recovered is not None
        outage = recovered - promoted
        print(
            f"\nprimary vanished: first write acknowledged {outage:.2f} s after the promotion "
            f"({recovered - lost:.2f} s after the loss; database_timeout_seconds {DATABASE_TIMEOUT:g}); "
            f"{len(load.acked)} acknowledged, {len(load.refused)} refused (503); "
            f"slowest request {load.slowest:.2f} s"
        )
        check_refusals(load)
        assert outage <= RECOVERY_BOUND, f"writes acknowledged again only {outage:.1f} s after the promotion"
        assert set(probes.statuses("/health")) == {200}, probes.statuses("/health")
        # (read directly: asyncpg alone would wait on the silent first host of twinstore's URL)
        await check_acknowledged(load, pair.url())
        await check_workers(setup, settings)


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return twinstore_on(url, *args, timeout=60)


async def _is_sync(pair: PgPair) -> bool:
    return await pair.sync_state() == "sync"
