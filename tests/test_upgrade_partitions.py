"""Upgrade in place to the partitioned journal (issue 17): a database built by the code before
partitions migrates without losing or reordering anything.

The previous code is taken from git (:data:`BEFORE`, the commit before the partitioned journal),
unpacked into the test's temporary folder and run in a subprocess (``PYTHONPATH`` first, so
its ``twinstore`` shadows this checkout's) with this venv's interpreter: it migrates a scratch
database to its schema (migrations 1..14) and fills it through its own stores - things with
snapshots, policies, ingest progress, anomaly labels, two signed audit checkpoints, a history
cleanup and a relay cursor in the middle of the journal. Then this code migrates it and the
test compares every row with what the old code left; the tables that got a partition in their
key (migration 17: projection, snapshots, policies, anomaly tables, ingest progress) hold the
partition their writers compute.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.conftest import ROOT, drop_database, fresh_database, require, twinstore_on, with_database
from twinstore.anomaly.store import label_anomaly
from twinstore.model.partition import DEFAULT_PARTITIONS, partition_key, partition_of
from twinstore.model.thing import Modify
from twinstore.runtime import create_pool
from twinstore.store.codec import chain_hash
from twinstore.store.journal import Journal, WriteRequest
from twinstore.store.recorder import Recorder
from twinstore.store.schema import PartitionsMismatchError, migrate, stored_partitions

# The parent of the first commit of the partitioned journal: schema version 14, one global
# `position` in commit order, relay_cursor(name, position).
BEFORE = "2c95477"
OLD_VERSION = 14

NAMESPACE = "org.upgrade"
THINGS = 10

# Run by the previous code (its twinstore first on the path). Prints a JSON summary.
OLD_SCRIPT = """
import asyncio, json, sys
from datetime import UTC, datetime

import asyncpg

import twinstore
from twinstore.anomaly.store import INSERT_ANOMALY, label_anomaly
from twinstore.audit import Scope, checkpoint_database, verify_database
from twinstore.model.policy import PolicyModify, decide_policy
from twinstore.model.thing import Delete, Modify
from twinstore.replay import replay_database
from twinstore.retention import cleanup_database
from twinstore.runtime import create_pool
from twinstore.store.journal import Journal, Mark, WriteRequest
from twinstore.store.policies import PolicyStore
from twinstore.store.schema import migrate

URL, KEY, NS, THINGS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
THING_IDS = [f"{NS}:thing-{i}" for i in range(THINGS)]
POLICY_IDS = [f"{NS}:policy-{k}" for k in range(3)]


def policy(subject):
    return {"entries": {"owner": {
        "subjects": {subject: {"type": "test"}},
        "resources": {"thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                      "policy:/": {"grant": ["READ", "WRITE"], "revoke": []}},
    }}}


async def put_policy(store, policy_id, parts, value):
    def decide(before, now):
        return decide_policy(before, PolicyModify(parts=parts, value=value), now, originator="nginx:admin")
    await store.write(policy_id, decide)


async def max_position(pool):
    return await pool.fetchval("SELECT coalesce(max(position), 0) FROM journal")


async def main():
    con = await asyncpg.connect(URL)
    try:
        version = await migrate(con)
    finally:
        await con.close()
    pool = await create_pool(URL, 6)
    journal = Journal(pool, snapshot_every=5)
    journal.start()
    policies = PolicyStore(pool)

    def write(thing_id, path, value, **kw):
        return journal.write(WriteRequest(
            thing_id=thing_id, command=Modify(path=path, value=value), originator="nginx:old", **kw))

    async def round_(n):
        # concurrent writes of every thing: group commits interleave their positions
        await asyncio.gather(*(
            write(t, "/features/flow/properties/v", n * 10 + i,
                  headers={"source": "plc", "source-seq": str(n)} if i % 3 == 0 else None)
            for i, t in enumerate(THING_IDS)))

    for k, pid in enumerate(POLICY_IDS):
        await put_policy(policies, pid, [], policy(f"nginx:owner{k}"))
    await asyncio.gather(*(
        write(t, "/", {"policyId": POLICY_IDS[i % 3], "attributes": {"n": i},
                       "features": {"flow": {"properties": {"v": 0}}}})
        for i, t in enumerate(THING_IDS)))
    for n in range(1, 13):
        await round_(n)
        if n == 6:
            await put_policy(policies, POLICY_IDS[0], ["entries", "reader"],
                             {"subjects": {"nginx:reader": {"type": "test"}},
                              "resources": {"thing:/": {"grant": ["READ"], "revoke": []}}})
    # ingestion progress, committed with its unit as the ingest consumer does (from its claimed row)
    await pool.execute("INSERT INTO ingest_progress (consumer, source, seq) VALUES ('ingest-3', '', 0)")
    await journal.write_unit(
        [WriteRequest(thing_id=THING_IDS[1], command=Modify(path="/attributes/ingested", value=True),
                      originator="integration:plc", headers={"source": "plc", "source-seq": "77"})],
        Mark(consumer="ingest-3", expected=0, seq=1234, sources={"plc": 77}),
    )
    # anomalies found by the scorer, its detector checkpoint, and a label (a journal event)
    now = datetime.now(UTC)
    async with pool.acquire() as con:
        for t, rev in ((THING_IDS[0], 3), (THING_IDS[4], 7)):
            await con.execute(INSERT_ANOMALY, t, "flow", rev, now, 4.5, 3.0, {"v": 4.5}, {"v": 99})
        await con.execute(
            "INSERT INTO anomaly_detectors (thing_id, feature_id, config) VALUES ($1, 'flow', '{}')",
            THING_IDS[0])
        await con.execute(
            "INSERT INTO anomaly_state (thing_id, feature_id, revision, state, score, threshold, "
            "anomalous, scored_at) VALUES ($1, 'flow', 9, '\\\\x0102'::bytea, 1.5, 3.0, false, $2)",
            THING_IDS[0], now)
    assert await label_anomaly(pool, THING_IDS[0], "flow", 3, "false-alarm", "nginx:ops", "corr-1")

    # sealed, published, then cleaned up: every thing keeps only its newest event of phase 1
    first = await checkpoint_database(URL, signing_key=KEY)
    async with pool.acquire() as con:
        await con.execute("INSERT INTO relay_cursor (name, position) VALUES ('events', $1)",
                          await max_position(pool))
    cleanup = await cleanup_database(URL, datetime.now(UTC), run_by="upgrade-test", signing_key=KEY)
    assert cleanup.ok and cleanup.events > 0, cleanup.as_dict()

    # phase 2: more history, a second checkpoint in its middle, a deletion, another label
    cursor_floor = await max_position(pool)
    for n in range(13, 17):
        await round_(n)
    second = await checkpoint_database(URL, signing_key=KEY)
    await put_policy(policies, POLICY_IDS[1], ["entries", "owner", "subjects", "nginx:second"],
                     {"type": "test"})
    for n in range(17, 21):
        await round_(n)
    await journal.write(WriteRequest(thing_id=THING_IDS[9], command=Delete(path="/"), originator="nginx:old"))
    assert await label_anomaly(pool, THING_IDS[4], "flow", 7, "confirmed", "nginx:ops")
    await journal.stop()

    # the relay had published up to a thing event in the middle of phase 2
    rows = await pool.fetch(
        "SELECT position FROM journal WHERE entity = 'thing' AND position > $1 ORDER BY position",
        cursor_floor)
    cursor = rows[len(rows) // 2]["position"]
    await pool.execute("UPDATE relay_cursor SET position = $1 WHERE name = 'events'", cursor)
    await pool.close()

    # the old code's own view of what it left: every chain and checkpoint verifies, projections replay
    verified = await verify_database(URL, Scope(), checkpoints="all", signing_key=KEY)
    assert verified.ok, verified.breaks
    replayed = await replay_database(URL)
    assert not replayed.differences, replayed.differences
    print(json.dumps({
        "twinstore": twinstore.__file__, "version": version, "cursor": cursor,
        "checkpoints": [first.id, second.id], "cleanup": cleanup.as_dict(),
        "events": verified.events,
    }))


asyncio.run(main())
"""


def _git(*args: str, text: bool = True) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=text, timeout=60)


@pytest.fixture(scope="module")
def old_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous code's packages, unpacked from git into a temporary folder."""
    try:
        found = _git("cat-file", "-e", f"{BEFORE}^{{commit}}").returncode == 0
    except FileNotFoundError:
        found = False
    require(found, f"git and commit {BEFORE} (the code before partitions) in {ROOT}'s history")
    archive = _git("archive", "--format=tar", BEFORE, "twinstore", "policies", text=False)
    assert archive.returncode == 0, archive.stderr
    path = tmp_path_factory.mktemp("before-partitions")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(path, filter="data")
    return path


def write_key(path: Path) -> str:
    """An audit signing key (PEM Ed25519): the old code signs its checkpoints and cleanup with it."""
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    return str(path)


def run_old(old_code: Path, script: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(old_code)}
    done = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        cwd=old_code,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["twinstore"].startswith(str(old_code)), summary  # the old code ran, not this one
    return summary


def cli(url: str, *args: str, key: str) -> subprocess.CompletedProcess[str]:
    return twinstore_on(url, *args, TWINSTORE_AUDIT_SIGNING_KEY=key)


# Everything the old code wrote, as (table, query); each must be unchanged by the upgrade.
KEPT = {
    "journal": "SELECT entity, id, revision, position, ts, action, path, value::text, originator, "
    "correlation_id, hash, headers::text FROM journal ORDER BY position",
    "things": "SELECT id, revision, created, modified, policy_id, doc::text, hash FROM things ORDER BY id",
    "policies": "SELECT id, revision, created, modified, doc::text, hash, readers FROM policies ORDER BY id",
    "snapshots": "SELECT entity, id, revision, created, modified, doc::text FROM snapshots "
    "ORDER BY entity, id, revision",
    "audit_checkpoints": "SELECT id, created, journal_position, heads::text, root, signature, key_id "
    "FROM audit_checkpoints ORDER BY id",
    "journal_cleanups": "SELECT id, started, finished, cutoff, checkpoint_id, journal_position, scope, "
    "run_by, entities, events, snapshots, digest, signature, key_id FROM journal_cleanups ORDER BY id",
    "journal_retention": "SELECT * FROM journal_retention ORDER BY entity, id, revision",
    "ingest_progress": "SELECT consumer, source, seq, updated FROM ingest_progress ORDER BY consumer, source",
    "anomaly_detectors": "SELECT thing_id, feature_id, config, created, modified, rule, rule_owner "
    "FROM anomaly_detectors ORDER BY thing_id, feature_id",
    "anomaly_state": "SELECT thing_id, feature_id, revision, state, score, threshold, anomalous, scored_at "
    "FROM anomaly_state ORDER BY thing_id, feature_id",
    "anomalies": "SELECT thing_id, feature_id, revision, ts, score, threshold, contributions, label, "
    "labelled_by, labelled_at, x, fed FROM anomalies ORDER BY thing_id, feature_id, revision",
}

# The tables that got a partition in their key (migration 17): table -> the id column partitioned
# by; ingest_progress by its consumer's name, the journal already had it.
PARTITIONED = {
    "things": "id",
    "snapshots": "id",
    "policies": "id",
    "anomaly_detectors": "thing_id",
    "anomaly_state": "thing_id",
    "anomalies": "thing_id",
}

# The journal's secondary indexes (its primary key takes the partition, see check_upgraded).
JOURNAL_INDEXES = (
    "SELECT indexdef FROM pg_indexes WHERE tablename = 'journal' AND indexname <> 'journal_pkey'"
)
PRIMARY_KEY = """
SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_constraint c
CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
WHERE c.conrelid = $1::regclass AND c.contype = 'p'
"""


async def contents(con: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    kept = {table: [tuple(r) for r in await con.fetch(query)] for table, query in KEPT.items()}
    return {**kept, "journal indexes": [tuple(r) for r in await con.fetch(JOURNAL_INDEXES)]}


async def check_upgraded(
    con: asyncpg.Connection, before: dict[str, list[tuple[Any, ...]]], cursor: int, partitions: int
) -> None:
    """The migrated database holds exactly what the old code left, placed in partitions."""
    assert await stored_partitions(con) == partitions
    indexes = {tuple(r) for r in await con.fetch(JOURNAL_INDEXES)}
    assert set(before["journal indexes"]) <= indexes  # rebuilt after the rewrite, every one
    after = await contents(con)
    for table, rows in before.items():
        if table in KEPT:
            assert after[table] == rows, f"{table} changed by the upgrade"

    journal = await con.fetch("SELECT entity, id, position, partition, seq FROM journal ORDER BY position")
    by_partition: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for r in journal:
        assert r["partition"] == partition_of(partition_key(r["id"]), partitions), (r["entity"], r["id"])
        by_partition[r["partition"]].append(r)
    # each partition numbered 1..n in the old global (commit) order
    for p, rows in by_partition.items():
        assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), f"partition {p}"
    # the data spreads, and partitions hold several entities whose events interleave (else
    # ordering by entity and revision would pass as well as the old global order)
    assert len(by_partition) > 1
    assert any(
        len({(r["entity"], r["id"]) for r in rows}) > 1
        and [(r["entity"], r["id"]) for r in rows] != sorted((r["entity"], r["id"]) for r in rows)
        for rows in by_partition.values()
    )
    heads = {r["partition"]: r["seq"] for r in await con.fetch("SELECT partition, seq FROM partition_heads")}
    assert heads == {p: len(by_partition.get(p, ())) for p in range(partitions)}
    # the relay's cursor at the same place in every partition: all it had published, nothing more
    cursors = {
        r["partition"]: r["seq"]
        for r in await con.fetch("SELECT partition, seq FROM relay_cursors WHERE name = 'events'")
    }
    expected = {
        p: sum(1 for r in by_partition.get(p, ()) if r["position"] <= cursor) for p in range(partitions)
    }
    assert cursors == expected
    assert any(0 < cursors[p] < heads[p] for p in range(partitions))  # a cursor mid-partition
    assert await con.fetchval("SELECT count(*) FROM relay_cursors WHERE name <> 'events'") == 0
    assert await con.fetchval("SELECT to_regclass('relay_cursor')") is None
    # every table a write transaction writes holds its rows' partition, in its primary key
    # (after the columns it had: lookups by id keep their index), as the writers compute it
    for table, column in PARTITIONED.items():
        rows = await con.fetch(f"SELECT {column} AS id, partition FROM {table}")
        assert rows, table
        for r in rows:
            assert r["partition"] == partition_of(partition_key(r["id"]), partitions), (table, r["id"])
    rows = await con.fetch("SELECT consumer, partition FROM ingest_progress")
    progress = {r["consumer"]: r["partition"] for r in rows}
    assert progress == {
        "ingest-3": partition_of("ingest-3", partitions),  # not an ingest consumer's name: its own
        f"{NAMESPACE}.ingest/{partitions - 1}": partitions - 1,  # an ingest consumer's: its partition
    }
    keys = {
        table: await con.fetchval(PRIMARY_KEY, table)
        for table in (*PARTITIONED, "journal", "ingest_progress")
    }
    assert keys == {
        "things": ["id", "partition"],
        "snapshots": ["entity", "id", "revision", "partition"],
        "policies": ["id", "partition"],
        "anomaly_detectors": ["thing_id", "feature_id", "partition"],
        "anomaly_state": ["thing_id", "feature_id", "partition"],
        "anomalies": ["thing_id", "feature_id", "revision", "partition"],
        "journal": ["entity", "id", "revision", "partition"],
        "ingest_progress": ["consumer", "source", "partition"],
    }


async def cleanup_after(
    url: str, before: dict[str, list[tuple[Any, ...]]], cursor: int, partitions: int, key: str
) -> None:
    """A history cleanup by the new code on the upgraded database: its latest checkpoint is one
    the old code took (no partition heads, a journal position), so per partition it may remove
    what that position and the relay's old cursor both cover - as the old cleanup would have."""
    sealed = int(before["audit_checkpoints"][-1][2])  # its journal_position
    bound = min(sealed, cursor)
    history: dict[str, list[tuple[int, int]]] = defaultdict(list)  # thing -> (revision, position)
    for entity, thing_id, revision, position, *_ in before["journal"]:
        if entity == "thing":
            history[thing_id].append((revision, position))
    expected_events = expected_things = 0
    for events in history.values():
        newest = max(revision for revision, _ in events)
        kept = [revision for revision, position in events if position > bound]
        cut = min(newest - 1, min(kept) - 1) if kept else newest - 1
        removed = sum(1 for revision, _ in events if revision <= cut)
        expected_events += removed
        expected_things += removed > 0
    con = await asyncpg.connect(url)
    try:
        bounds = {
            r["partition"]: r["seq"]
            for r in await con.fetch(
                "SELECT partition, coalesce(max(seq) FILTER (WHERE position <= $1), 0) AS seq "
                "FROM journal GROUP BY partition",
                bound,
            )
        }
    finally:
        await con.close()
    done = await asyncio.to_thread(
        cli, url, "audit", "cleanup", "--before", "2999-01-01T00:00:00Z", "--json", key=key
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["legacy_checkpoint"] and report["checkpoint_id"] == before["audit_checkpoints"][-1][0]
    assert {p: report["partition_bounds"].get(str(p), 0) for p in range(partitions)} == {
        p: bounds.get(p, 0) for p in range(partitions)
    }
    assert (report["events"], report["entities"]) == (expected_events, expected_things)
    assert expected_events > 0


async def write_after(url: str) -> None:
    """New code writes on the upgraded database: each partition's seq and each chain go on."""
    con = await asyncpg.connect(url)
    try:
        heads = {
            r["partition"]: r["seq"] for r in await con.fetch("SELECT partition, seq FROM partition_heads")
        }
        old_end = await con.fetchval("SELECT max(position) FROM journal")
        last = {
            (r["entity"], r["id"]): bytes(r["hash"])
            for r in await con.fetch(
                "SELECT DISTINCT ON (entity, id) entity, id, hash FROM journal "
                "ORDER BY entity, id, revision DESC"
            )
        }
        partitions = await stored_partitions(con)
        await con.execute(
            "INSERT INTO anomalies (thing_id, feature_id, revision, ts, score, threshold, contributions, "
            f"partition) VALUES ('{NAMESPACE}:thing-0', 'flow', 11, now(), 5, 3, '{{}}', $1)",
            partition_of(f"{NAMESPACE}:thing-0", partitions),
        )
    finally:
        await con.close()
    pool = await create_pool(url, 4)
    try:
        recorder = await Recorder.load(pool)
        journal = Journal(pool, snapshot_every=5, recorder=recorder)
        journal.start()
        try:
            for n in range(2):
                await asyncio.gather(
                    *(
                        journal.write(
                            WriteRequest(
                                thing_id=f"{NAMESPACE}:thing-{i}",
                                command=Modify(path="/features/flow/properties/v", value=1000 + n),
                                originator="nginx:new",
                            )
                        )
                        for i in range(THINGS - 1)  # thing-9 was deleted by the old code
                    )
                )
        finally:
            await journal.stop()
        assert await label_anomaly(
            pool, recorder, f"{NAMESPACE}:thing-0", "flow", 11, "confirmed", "nginx:ops"
        )
        new = await pool.fetch(
            "SELECT entity, id, revision, ts, action, path, value::text AS value, originator, "
            "correlation_id, headers, hash, partition, seq FROM journal WHERE position > $1 "
            "ORDER BY partition, seq",
            old_end,
        )
        assert len(new) == 2 * (THINGS - 1) + 1
        moved = {
            r["partition"]: r["seq"] for r in await pool.fetch("SELECT partition, seq FROM partition_heads")
        }
    finally:
        await pool.close()
    seen: dict[int, int] = {}
    for r in new:
        p = r["partition"]
        assert r["seq"] == seen.get(p, heads[p]) + 1, f"partition {p} does not go on after its head"
        seen[p] = r["seq"]
        key = (r["entity"], r["id"])
        value = None if r["value"] is None else r["value"].encode()
        headers = None if r["headers"] is None else json.loads(r["headers"])
        expected = chain_hash(
            last[key],
            r["entity"],
            r["id"],
            r["revision"],
            r["ts"],
            r["action"],
            r["path"],
            value,
            r["originator"],
            r["correlation_id"],
            headers,
        )
        assert bytes(r["hash"]) == expected, f"{key} revision {r['revision']} not chained to its old head"
        last[key] = expected
    assert moved == {**heads, **seen}


@pytest.mark.timeout(120)
async def test_upgrade_in_place(
    old_code: Path, servers: tuple[str, str], scratch_database: str, tmp_path: Path
) -> None:
    key = write_key(tmp_path / "audit.pem")
    script = tmp_path / "fill_before_partitions.py"
    script.write_text(OLD_SCRIPT)
    summary = await asyncio.to_thread(
        run_old, old_code, script, scratch_database, key, NAMESPACE, str(THINGS)
    )
    assert summary["version"] == OLD_VERSION
    assert summary["cleanup"]["events"] > 0
    cursor = int(summary["cursor"])

    # a second copy of the old database, upgraded with 4 partitions
    admin = servers[0]
    source = urlsplit(scratch_database).path.lstrip("/")
    four = with_database(admin, f"{source}_p4")
    con = await asyncpg.connect(admin)
    try:
        await con.execute(f'CREATE DATABASE "{source}_p4" TEMPLATE "{source}"')
    finally:
        await con.close()
    try:
        for url, partitions in ((scratch_database, DEFAULT_PARTITIONS), (four, 4)):
            con = await asyncpg.connect(url)
            try:
                assert await con.fetchval("SELECT max(version) FROM twinstore_migrations") == OLD_VERSION
                # the progress of an ingest consumer named as they are (``<stream>/<partition>``)
                await con.execute(
                    "INSERT INTO ingest_progress (consumer, source, seq) VALUES ($1, '', 12)",
                    f"{NAMESPACE}.ingest/{partitions - 1}",
                )
                before = await contents(con)
                assert len(before["journal"]) == summary["events"]
                # what the old code left: every kind of entity, snapshots, a cleanup with its anchors
                assert {r[0] for r in before["journal"]} == {"thing", "policy", "anomaly"}
                assert len([r for r in before["anomalies"] if r[7] is not None]) == 2  # labelled
                assert before["snapshots"] and before["journal_retention"] and before["ingest_progress"]
                assert len(before["audit_checkpoints"]) == 2 and len(before["journal_cleanups"]) == 1
                await migrate(con, None if partitions == DEFAULT_PARTITIONS else partitions)
                await check_upgraded(con, before, cursor, partitions)
                # started again with the same setting: nothing to do, nothing moves
                await migrate(con, partitions)
                await check_upgraded(con, before, cursor, partitions)
            finally:
                await con.close()

            for args in (("audit", "verify", "--all"), ("audit", "verify", "--all", "--checkpoints", "all")):
                done = await asyncio.to_thread(cli, url, *args, key=key)
                assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
            done = await asyncio.to_thread(cli, url, "replay", "--all", "--json", key=key)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert json.loads(done.stdout)["differences"] == []

            await cleanup_after(url, before, cursor, partitions, key)
            await write_after(url)
            done = await asyncio.to_thread(
                cli, url, "audit", "verify", "--all", "--checkpoints", "all", key=key
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            done = await asyncio.to_thread(cli, url, "replay", "--all", key=key)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        await asyncio.to_thread(drop_database, admin, four)


async def test_partitions_are_fixed_once_stored(servers: tuple[str, str], scratch_database: str) -> None:
    """A new database gets 64 partitions by default; starting with another count is refused
    with a message that names both and the fix, and leaves the database as it was."""
    con = await asyncpg.connect(scratch_database)
    try:
        await migrate(con)
        assert await stored_partitions(con) == DEFAULT_PARTITIONS == 64
        assert await con.fetchval("SELECT count(*) FROM partition_heads") == 64
        with pytest.raises(PartitionsMismatchError) as refused:
            await migrate(con, 8)
        message = str(refused.value)
        assert "64" in message and "8" in message and "partitions = 64" in message
        assert await stored_partitions(con) == 64
        assert await migrate(con, 64) == await migrate(con)
    finally:
        await con.close()
    # a new database created with another count keeps it
    other = await asyncio.to_thread(fresh_database, servers[0])
    try:
        con = await asyncpg.connect(other)
        try:
            await migrate(con, 8)
            assert await stored_partitions(con) == 8
            assert await con.fetchval("SELECT count(*) FROM partition_heads") == 8
            with pytest.raises(PartitionsMismatchError):
                await migrate(con, DEFAULT_PARTITIONS)
        finally:
            await con.close()
    finally:
        await asyncio.to_thread(drop_database, servers[0], other)
