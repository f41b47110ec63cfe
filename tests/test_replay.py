"""``twinstore replay`` on real PostgreSQL: an intact projection is OK; tampering is named and repaired.

Things and a policy are written through the HTTP API into the session database, then their
journal and projection rows are copied into a scratch database where the projection is tampered
with (the session database stays intact for the other tests).
"""

from __future__ import annotations

import json
import secrets
import subprocess

import asyncpg
import httpx
import pytest

from tests.conftest import twinstore_on
from tests.test_audit import copy_namespace, make_things, sql
from twinstore.model.partition import partition_of
from twinstore.model.policy import default_policy
from twinstore.replay import Scope, replay_database
from twinstore.settings import Settings
from twinstore.store.schema import stored_partitions

THINGS = "id, revision, created, modified, policy_id, doc, hash"
POLICIES = "id, revision, created, modified, doc, hash, readers"


async def copy_all(settings: Settings, scratch: str, namespace: str) -> None:
    """Journal (via test_audit) plus the projection rows of ``namespace``."""
    await copy_namespace(settings, scratch, namespace)
    assert settings.database_url is not None
    src = await asyncpg.connect(settings.database_url)
    dst = await asyncpg.connect(scratch)
    try:
        partitions = await stored_partitions(dst)  # the scratch database's own count
        for table, columns in (("things", THINGS), ("policies", POLICIES)):
            rows = await src.fetch(
                f"SELECT {columns} FROM {table} WHERE id >= $1 AND id < $2", namespace + ":", namespace + ";"
            )
            marks = ", ".join(f"${i + 1}" for i in range(len(columns.split(", ")) + 1))
            await dst.executemany(
                f"INSERT INTO {table} ({columns}, partition) VALUES ({marks})",
                [(*r, partition_of(r["id"], partitions)) for r in rows],
            )
    finally:
        await src.close()
        await dst.close()


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return twinstore_on(url, "replay", *args, timeout=60)


@pytest.fixture
def namespace() -> str:
    return f"org.replay{secrets.token_hex(4)}"


async def setup(client: httpx.AsyncClient, namespace: str) -> tuple[list[str], str]:
    ids = await make_things(client, namespace, count=3, edits=3)
    policy_id = f"{namespace}:shared"
    r = await client.put(f"/api/2/policies/{policy_id}", json=default_policy(policy_id, "nginx:ditto"))
    assert r.status_code == 201, r.text
    # A deleted thing keeps its projection row (doc NULL): replay must agree with that too.
    r = await client.delete(f"/api/2/things/{ids[2]}")
    assert r.status_code == 204, r.text
    return ids, policy_id


async def test_untouched_projection_is_ok(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    ids, _ = await setup(client, namespace)
    await copy_all(settings, scratch_database, namespace)
    done = run_cli(scratch_database)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and "events/s" in done.stdout
    report = await replay_database(scratch_database, Scope(entity="thing"))
    # 3 things: 4 events each, one more for the deletion.
    assert report.ok and report.entities == 3 and report.events == 13
    assert (await replay_database(scratch_database, Scope(thing=ids[0]))).events == 4
    # The session database, this namespace, through the real command.
    assert settings.database_url is not None
    done = run_cli(settings.database_url, "--namespace", namespace, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["ok"] and data["differences"] == [] and data["events"] >= 13


async def test_tampered_projection_is_named_and_repaired(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    (a, b, c), policy_id = await setup(client, namespace)
    await copy_all(settings, scratch_database, namespace)
    await sql(
        scratch_database,
        f"UPDATE things SET doc = jsonb_set(doc, '{{attributes,n}}', '99') WHERE id = '{a}'",
        f"DELETE FROM things WHERE id = '{b}'",
        # a row in another partition than its id's: readers of the id do not find it there
        f"UPDATE things SET revision = revision + 1, partition = (partition + 1) % 64 WHERE id = '{c}'",
        f"UPDATE policies SET doc = doc - 'entries', readers = '{{}}' WHERE id = '{policy_id}'",
        f"INSERT INTO things ({THINGS}, partition) SELECT '{namespace}:ghost', revision, created, modified,"
        f" policy_id, doc, hash, partition FROM things WHERE id = '{a}'",
    )
    report = await replay_database(scratch_database)
    assert not report.ok
    found = {(d.entity, d.id): d for d in report.differences}
    assert set(found) == {
        ("thing", a),
        ("thing", b),
        ("thing", c),
        ("policy", policy_id),
        ("thing", f"{namespace}:ghost"),
    }
    assert found["thing", a].kind == "mismatch" and found["thing", a].fields == ("doc",)
    assert "/attributes/n" in found["thing", a].detail
    assert found["thing", b].kind == "missing"
    assert found["thing", c].fields == ("revision", "partition")
    assert set(found["policy", policy_id].fields) == {"doc", "readers"}
    assert found["thing", f"{namespace}:ghost"].kind == "extra"

    done = run_cli(scratch_database)
    assert done.returncode == 1, done.stdout + done.stderr
    for entity_id in (a, b, c, policy_id):
        assert entity_id in done.stdout
    done = run_cli(scratch_database, "--json", "--thing", a)
    assert done.returncode == 1
    assert [d["id"] for d in json.loads(done.stdout)["differences"]] == [a]
    assert run_cli(scratch_database, "--entity", "thing", "--namespace", "org.other").returncode == 0

    done = run_cli(scratch_database, "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("REPAIRED") >= 5
    done = run_cli(scratch_database)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (await replay_database(scratch_database)).ok
    con = await asyncpg.connect(scratch_database)
    try:
        assert await con.fetchval("SELECT count(*) FROM things WHERE id = $1", f"{namespace}:ghost") == 0
        assert await con.fetchval("SELECT readers FROM policies WHERE id = $1", policy_id) == ["nginx:ditto"]
        assert await con.fetchval("SELECT policy_id FROM things WHERE id = $1", b) == b
        # one row per id again, in its partition
        placed = await con.fetch("SELECT partition FROM things WHERE id = $1", c)
        assert [r["partition"] for r in placed] == [partition_of(c, await stored_partitions(con))]
    finally:
        await con.close()
