"""``twinstore audit verify`` on real PostgreSQL: untouched chains verify, tampering is named.

Things are written through the HTTP API into the session database, then their journal rows
are copied into a scratch database (appended by its recorder: each row gets its partition and
the next seq there, its stored hash kept) where they are tampered with (the session database
stays intact for the other tests).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Sequence

import asyncpg
import httpx
import pytest

from tests.conftest import new_thing_id, twinstore_on
from twinstore.audit import Report, Scope, verify_database
from twinstore.settings import Settings
from twinstore.store.recorder import Record, Recorder
from twinstore.store.schema import migrate, stored_partitions

COLUMNS = "entity, id, revision, ts, action, path, value, originator, correlation_id, hash"


async def make_things(client: httpx.AsyncClient, namespace: str, count: int = 2, edits: int = 5) -> list[str]:
    ids = []
    for _ in range(count):
        thing_id = new_thing_id(namespace)
        r = await client.put(f"/api/2/things/{thing_id}", json={"attributes": {"n": 0}})
        assert r.status_code == 201, r.text
        for n in range(1, edits + 1):
            r = await client.put(f"/api/2/things/{thing_id}/attributes/n", json=n)
            assert r.status_code == 204, r.text
        ids.append(thing_id)
    return ids


async def append_rows(con: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
    """Append journal rows (:data:`COLUMNS`, in this order) through the recorder of ``con``'s
    database in one transaction: each gets its partition and the next seq there; the stored
    hashes are kept as they are (copies, or tampered rows)."""
    recorder = Recorder(await stored_partitions(con))
    records = [
        Record(
            recorder.partition(r["id"]),
            r["entity"],
            r["id"],
            r["revision"],
            r["ts"],
            r["action"],
            r["path"],
            None if r["value"] is None else r["value"].encode(),
            r["originator"],
            r["correlation_id"],
            None,
            bytes(r["hash"]),
        )
        for r in rows
    ]
    if not records:
        return
    async with con.transaction():
        await recorder.lock(con, {r.partition for r in records})
        await Recorder.append(con, records)


async def copy_namespace(settings: Settings, scratch: str, namespace: str) -> None:
    """Migrate ``scratch`` and copy the journal rows of ``namespace`` into it."""
    assert settings.database_url is not None
    src = await asyncpg.connect(settings.database_url)
    dst = await asyncpg.connect(scratch)
    try:
        rows = await src.fetch(
            f"SELECT {COLUMNS} FROM journal WHERE id >= $1 AND id < $2 ORDER BY position",
            namespace + ":",
            namespace + ";",
        )
        await migrate(dst)
        await append_rows(dst, rows)
    finally:
        await src.close()
        await dst.close()


async def sql(url: str, *statements: str) -> None:
    con = await asyncpg.connect(url)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return twinstore_on(url, "audit", "verify", *args, timeout=60)


def where(thing_id: str, revision: int) -> str:
    return f"entity = 'thing' AND id = '{thing_id}' AND revision = {revision}"


@pytest.fixture
def namespace() -> str:
    return f"org.audit{secrets.token_hex(4)}"


async def test_untouched_store_verifies_ok(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    ids = await make_things(client, namespace, count=3)
    await copy_namespace(settings, scratch_database, namespace)
    done = run_cli(scratch_database, "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
    # 3 things with 6 events each (plus their policies).
    report = await verify_database(scratch_database, Scope(entity="thing"))
    assert report.ok and report.entities == 3 and report.events == 18
    # The session database: this namespace and one thing, through the real command.
    assert settings.database_url is not None
    done = run_cli(settings.database_url, "--namespace", namespace, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["ok"] and data["breaks"] == [] and data["events"] >= 18
    done = run_cli(settings.database_url, "--thing", ids[0], "--json")
    assert json.loads(done.stdout)["events"] == 6 and done.returncode == 0


async def broken(url: str, scope: Scope | None = None) -> Report:
    report = await verify_database(url, scope or Scope())
    assert not report.ok
    return report


async def test_edited_value(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    a, b = await make_things(client, namespace)
    await copy_namespace(settings, scratch_database, namespace)
    await sql(scratch_database, f"""UPDATE journal SET value = '99' WHERE {where(a, 3)}""")
    report = await broken(scratch_database)
    assert [(x.id, x.revision, x.kind) for x in report.breaks] == [(a, 3, "edited")]
    assert report.broken_entities == 1
    done = run_cli(scratch_database, "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["breaks"] == [
        {"entity": "thing", "id": a, "revision": 3, "kind": "edited", "detail": report.breaks[0].detail}
    ]
    done = run_cli(scratch_database)
    assert done.returncode == 1 and f"thing {a} revision 3: edited" in done.stdout
    # Scope: the other thing, and only policies, still verify.
    assert run_cli(scratch_database, "--thing", b).returncode == 0
    assert run_cli(scratch_database, "--entity", "policy").returncode == 0
    assert (await verify_database(scratch_database, Scope(thing=b))).ok


async def test_edited_last_event_and_metadata(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    (a,) = await make_things(client, namespace, count=1)
    await copy_namespace(settings, scratch_database, namespace)
    await sql(
        scratch_database,
        f"UPDATE journal SET originator = 'nginx:mallory' WHERE {where(a, 2)}",
        f"UPDATE journal SET value = '42' WHERE {where(a, 6)}",
    )
    report = await broken(scratch_database)
    assert [(x.id, x.revision, x.kind) for x in report.breaks] == [(a, 2, "edited"), (a, 6, "mismatch")]


async def test_deleted_middle_event(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    a, _ = await make_things(client, namespace)
    await copy_namespace(settings, scratch_database, namespace)
    await sql(scratch_database, f"DELETE FROM journal WHERE {where(a, 4)}")
    report = await broken(scratch_database)
    assert [(x.id, x.revision, x.kind) for x in report.breaks] == [(a, 4, "missing")]
    assert "revision 4 is missing" in report.breaks[0].detail
    done = run_cli(scratch_database, "--namespace", namespace)
    assert done.returncode == 1 and f"thing {a} revision 4: missing" in done.stdout
    assert run_cli(scratch_database, "--namespace", "org.other").returncode == 0


async def test_swapped_revisions(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    a, _ = await make_things(client, namespace)
    await copy_namespace(settings, scratch_database, namespace)
    await sql(
        scratch_database,
        f"UPDATE journal SET revision = -1 WHERE {where(a, 2)}",
        f"UPDATE journal SET revision = 2 WHERE {where(a, 3)}",
        f"UPDATE journal SET revision = 3 WHERE {where(a, -1)}",
    )
    report = await broken(scratch_database)
    assert [(x.id, x.revision, x.kind) for x in report.breaks] == [(a, 2, "reordered"), (a, 3, "reordered")]
    assert "written as revision 3" in report.breaks[0].detail
    assert "written as revision 2" in report.breaks[1].detail


async def test_inserted_events(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    a, b = await make_things(client, namespace)
    await copy_namespace(settings, scratch_database, namespace)
    await sql(
        scratch_database,
        # a: a copy of revision 2 appended as revision 7 (same hash).
        f"INSERT INTO journal (partition, seq, {COLUMNS}) SELECT partition, seq + 1000000, entity, id, 7,"
        f" ts, action, path, value, originator, correlation_id, hash FROM journal WHERE {where(a, 2)}",
        # b: an event inserted at revision 3, the later ones renumbered.
        f"UPDATE journal SET revision = -revision WHERE entity = 'thing' AND id = '{b}' AND revision >= 3",
        f"UPDATE journal SET revision = 1 - revision WHERE entity = 'thing' AND id = '{b}' AND revision < 0",
        f"INSERT INTO journal (partition, seq, {COLUMNS}) SELECT partition, seq + 1000000, entity, id,"
        f" 3, ts, action, '/attributes/n', '7', originator, correlation_id, sha256('forged')"
        f" FROM journal WHERE {where(b, 2)}",
    )
    report = await broken(scratch_database, Scope(thing=a))
    assert [(x.id, x.revision, x.kind) for x in report.breaks] == [(a, 7, "duplicated")]
    assert "copy of revision 2" in report.breaks[0].detail
    report = await broken(scratch_database, Scope(thing=b))
    assert (b, 3, "inserted") == (report.breaks[0].id, report.breaks[0].revision, report.breaks[0].kind)
    assert {x.kind for x in report.breaks[1:]} == {"reordered"}
    done = run_cli(scratch_database, "--all")
    assert done.returncode == 1
    assert f"thing {a} revision 7: duplicated" in done.stdout
    assert f"thing {b} revision 3: inserted" in done.stdout
