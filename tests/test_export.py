"""``twinstore export`` / ``twinstore import`` on real PostgreSQL: a round trip that verifies.

Things (several revisions, one deleted) and a policy are written through the HTTP API into the
session database, exported by namespace with the real command, imported into a scratch
database, where `audit verify` and `replay` are OK and the things' documents equal the originals.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import twinstore_on
from tests.test_audit import make_things
from twinstore.model.policy import default_policy
from twinstore.settings import Settings
from twinstore.store.recorder import Recorder
from twinstore.store.schema import stored_partitions


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return twinstore_on(url, *args)


@pytest.fixture
def namespace() -> str:
    return f"org.export{secrets.token_hex(4)}"


async def docs(url: str, namespace: str) -> dict[str, object]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(
            "SELECT id, revision, doc::text AS doc, hash FROM things WHERE id >= $1 AND id < $2",
            namespace + ":",
            namespace + ";",
        )
        return {r["id"]: (r["revision"], r["doc"] and json.loads(r["doc"]), bytes(r["hash"])) for r in rows}
    finally:
        await con.close()


async def test_export_import_round_trip(
    client: httpx.AsyncClient,
    settings: Settings,
    scratch_database: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    ids = await make_things(client, namespace, count=3, edits=3)
    policy_id = f"{namespace}:shared"
    r = await client.put(f"/api/2/policies/{policy_id}", json=default_policy(policy_id, "nginx:ditto"))
    assert r.status_code == 201, r.text
    r = await client.delete(f"/api/2/things/{ids[2]}")
    assert r.status_code == 204, r.text
    assert settings.database_url is not None

    path = tmp_path / "export.ndjson"
    done = run_cli(settings.database_url, "export", "--namespace", namespace, "--output", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # 3 things with 4 events each, one deletion, the policy (and each thing's own policy).
    keys = [(x["_audit"]["entity"], x["_audit"]["id"], x["_audit"]["revision"]) for x in lines]
    assert keys == sorted(keys)
    things = [x for x in lines if x["_audit"]["entity"] == "thing"]
    assert len(things) == 13
    first = things[0]
    assert first["topic"].startswith(namespace.replace(":", "/") + "/")
    assert first["topic"].endswith("/things/twin/events/created")
    assert json.loads(first["_audit"]["value"]) == first["value"]
    assert len(bytes.fromhex(first["_audit"]["hash"])) == 32
    assert any(x["_audit"]["id"] == policy_id and "/policies/events/" in x["topic"] for x in lines)
    # stdout output and a scope of one thing.
    done = run_cli(settings.database_url, "export", "--thing", ids[0])
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 4

    done = run_cli(scratch_database, "import", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and f"{len(lines)} events" in done.stdout

    done = run_cli(scratch_database, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_cli(scratch_database, "replay")
    assert done.returncode == 0, done.stdout + done.stderr
    imported = await docs(scratch_database, namespace)
    assert imported == await docs(settings.database_url, namespace)
    assert imported[ids[2]][1] is None and len(imported) == 3
    await check_partitions(scratch_database, keys)

    # A second import into the now non-empty store is refused and writes nothing.
    done = run_cli(scratch_database, "import", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not empty" in done.stderr
    assert await docs(scratch_database, namespace) == imported


async def check_partitions(url: str, keys: list[tuple[str, str, int]]) -> None:
    """Each imported event in its entity's partition, each partition numbered 1..n in the file's
    order (so each entity's events in revision order), its head at n."""
    con = await asyncpg.connect(url)
    try:
        recorder = Recorder(await stored_partitions(con))
        rows = await con.fetch(
            "SELECT partition, seq, entity, id, revision FROM journal ORDER BY partition, seq"
        )
        heads = dict(await con.fetch("SELECT partition, seq FROM partition_heads"))
    finally:
        await con.close()
    expected: dict[int, list[tuple[str, str, int]]] = {}
    for key in keys:
        expected.setdefault(recorder.partition(key[1]), []).append(key)
    placed: dict[int, list[tuple[str, str, int]]] = {}
    for r in rows:
        assert r["seq"] == len(placed.setdefault(r["partition"], [])) + 1
        placed[r["partition"]].append((r["entity"], r["id"], r["revision"]))
    assert placed == expected
    assert {p: s for p, s in heads.items() if s} == {p: len(k) for p, k in expected.items()}
