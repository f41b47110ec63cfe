"""One partition function and one count for the whole system (real PostgreSQL and NATS).

A thing lives in partition ``partition_of(thingId, P)`` end to end, P being the database's
stored count: the ingest subject and consumer that apply its telemetry, the journal partition
that numbers its events, the relay partition that publishes them, the events subject they go
to and the anomaly scorer that reads that subject. Settings that named two other counts are
refused by name; an ingest row on the subject of another partition is refused alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import orjson
import pytest

from tests.api.helpers import create
from tests.conftest import ROOT, eventually, new_thing_id
from tests.test_ingest import Source, property_values
from twinstore.bus.ingest import TELEMETRY_TYPE, Update
from twinstore.bus.relay import PARTITION_HEADER
from twinstore.model.partition import partition_of
from twinstore.runtime import Runtime
from twinstore.settings import Settings, load_settings
from twinstore.store.schema import stored_partitions

pytestmark = pytest.mark.asyncio(loop_scope="session")

PATH = "/features/flow/properties/value"


def thing_in(partition: int, partitions: int, prefix: str = "org.onepart") -> str:
    """A new thing id of ``partition``."""
    while True:
        thing_id = new_thing_id(prefix)
        if partition_of(thing_id, partitions) == partition:
            return thing_id


async def test_every_part_uses_the_databases_count(runtime: Runtime, settings: Settings) -> None:
    con = await asyncpg.connect(settings.database_url)
    try:
        stored = await stored_partitions(con)
    finally:
        await con.close()
    assert stored == settings.partitions == 4  # tests/conftest.py
    assert runtime.recorder is not None and runtime.recorder.partitions == stored
    assert runtime.subjects.partitions == runtime.ingest_subjects.partitions == stored
    assert runtime.ingest is not None and runtime.ingest.subjects.partitions == stored
    assert runtime.anomaly is not None and runtime.anomaly.subjects.partitions == stored
    assert runtime.relay is not None and runtime.relay.subjects.partitions == stored


async def test_a_thing_lives_in_one_partition_end_to_end(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    """Ingest subject and consumer, journal partition, relay partition and events subject of a
    thing are one partition."""
    partitions = runtime.subjects.partitions
    thing_id = new_thing_id("org.onepart")
    p = partition_of(thing_id, partitions)
    await create(client, thing_id, {"features": {"flow": {"properties": {}}}})
    nc = await nats.connect(settings.nats_url)
    seen: list[tuple[str, dict[str, str]]] = []

    async def on_event(msg: Any) -> None:
        if (msg.headers or {}).get("Ditto-Thing-Id") == thing_id:
            seen.append((msg.subject, dict(msg.headers or {})))

    sub = await nc.subscribe(runtime.subjects.events_wildcard, cb=on_event)
    try:
        (sent,) = await Source(runtime, "ditto-user").values([Update(thing_id, PATH, 7.5)])
        assert sent.subject == runtime.ingest_subjects.partition_subject(p)

        async def applied() -> bool:
            return await property_values(settings, thing_id, PATH) == [7.5]

        await eventually(applied, 20, "the telemetry row applied")
        await eventually(lambda: len(seen) >= 1, 20, "the event published")
    finally:
        await sub.unsubscribe()
        await nc.close()
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await con.fetch("SELECT partition FROM journal WHERE id = $1", thing_id)
        journal = {r["partition"] for r in rows}
        consumer = f"{runtime.ingest_subjects.stream}/{p}"
        progressed = await con.fetchval(
            "SELECT seq FROM ingest_progress WHERE consumer = $1 AND source = ''", consumer
        )
    finally:
        await con.close()
    assert journal == {p}
    assert progressed is not None and progressed > 0  # the ingest consumer of partition p applied it
    subject, headers = seen[-1]
    assert subject == f"{settings.nats_prefix}.events.{p}"  # what the scorer of partition p reads
    assert headers[PARTITION_HEADER] == str(p)  # published by the relay of journal partition p


async def test_a_row_on_another_partitions_subject_is_refused_alone(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings, ingest_reports: list[dict[str, Any]]
) -> None:
    """A publisher counting partitions differently puts a thing on another partition's subject:
    that row is refused (it would make the unit span journal partitions and be applied out of
    order with the thing's own subject), the others of the message are applied."""
    partitions = runtime.ingest_subjects.partitions
    here = thing_in(0, partitions)
    elsewhere = thing_in(1, partitions)
    for thing_id in (here, elsewhere):
        await create(client, thing_id, {"features": {"flow": {"properties": {}}}})
    source = Source(runtime, "ditto-user")
    seq = source.seq
    source.seq += 1
    assert runtime.nc is not None
    payload = orjson.dumps({"updates": [[here, PATH, 1], [elsewhere, PATH, 2], [here, PATH, 3]]})
    headers = {"Twinstore-Source": "ditto-user", "Twinstore-Seq": str(seq), "Content-Type": TELEMETRY_TYPE}
    headers["Nats-Msg-Id"] = f"ditto-user:{seq}"
    subject = runtime.ingest_subjects.partition_subject(0)
    await runtime.nc.jetstream().publish(subject, payload, headers=headers)

    def reported() -> list[dict[str, Any]]:
        return [r for r in ingest_reports if r["thingId"] == elsewhere]

    async def done() -> bool:
        return await property_values(settings, here, PATH) == [1, 3] and bool(reported())

    await eventually(done, 20, "the rows of the subject's partition applied, the other refused")
    (report,) = reported()
    assert report["row"] == 1
    assert report["error"]["status"] == 400
    assert report["error"]["error"] == "ingest:thing.wrongPartition"
    assert f"partition 1 of {partitions}" in report["reason"], report
    assert await property_values(settings, elsewhere, PATH) == []


# ---- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("old", ["event_partitions", "ingest_partitions"])
async def test_a_replaced_setting_is_refused_naming_partitions(old: str, tmp_path: Path) -> None:
    config = tmp_path / "twinstore.toml"
    config.write_text(f"{old} = 16\n")
    variable = f"TWINSTORE_{old.upper()}"
    for where, call in (
        (f"the config file {config}", lambda: load_settings({}, config_file=config)),
        (f"the environment variable {variable}", lambda: load_settings({variable: "16"})),
        ("the options", lambda: load_settings({}, **{old: 16})),
    ):
        with pytest.raises(SystemExit) as refused:
            call()
        message = str(refused.value)
        assert f"{old} (named in {where}) is replaced by `partitions`" in message, message
        assert "Upgrading: one partition count" in message  # the README's note
    assert load_settings({}).partitions is None  # unset: the database's count


async def test_the_subjects_are_known_once_the_database_is(settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="the database's partition count"):
        _ = Runtime(settings).subjects


def _migrate(database_url: str, partitions: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TWINSTORE_DATABASE_URL": database_url, "TWINSTORE_PARTITIONS": str(partitions)}
    return subprocess.run(
        [sys.executable, "-m", "twinstore.cli", "migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_migrate_places_the_setting_and_refuses_another(scratch_database: str) -> None:
    """`twinstore migrate` (the Helm chart's hook Job) gives a new database the `partitions`
    setting's count; with another count afterwards it stops with one line, exit status 2."""
    done = await asyncio.to_thread(_migrate, scratch_database, 8)
    assert done.returncode == 0, done.stderr
    con = await asyncpg.connect(scratch_database)
    try:
        assert await stored_partitions(con) == 8
    finally:
        await con.close()
    done = await asyncio.to_thread(_migrate, scratch_database, 16)
    assert done.returncode == 2, done.stderr
    assert "the database was created with 8 partitions" in done.stderr
    assert "Traceback" not in done.stderr
