"""NATS ingestion end to end: adapters' messages on JetStream -> journal events (real PostgreSQL, NATS).

The session runtime runs an ingest worker (tests/conftest.py: sources ``plc`` and ``ditto-user``);
messages are published as adapters do (``twinstore.bus.ingest``) and checked in the journal.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import nats.js.errors
import orjson
import pytest

from tests.api.helpers import create, url
from tests.conftest import bounded, cancel_and_wait, new_thing_id
from twinstore.audit import Scope, verify_database
from twinstore.bus.ingest import (
    COMMAND_TYPE,
    IngestSubjects,
    OutgoingMessage,
    Update,
    command_message,
    initial_seq,
    telemetry_messages,
)
from twinstore.ingest import IngestWorker
from twinstore.runtime import Runtime
from twinstore.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

SELECT_VALUES = """
SELECT revision, action, path, value::text AS value, originator, headers
FROM journal WHERE entity = 'thing' AND id = $1 ORDER BY revision
"""


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


class Source:
    """Publishes like an adapter: one source name, growing sequence numbers."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        assert runtime.nc is not None
        self.js = runtime.nc.jetstream()
        self.subjects: IngestSubjects = runtime.ingest_subjects
        self.name = name
        self.seq = initial_seq()

    async def send(self, messages: list[OutgoingMessage]) -> None:
        for m in messages:
            await self.js.publish(m.subject, m.payload, headers=m.headers)

    async def values(self, updates: list[Update]) -> list[OutgoingMessage]:
        messages = telemetry_messages(self.subjects, self.name, self.seq, updates)
        self.seq += len(messages)
        await self.send(messages)
        return messages

    async def command(self, envelope: dict[str, Any]) -> OutgoingMessage:
        message = command_message(self.subjects, self.name, self.seq, envelope)
        self.seq += 1
        await self.send([message])
        return message


async def journal_rows(settings: Settings, thing_id: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(settings.database_url)
    try:
        return list(await con.fetch(SELECT_VALUES, thing_id))
    finally:
        await con.close()


async def property_values(settings: Settings, thing_id: str, path: str) -> list[Any]:
    return [orjson.loads(r["value"]) for r in await journal_rows(settings, thing_id) if r["path"] == path]


async def test_telemetry_batch_lands_with_source_timestamp_and_quality(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    things = [new_thing_id("org.ingest") for _ in range(6)]
    for t in things:
        await create(client, t, {"features": {"flow": {"properties": {}}}})
    source = Source(runtime, "ditto-user")
    ts = 1_767_225_600_123  # 2026-01-01T00:00:00.123Z
    rows = [Update(t, "/features/flow/properties/value", i * 1.5, ts, "Good") for i, t in enumerate(things)]
    rows.append(Update(things[0], "/features/flow/properties/unit", "m3/h"))
    messages = await source.values(rows)
    assert len(messages) >= 2  # six things spread over the partitions

    async def landed() -> bool:  # the things' messages travel on different partitions
        r = await client.get(url(things[0], "/features/flow/properties"))
        if r.status_code != 200 or r.json() != {"value": 0.0, "unit": "m3/h"}:
            return False
        for i, t in enumerate(things):
            r = await client.get(url(t, "/features/flow/properties/value"))
            if r.status_code != 200 or r.json() != i * 1.5:
                return False
        return True

    await eventually(landed)
    rows0 = await journal_rows(settings, things[0])
    value_event = next(r for r in rows0 if r["path"] == "/features/flow/properties/value")
    assert value_event["action"] == "merged"
    assert value_event["originator"] == "nginx:ditto"
    headers = value_event["headers"]
    headers = orjson.loads(headers) if isinstance(headers, str) else headers
    assert headers["source"] == "ditto-user"
    assert headers["source-timestamp"] == "2026-01-01T00:00:00.123Z"
    assert headers["source-quality"] == "Good"
    sent = next(m for m in messages if m.subject == runtime.ingest_subjects.subject(things[0]))
    assert headers["source-seq"] == sent.headers["Twinstore-Seq"]
    # ... readable through history, and the chain (which hashes the headers) verifies
    r = await client.get(url(things[0]), params={"at-historical-revision": str(value_event["revision"])})
    assert r.status_code == 200
    historical = orjson.loads(r.headers["historical-headers"])
    assert historical["source-timestamp"] == "2026-01-01T00:00:00.123Z"
    assert historical["source-quality"] == "Good"
    report = await verify_database(settings.database_url or "", checkpoints="none")
    assert report.ok, report.breaks


async def test_ditto_protocol_commands_in_order_within_one_batch(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    thing_id = new_thing_id("org.ingest")
    ns, name = thing_id.split(":")
    source = Source(runtime, "ditto-user")
    # create, then writes to the new thing, then delete and re-create: one fetch, several units
    await source.command(
        {"topic": f"{ns}/{name}/things/twin/commands/create", "path": "/", "value": {"attributes": {"a": 1}}}
    )
    for i in range(5):
        await source.command(
            {"topic": f"{ns}/{name}/things/twin/commands/modify", "path": "/attributes/a", "value": i}
        )
    await source.command(
        {"topic": f"{ns}/{name}/things/twin/commands/merge", "path": "/attributes", "value": {"b": True}}
    )

    async def done() -> bool:
        r = await client.get(url(thing_id, "/attributes"))
        return r.status_code == 200 and r.json() == {"a": 4, "b": True}

    await eventually(done)
    rows = await journal_rows(settings, thing_id)
    assert [r["action"] for r in rows] == ["created"] + ["modified"] * 5 + ["merged"]
    assert [orjson.loads(r["value"]) for r in rows[1:6]] == [0, 1, 2, 3, 4]


async def test_poison_messages_are_reported_and_neighbours_land(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings, ingest_reports: list[dict[str, Any]]
) -> None:
    thing_id = new_thing_id("org.ingest")
    await create(client, thing_id, {"features": {"t": {"properties": {"v": 0}}}})
    ns, name = thing_id.split(":")
    good = Source(runtime, "ditto-user")
    subject = runtime.ingest_subjects.subject(thing_id)
    assert runtime.nc is not None
    js = runtime.nc.jetstream()
    path = "/features/t/properties/v"
    await good.values([Update(thing_id, path, 1)])
    # 1. not JSON at all
    await js.publish(
        subject, b"\x00garbage{", headers={"Content-Type": COMMAND_TYPE, "Twinstore-Source": "plc"}
    )
    await good.values([Update(thing_id, path, 2)])
    # 2. a telemetry batch with one invalid thing id among good rows
    await good.values([Update("no-namespace", path, 99), Update(thing_id, path, 3)])
    # 3. a source that is not configured (and no default subjects)
    stranger = Source(runtime, "stranger")
    await stranger.values([Update(thing_id, path, 98)])
    # 4. a configured source the thing's policy does not let write
    plc = Source(runtime, "plc")
    await plc.values([Update(thing_id, path, 97)])
    # 5. a failed precondition
    await good.command(
        {
            "topic": f"{ns}/{name}/things/twin/commands/modify",
            "path": path,
            "headers": {"if-match": '"rev:1"'},
            "value": 96,
        }
    )
    # 6. a command that is not a write
    await good.command({"topic": f"{ns}/{name}/things/twin/commands/retrieve", "path": "/"})
    await good.values([Update(thing_id, path, 4)])

    async def landed() -> bool:
        return await property_values(settings, thing_id, path) == [1, 2, 3, 4] and len(ingest_reports) >= 6

    await eventually(landed)
    await asyncio.sleep(0.3)  # an assertion of absence: no refused row lands late
    assert await property_values(settings, thing_id, path) == [1, 2, 3, 4]
    codes = sorted(e["error"]["error"] for e in ingest_reports)
    assert codes == sorted(
        [
            "json.invalid",
            "things:id.invalid",
            "ingest:source.unknown",
            "things:thing.notfound",  # plc may not even read it: refused as absent, as Ditto
            "things:precondition.failed",
            "protocoladapter:unknown.topicpath",
        ]
    ), ingest_reports
    row_report = next(e for e in ingest_reports if e["error"]["error"] == "things:id.invalid")
    assert row_report["row"] == 0 and row_report["source"] == "ditto-user" and row_report["sequence"] > 0
    assert all(e["stream"] == runtime.ingest_subjects.stream and e["reason"] for e in ingest_reports)


async def test_duplicates_are_applied_once(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    thing_id = new_thing_id("org.ingest")
    await create(client, thing_id, {"features": {"t": {"properties": {"v": 0}}}})
    path = "/features/t/properties/v"
    source = Source(runtime, "ditto-user")
    first = await source.values([Update(thing_id, path, 1)])
    await source.send(first)  # same Nats-Msg-Id: JetStream drops it
    # the same source sequence under a new message id (a republish after the duplicate window)
    late = [
        OutgoingMessage(m.subject, {**m.headers, "Nats-Msg-Id": f"again-{secrets.token_hex(4)}"}, m.payload)
        for m in first
    ]
    await source.send(late)
    await source.values([Update(thing_id, path, 2)])

    async def landed() -> bool:
        return (await property_values(settings, thing_id, path))[-1:] == [2]

    await eventually(landed)
    await asyncio.sleep(0.3)  # an assertion of absence: no duplicate lands late
    assert await property_values(settings, thing_id, path) == [1, 2]


async def test_many_values_of_one_thing_keep_their_order(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    thing_id = new_thing_id("org.ingest")
    await create(client, thing_id, {"features": {"t": {"properties": {"v": -1}}}})
    path = "/features/t/properties/v"
    source = Source(runtime, "ditto-user")
    for start in range(0, 1500, 50):  # many messages, several fetches
        await source.values([Update(thing_id, path, i) for i in range(start, start + 50)])

    async def landed() -> bool:
        return len(await property_values(settings, thing_id, path)) == 1500

    await eventually(landed, 30)
    assert await property_values(settings, thing_id, path) == list(range(1500))


async def test_workers_share_partitions_and_a_stopped_one_loses_nothing(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    """A second member takes half the partitions; stopping it mid-stream hands them back, and
    every value is in the journal exactly once, in order."""
    assert runtime.ingest is not None and runtime.service is not None and runtime.pool is not None
    assert runtime.nc is not None
    things = [new_thing_id("org.ingest") for _ in range(8)]
    for t in things:
        await create(client, t, {"features": {"t": {"properties": {"v": -1}}}})
    database_url = settings.database_url or ""
    second = IngestWorker(
        runtime.nc,
        runtime.service,
        runtime.ingest_subjects,
        connect=lambda: asyncpg.connect(database_url),
        pool=runtime.pool,
        sources=settings.ingest_sources,
        default_subjects=[],
        batch=20,
    )
    second.start()
    try:

        async def shared() -> bool:
            return len(second.partitions) == 2 and len(runtime.ingest.partitions) == 2  # type: ignore[union-attr]

        await eventually(shared, 15)
        source = Source(runtime, "ditto-user")
        path = "/features/t/properties/v"

        async def publish(start: int, stop: int) -> None:
            for i in range(start, stop):
                await source.values([Update(t, path, i) for t in things])

        await publish(0, 100)
        await second.stop()  # in the middle of the stream: its batch in flight is committed first
        await publish(100, 200)

        async def landed() -> bool:
            return all([len(await property_values(settings, t, path)) >= 200 for t in things])

        await eventually(landed, 30)
        for t in things:
            assert await property_values(settings, t, path) == list(range(200))
    finally:
        await bounded(second.stop(), 30, "stopping the second ingest worker")

    async def reclaimed() -> bool:
        return len(runtime.ingest.partitions) == 4  # type: ignore[union-attr]

    await eventually(reclaimed, 15)


async def test_database_connections_killed_while_ingesting(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    """Every connection of the database terminated again and again: ingestion pauses and
    resumes, every value lands exactly once and in order."""
    things = [new_thing_id("org.ingest") for _ in range(4)]
    for t in things:
        await create(client, t, {"features": {"t": {"properties": {"v": -1}}}})
    path = "/features/t/properties/v"
    source = Source(runtime, "ditto-user")
    admin = await asyncpg.connect(settings.database_url)
    database = await admin.fetchval("SELECT current_database()")

    async def killer() -> None:
        while True:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
            await asyncio.sleep(0.15)

    kill = asyncio.create_task(killer())
    try:
        for i in range(300):
            await source.values([Update(t, path, i) for t in things])
            await asyncio.sleep(0.005)
    finally:
        await cancel_and_wait(kill)
        await bounded(admin.close(), 10, "closing the admin connection")

    async def landed() -> bool:
        try:
            return all([len(await property_values(settings, t, path)) >= 300 for t in things])
        except (OSError, asyncpg.PostgresError):
            return False

    await eventually(landed, 60)
    for t in things:
        assert await property_values(settings, t, path) == list(range(300))


async def test_ingest_stream_has_exactly_the_partition_subjects(runtime: Runtime) -> None:
    """A publisher with another partition count gets an error instead of an unread subject."""
    assert runtime.nc is not None
    js = runtime.nc.jetstream()
    info = await js.stream_info(runtime.ingest_subjects.stream)
    assert sorted(info.config.subjects or []) == sorted(runtime.ingest_subjects.all_subjects)
    wrong = IngestSubjects(runtime.ingest_subjects.prefix, 64)
    subject = wrong.partition_subject(63)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await js.publish(subject, b"{}", timeout=1)


async def test_ingested_headers_survive_export_and_import(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings, scratch_database: str, tmp_path: Any
) -> None:
    """The kept headers are part of the hashed row: an export -> import round trip keeps them
    (the imported chains verify) and the exported envelopes show them."""
    from twinstore.export import export_database, import_database

    # A namespace of its own, exported alone: an import verifies every chain it is given, and other
    # tests of the session leave theirs in any state (retention's cleaned-up things, say).
    namespace = f"org.ingest{secrets.token_hex(4)}"
    thing_id = new_thing_id(namespace)
    await create(client, thing_id, {"features": {"t": {"properties": {"v": 0}}}})
    source = Source(runtime, "ditto-user")
    await source.values([Update(thing_id, "/features/t/properties/v", 7, 1_767_225_600_000, "Uncertain")])

    async def landed() -> bool:
        return await property_values(settings, thing_id, "/features/t/properties/v") == [7]

    await eventually(landed)
    out = tmp_path / "export.ndjson"
    with out.open("wb") as fh:
        exported = await export_database(settings.database_url or "", fh, Scope(namespace=namespace))
    assert exported.entities == 2  # the thing and its policy
    lines = out.read_bytes().splitlines()
    mine = [orjson.loads(line) for line in lines if thing_id.replace(":", "/", 1) in line.decode()]
    ingested = next(e for e in mine if e["path"] == "/features/t/properties/v")
    assert ingested["headers"]["source-quality"] == "Uncertain"
    assert ingested["_audit"]["headers"]["source-timestamp"] == "2026-01-01T00:00:00.000Z"
    report = await import_database(scratch_database, lines)
    assert report.audit is not None and report.audit.ok, report.audit
    assert report.replay is not None and report.replay.ok
    con = await asyncpg.connect(scratch_database)
    try:
        kept = await con.fetchval(
            "SELECT headers::text FROM journal WHERE id = $1 AND path = '/features/t/properties/v'", thing_id
        )
    finally:
        await con.close()
    assert orjson.loads(kept)["source-quality"] == "Uncertain"
