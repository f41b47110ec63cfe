"""History retention (``twinstore audit cleanup``) on real PostgreSQL.

Cleanup only removes events that are old, sealed by the latest checkpoint and published by the
relay, both judged per journal partition (``seq`` at or below the checkpoint's partition head
and the relay cursor of the event's partition; never by the global ``position``, which is not
in commit order across partitions), never a thing's newest event; it leaves an anchor that
``audit verify``, ``replay`` and history reads start from, and records itself with its
partition bounds. As in ``tests/test_audit.py`` tampering happens
in a scratch database the journal rows were copied into; history reads go through the HTTP API
on the session database (cleaned up within the test's own namespace).
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.api.helpers import assert_error, url
from tests.conftest import new_thing_id, twinstore_on
from tests.test_audit import COLUMNS, append_rows, make_things, sql, where
from tests.test_checkpoint import write_key
from twinstore.audit import (
    Scope,
    anchor_leaf,
    checkpoint_database,
    checkpoint_message,
    cleanup_message,
    fold_anchor,
    load_signing_key,
    parse_vector,
    verify_database,
)
from twinstore.model.partition import partition_key, partition_of
from twinstore.replay import replay_database
from twinstore.retention import PARTITIONED_SCHEMA, cleanup_database
from twinstore.settings import Settings
from twinstore.store.codec import GENESIS
from twinstore.store.schema import MIGRATIONS, migrate

HISTORY_NOT_FOUND = "things:thing.history.notfound"
FUTURE = datetime.now(UTC) + timedelta(days=1)


@pytest.fixture
def namespace() -> str:
    return f"org.retention{secrets.token_hex(4)}"


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # the test's own environment's key and retention do not reach it unless given
    unset: dict[str, str | None] = dict.fromkeys(
        ("TWINSTORE_AUDIT_SIGNING_KEY", "TWINSTORE_HISTORY_RETENTION_DAYS"), None
    )
    return twinstore_on(url, *args, **{**unset, **env})


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    con = await asyncpg.connect(url)
    try:
        return await con.fetch(query, *args)
    finally:
        await con.close()


async def copy_rows(
    settings: Settings, scratch: str, namespace: str, condition: str = "true", *, each: bool = False
) -> None:
    """Copy the journal rows of ``namespace`` matching ``condition`` (in time order, so later
    copies get higher seqs in their partitions) into ``scratch`` (migrated first); ``each``: one
    append per row, so positions follow time order too (one append numbers its rows partition
    by partition), as the journal's did before partitions."""
    assert settings.database_url is not None
    rows = await fetch(
        settings.database_url,
        f"SELECT {COLUMNS} FROM journal WHERE id >= $1 AND id < $2 AND ({condition}) "
        "ORDER BY ts, entity, id, revision",
        namespace + ":",
        namespace + ";",
    )
    dst = await asyncpg.connect(scratch)
    try:
        await migrate(dst)
        for part in [[r] for r in rows] if each else [rows]:
            await append_rows(dst, part)
    finally:
        await dst.close()


async def published(url: str, seq: int = 2**62, partition: int | None = None) -> None:
    """Mark every partition (or one) as published by the NATS relay up to ``seq`` (scratch
    databases have no relay)."""
    only = "" if partition is None else f" WHERE partition = {partition}"
    await sql(
        url,
        f"INSERT INTO relay_cursors (name, partition, seq) SELECT 'events', partition, {seq} "
        f"FROM partition_heads{only} ON CONFLICT (name, partition) DO UPDATE SET seq = excluded.seq",
    )


def partition(thing_id: str) -> int:
    """A thing's partition in a scratch database (migrated with the default count)."""
    return partition_of(partition_key(thing_id), 64)


async def seq_of(url: str, thing_id: str, revision: int) -> int:
    rows = await fetch(
        url,
        "SELECT seq FROM journal WHERE entity = 'thing' AND id = $1 AND revision = $2",
        thing_id,
        revision,
    )
    return int(rows[0]["seq"])


async def revisions(url: str, thing_id: str) -> list[int]:
    rows = await fetch(
        url, "SELECT revision FROM journal WHERE entity = 'thing' AND id = $1 ORDER BY revision", thing_id
    )
    return [r["revision"] for r in rows]


async def ts_of(settings: Settings, thing_id: str, revision: int) -> datetime:
    assert settings.database_url is not None
    rows = await fetch(
        settings.database_url,
        "SELECT ts FROM journal WHERE entity = 'thing' AND id = $1 AND revision = $2",
        thing_id,
        revision,
    )
    return rows[0]["ts"]  # type: ignore[no-any-return]


async def journal_hash(settings: Settings, thing_id: str, revision: int) -> bytes:
    assert settings.database_url is not None
    rows = await fetch(
        settings.database_url,
        "SELECT hash FROM journal WHERE entity = 'thing' AND id = $1 AND revision = $2",
        thing_id,
        revision,
    )
    return bytes(rows[0]["hash"])


async def counts(url: str) -> tuple[int, int, int, int]:
    (row,) = await fetch(
        url,
        "SELECT (SELECT count(*) FROM journal) AS j, (SELECT count(*) FROM snapshots) AS s, "
        "(SELECT count(*) FROM journal_retention) AS r, (SELECT count(*) FROM journal_cleanups) AS c",
    )
    return row["j"], row["s"], row["r"], row["c"]


async def three_things(
    client: httpx.AsyncClient, settings: Settings, scratch: str, namespace: str
) -> tuple[str, str, str, datetime]:
    """h, a, b with revisions 1..6 each, written in that order, copied so that the checkpoint
    seals all of h and revisions 1..4 of a and b; the cutoff is the time of b's revision 4.

    Expected cuts: h at 5 (all old and sealed: only the head stays), a at 4 (old, but 5 and 6
    are not sealed), b at 3 (4 is not old)."""
    (h,) = await make_things(client, namespace, count=1)
    a, b = await make_things(client, namespace, count=2)
    await copy_rows(settings, scratch, namespace, f"entity = 'policy' OR id = '{h}' OR revision <= 4")
    await published(scratch)
    await replay_database(scratch, repair=True)  # the projection (the scratch copy has none)
    await checkpoint_database(scratch)
    await copy_rows(settings, scratch, namespace, f"entity = 'thing' AND id <> '{h}' AND revision > 4")
    await replay_database(scratch, repair=True)
    return h, a, b, await ts_of(settings, b, 4)


async def test_nothing_without_checkpoint_or_retention(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    (a,) = await make_things(client, namespace, count=1)
    await copy_rows(settings, scratch_database, namespace)
    await published(scratch_database)
    before = await counts(scratch_database)
    done = cli(scratch_database, "audit", "cleanup", "--before", FUTURE.isoformat())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing removed: no audit checkpoint" in done.stdout
    # No retention configured and no cutoff given: all history is kept.
    done = cli(scratch_database, "audit", "cleanup", "--json")
    assert done.returncode == 0 and "no retention configured" in json.loads(done.stdout)["reason"]
    # Sealed, but not yet published by the relay.
    await checkpoint_database(scratch_database)
    await sql(scratch_database, "DELETE FROM relay_cursors")
    report = await cleanup_database(scratch_database, FUTURE, run_by="test")
    assert report.reason is not None and "relay" in report.reason and report.events == 0
    assert await counts(scratch_database) == before
    assert await revisions(scratch_database, a) == [1, 2, 3, 4, 5, 6]
    # Policy events are always kept.
    await published(scratch_database)
    report = await cleanup_database(scratch_database, FUTURE, Scope(entity="policy"), run_by="test")
    assert report.reason is not None and "policy" in report.reason
    assert await counts(scratch_database) == before


async def test_cleanup_removes_only_old_sealed_events_and_keeps_the_head(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    h, a, b, cutoff = await three_things(client, settings, scratch_database, namespace)
    policies = await fetch(scratch_database, "SELECT count(*) AS n FROM journal WHERE entity = 'policy'")
    hashes = {(t, r): await journal_hash(settings, t, r) for t, r in ((h, 5), (a, 4), (b, 3))}
    # A dry run reports and changes nothing.
    before = await counts(scratch_database)
    done = cli(scratch_database, "audit", "cleanup", "--before", cutoff.isoformat(), "--dry-run", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    dry = json.loads(done.stdout)
    assert dry["dry_run"] and dry["entities"] == 3 and dry["events"] == 5 + 4 + 3
    assert dry["cleanup_id"] is None and await counts(scratch_database) == before
    # The real run, through the command.
    done = cli(scratch_database, "audit", "cleanup", "--before", cutoff.isoformat(), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["entities"] == 3 and report["events"] == 12 and report["snapshots"] == 3
    assert await revisions(scratch_database, h) == [6]  # the head stays
    assert await revisions(scratch_database, a) == [5, 6]  # 5 and 6 are after the checkpoint
    assert await revisions(scratch_database, b) == [4, 5, 6]  # 4 is not older than the cutoff
    assert (
        await fetch(scratch_database, "SELECT count(*) AS n FROM journal WHERE entity = 'policy'") == policies
    )
    # Anchors: the last removed revision and its hash; a snapshot of the state kept there.
    anchors = await fetch(
        scratch_database,
        "SELECT r.id, r.revision, r.hash, r.cleanup_id, s.doc FROM journal_retention r "
        "JOIN snapshots s USING (entity, id, revision) ORDER BY r.seq",
    )
    assert {(x["id"], x["revision"]) for x in anchors} == {(h, 5), (a, 4), (b, 3)}
    assert all(bytes(x["hash"]) == hashes[(x["id"], x["revision"])] for x in anchors)
    docs = {x["id"]: json.loads(x["doc"]) for x in anchors}
    assert docs[h]["attributes"] == {"n": 4} and docs[b]["attributes"] == {"n": 2}
    # The run is recorded.
    (run,) = await fetch(scratch_database, "SELECT * FROM journal_cleanups")
    assert run["id"] == report["cleanup_id"] and run["finished"] is not None
    assert (run["entities"], run["events"], run["snapshots"]) == (3, 12, 3)
    assert run["cutoff"] == cutoff and run["scope"] == "all" and "@" in run["run_by"]
    assert bytes(run["digest"]).hex() == report["digest"] and run["signature"] is None
    # Nothing more to remove with the same cutoff: a second run records itself, removes nothing.
    again = await cleanup_database(scratch_database, cutoff, run_by="test")
    assert again.ok and again.events == 0 and again.entities == 0 and again.cleanup_id == run["id"] + 1
    # Verify (also every checkpoint: sealed revisions removed by retention are not "truncated")
    # and replay are OK after the cleanup.
    done = cli(scratch_database, "audit", "verify")
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    report_all = await verify_database(scratch_database, checkpoints="all")
    assert report_all.ok, report_all.breaks
    done = cli(scratch_database, "replay", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["differences"] == []
    # A later checkpoint and cleanup continue from the anchors.
    await checkpoint_database(scratch_database)
    later = await cleanup_database(scratch_database, FUTURE, Scope(namespace=namespace), run_by="test")
    assert later.ok and later.entities == 2 and later.events == 1 + 2
    assert await revisions(scratch_database, a) == [6] and await revisions(scratch_database, b) == [6]
    assert (await verify_database(scratch_database, checkpoints="all")).ok
    assert (await replay_database(scratch_database)).ok


async def test_verify_catches_tampering_after_cleanup(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    h, a, b, cutoff = await three_things(client, settings, scratch_database, namespace)
    await cleanup_database(scratch_database, cutoff, run_by="test")
    assert (await verify_database(scratch_database)).ok

    async def breaks(scope: Scope | None = None) -> list[tuple[str, int, str]]:
        report = await verify_database(scratch_database, scope or Scope())
        return sorted((x.id, x.revision, x.kind) for x in report.breaks)  # ids are random: by id

    async def restore(thing_id: str, revision: int) -> None:
        await sql(scratch_database, f"DELETE FROM journal WHERE {where(thing_id, revision)}")
        await copy_rows(settings, scratch_database, namespace, where(thing_id, revision))

    async def anchor_at(thing_id: str, revision: int) -> None:
        digest = (await journal_hash(settings, thing_id, revision)).hex()
        await sql(
            scratch_database,
            f"UPDATE journal_retention SET revision = {revision}, hash = decode('{digest}', 'hex') "
            f"WHERE id = '{thing_id}'",
        )

    # An edited retained event, and a deleted retained middle event.
    await sql(scratch_database, f"UPDATE journal SET value = '99' WHERE {where(b, 5)}")
    await sql(scratch_database, f"DELETE FROM journal WHERE {where(a, 5)}")
    assert await breaks() == sorted([(a, 5, "missing"), (b, 5, "edited")])
    assert await breaks(Scope(thing=b)) == [(b, 5, "edited")]
    done = cli(scratch_database, "audit", "verify")
    assert done.returncode == 1 and f"thing {b} revision 5: edited" in done.stdout
    await restore(a, 5)
    await restore(b, 5)
    assert await breaks() == []
    # The first retained event deleted: the chain no longer starts right after the anchor (and
    # the checkpoint sealed that revision).
    await sql(scratch_database, f"DELETE FROM journal WHERE {where(b, 4)}")
    assert await breaks() == sorted([(b, 4, "missing"), (b, 4, "truncated")])
    await restore(b, 4)
    # An edited anchor hash: the first retained event no longer links; the run's digest and the
    # checkpoint that sealed a's revision 4 (now its anchor) disagree too.
    await sql(scratch_database, f"UPDATE journal_retention SET hash = sha256(hash) WHERE id = '{a}'")
    found = await breaks()
    assert {(x[0], x[1]) for x in found if x[2] in ("edited", "mismatch")} == {(a, 5)}
    assert (a, 4, "rewritten") in found and ("1", 0, "cleanup-invalid") in found and len(found) == 3
    await anchor_at(a, 4)
    assert await breaks() == []
    # The anchor moved forward to hide one more removed event: the chain still links, the run's
    # digest does not recompute (and the snapshot at the new anchor is missing).
    await sql(scratch_database, f"DELETE FROM journal WHERE {where(b, 4)}")
    await anchor_at(b, 4)
    assert await breaks() == sorted([(b, 4, "snapshot-altered"), ("1", 0, "cleanup-invalid")])
    await anchor_at(b, 3)
    await restore(b, 4)
    assert await breaks() == []
    # The snapshot kept at an anchor edited, or the anchor row deleted.
    await sql(
        scratch_database,
        f"UPDATE snapshots SET doc = jsonb_set(doc, '{{attributes,n}}', '7') "
        f"WHERE id = '{h}' AND revision = 5",
    )
    assert await breaks() == sorted([(h, 5, "snapshot-altered")])
    done = cli(scratch_database, "replay")
    assert done.returncode == 0  # h's later event replaces the attribute: same state
    await sql(
        scratch_database,
        f"UPDATE snapshots SET doc = jsonb_set(doc, '{{attributes,n}}', '4') "
        f"WHERE id = '{h}' AND revision = 5",
    )
    assert await breaks() == []
    await sql(scratch_database, f"DELETE FROM journal_retention WHERE id = '{h}'")
    assert await breaks() == sorted([(h, 1, "missing"), ("1", 0, "cleanup-invalid")])


async def test_broken_chain_is_left_alone_and_signed_record(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str, tmp_path: Path
) -> None:
    a, b = await make_things(client, namespace, count=2)
    await copy_rows(settings, scratch_database, namespace)
    await published(scratch_database)
    await replay_database(scratch_database, repair=True)
    key = write_key(tmp_path / "audit.pem")
    await checkpoint_database(scratch_database, signing_key=key)
    await sql(scratch_database, f"UPDATE journal SET value = '99' WHERE {where(a, 2)}")
    done = cli(
        scratch_database,
        "audit",
        "cleanup",
        "--older-than-days",
        "0.000001",
        TWINSTORE_AUDIT_SIGNING_KEY=key,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"SKIPPED thing {a}: the hash chain breaks at revision 2" in done.stdout
    assert await revisions(scratch_database, a) == [1, 2, 3, 4, 5, 6]  # the evidence stays
    assert await revisions(scratch_database, b) == [6]
    (run,) = await fetch(scratch_database, "SELECT signature, key_id FROM journal_cleanups")
    assert run["signature"] is not None and run["key_id"] is not None
    await sql(scratch_database, f"UPDATE journal SET value = '1' WHERE {where(a, 2)}")
    assert (await verify_database(scratch_database, signing_key=key)).ok
    other = write_key(tmp_path / "other.pem")
    report = await verify_database(scratch_database, signing_key=other)
    assert {x.kind for x in report.breaks} == {"checkpoint-invalid", "cleanup-invalid"}
    await sql(
        scratch_database,
        "UPDATE journal_cleanups SET signature = set_byte(signature, 0, get_byte(signature, 0) # 1)",
    )
    report = await verify_database(scratch_database, signing_key=key)
    assert [(x.kind, x.detail) for x in report.breaks] == [
        ("cleanup-invalid", "the signature does not verify")
    ]


async def wait_published(url: str, *thing_ids: str) -> None:
    """Until the runtime's relays have published every event of these things (each partition's
    cursor at or beyond the thing's newest seq there)."""
    query = """
    SELECT bool_and(coalesce(c.seq, 0) >= t.seq) AS done
    FROM (SELECT partition, max(seq) AS seq FROM journal WHERE entity = 'thing' AND id = any($1::text[])
          GROUP BY partition) t
    LEFT JOIN relay_cursors c ON c.name = 'events' AND c.partition = t.partition
    """
    for _ in range(200):
        (row,) = await fetch(url, query, list(thing_ids))
        if row["done"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the relay did not catch up")


async def test_history_reads_after_cleanup(
    client: httpx.AsyncClient, settings: Settings, namespace: str
) -> None:
    assert settings.database_url is not None
    thing_id = new_thing_id(namespace)
    r = await client.put(url(thing_id), json={"attributes": {"n": 0}})
    assert r.status_code == 201, r.text
    seen: dict[int, dict[str, Any]] = {}

    async def write(path: str, value: Any) -> None:
        r = await client.put(url(thing_id, path), json=value)
        assert r.status_code in (201, 204), r.text
        current = await client.get(url(thing_id))
        seen[int(current.headers["etag"].strip('"').removeprefix("rev:"))] = copy.deepcopy(current.json())

    for n in range(1, 26):  # revisions 2..31, snapshots (every 10) at 10, 20 and 30
        await write("/attributes/n", n)
        if n % 5 == 0:
            await write(f"/attributes/k{n % 3}", n)
    newest = max(seen)
    assert sorted(seen) == list(range(2, newest + 1)) and newest == 31
    # A deleted thing: its history stays readable for the retention period.
    gone = new_thing_id(namespace)
    assert (await client.put(url(gone), json={"attributes": {"v": 0}})).status_code == 201
    for v in (1, 2, 3):
        assert (await client.put(url(gone, "/attributes/v"), json=v)).status_code == 204
    assert (await client.delete(url(gone))).status_code == 204
    await wait_published(settings.database_url, thing_id, gone)
    await checkpoint_database(settings.database_url)
    cut_ts = await ts_of(settings, thing_id, 13)  # revisions 1..12 go
    gone_ts = await ts_of(settings, gone, 3)  # revisions 1..2 of the deleted thing go
    done = cli(settings.database_url, "audit", "cleanup", "--thing", thing_id, "--before", cut_ts.isoformat())
    assert done.returncode == 0 and "removed 12 events of 1 things" in done.stdout, done.stdout + done.stderr
    done = cli(settings.database_url, "audit", "cleanup", "--thing", gone, "--before", gone_ts.isoformat())
    assert done.returncode == 0 and "removed 2 events of 1 things" in done.stdout, done.stdout + done.stderr
    assert await revisions(settings.database_url, thing_id) == list(range(13, newest + 1))

    for revision in (1, 5, 10, 12):  # before the retained range
        r = await client.get(url(thing_id), headers={"at-historical-revision": str(revision)})
        assert_error(r, 404, HISTORY_NOT_FOUND)
    for revision in range(13, newest + 1):  # the retained range: as it was live
        r = await client.get(url(thing_id), params={"at-historical-revision": str(revision)})
        assert r.status_code == 200, (revision, r.text)
        assert r.json() == seen[revision] and r.headers["etag"] == f'"rev:{revision}"'
    r = await client.get(url(thing_id, "/attributes/n"), params={"at-historical-revision": "15"})
    assert r.status_code == 200 and r.json() == seen[15]["attributes"]["n"]
    before = (cut_ts - timedelta(microseconds=1)).isoformat()
    r = await client.get(url(thing_id), params={"at-historical-timestamp": before})
    assert_error(r, 404, HISTORY_NOT_FOUND)
    r = await client.get(url(thing_id), params={"at-historical-timestamp": cut_ts.isoformat()})
    assert r.status_code == 200 and r.headers["at-historical-revision"] == "13"
    assert r.json() == seen[13]
    # The deleted thing: revisions 3 and 4 (before the deletion) stay readable, 1..2 are gone.
    for revision, value in ((3, 2), (4, 3)):
        r = await client.get(url(gone), params={"at-historical-revision": str(revision)})
        assert r.status_code == 200 and r.json()["attributes"] == {"v": value}, r.text
    assert_error(await client.get(url(gone), params={"at-historical-revision": "2"}), 404, HISTORY_NOT_FOUND)
    assert_error(await client.get(url(gone), params={"at-historical-revision": "5"}), 404, HISTORY_NOT_FOUND)
    # Verify and replay of the namespace through the real commands.
    done = cli(settings.database_url, "audit", "verify", "--namespace", namespace)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    done = cli(settings.database_url, "replay", "--namespace", namespace, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["differences"] == [], done.stdout
    # History streams (SSE) start inside the retained range: an explicit earlier start is 404,
    # "from the oldest" (revision 0) starts at the first retained revision.
    sse = {"Accept": "text/event-stream"}
    r = await client.get(url(thing_id), params={"from-historical-revision": "5"}, headers=sse)
    assert_error(r, 404, HISTORY_NOT_FOUND)
    r = await client.get(url(thing_id), params={"from-historical-timestamp": before}, headers=sse)
    assert_error(r, 404, HISTORY_NOT_FOUND)
    r = await client.get(
        url(thing_id), params={"from-historical-revision": "0", "to-historical-revision": "14"}, headers=sse
    )
    assert r.status_code == 200, r.text
    assert [line for line in r.text.splitlines() if line.startswith("id:")] == ["id: 13", "id: 14"]


async def two_partitions(client: httpx.AsyncClient, namespace: str) -> tuple[str, str]:
    """Two things (revisions 1..6 each) in different partitions of a scratch database."""
    ids = await make_things(client, namespace, count=3)
    a = ids[0]
    b = next(t for t in ids[1:] if partition(t) != partition(a))  # 3 of 64: one differs
    return a, b


async def test_bounds_are_per_partition_not_positions(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    """An event with a lower position that commits after a checkpoint (in another partition) is
    not sealed by it, and stays: a bound on max(position) would have removed it."""
    a, b = await two_partitions(client, namespace)
    await copy_rows(
        settings, scratch_database, namespace, f"entity = 'policy' OR (id = '{b}' AND revision <= 2)"
    )
    assert settings.database_url is not None
    source = await asyncpg.connect(settings.database_url)
    late = await asyncpg.connect(scratch_database)
    try:

        async def rows(condition: str) -> list[asyncpg.Record]:
            query = f"SELECT {COLUMNS} FROM journal WHERE entity = 'thing' AND {condition} ORDER BY revision"
            return await source.fetch(query)

        # b's revision 3 is appended first (lower position) and commits last: after a's events
        # (higher positions, another partition) and after the checkpoint.
        transaction = late.transaction()
        await transaction.start()
        await append_rows(late, await rows(f"id = '{b}' AND revision = 3"))  # a savepoint in it
        dst = await asyncpg.connect(scratch_database)
        try:
            await append_rows(dst, await rows(f"id = '{a}'"))
        finally:
            await dst.close()
        cp = await checkpoint_database(scratch_database)
        await transaction.commit()
        dst = await asyncpg.connect(scratch_database)
        try:
            await append_rows(dst, await rows(f"id = '{b}' AND revision > 3"))
        finally:
            await dst.close()
    finally:
        await source.close()
        await late.close()
    (row,) = await fetch(scratch_database, f"SELECT position FROM journal WHERE {where(b, 3)}")
    assert row["position"] < cp.journal_position  # the trap: below the checkpoint's max(position)
    assert cp.partition_heads[partition(b)] == await seq_of(scratch_database, b, 2)
    assert cp.partition_heads[partition(a)] == await seq_of(scratch_database, a, 6)

    # a's partition published up to its revision 3 only, b's all.
    a3, b2 = await seq_of(scratch_database, a, 3), await seq_of(scratch_database, b, 2)
    await published(scratch_database)
    await published(scratch_database, a3, partition(a))
    report = await cleanup_database(scratch_database, FUTURE, run_by="test")
    assert report.ok and report.reason is None, report.as_dict()
    assert report.bounds[partition(a)] == a3 and report.bounds[partition(b)] == b2
    assert await revisions(scratch_database, a) == [4, 5, 6]  # not yet published beyond 3
    assert await revisions(scratch_database, b) == [3, 4, 5, 6]  # 3 committed after the checkpoint
    (run,) = await fetch(scratch_database, "SELECT partition_bounds::text AS b, digest FROM journal_cleanups")
    assert parse_vector(run["b"]) == report.bounds and bytes(run["digest"]) == report.digest
    assert (await verify_database(scratch_database, checkpoints="all")).ok
    # Published, and a new checkpoint that has b's late event: both continue from their anchors.
    await published(scratch_database)
    await checkpoint_database(scratch_database)
    report = await cleanup_database(scratch_database, FUTURE, run_by="test")
    assert report.ok and report.entities == 2 and report.events == 2 + 3
    assert await revisions(scratch_database, a) == [6] and await revisions(scratch_database, b) == [6]
    assert (await verify_database(scratch_database, checkpoints="all")).ok


def test_partitioned_schema_is_the_migration_that_split_the_journal() -> None:
    migration = MIGRATIONS[PARTITIONED_SCHEMA - 1]
    assert callable(migration) and migration.__name__ == "_partition_journal"


async def test_checkpoint_from_before_partitions(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str, tmp_path: Path
) -> None:
    """A checkpoint made before the journal had partitions sealed every event at or below its
    journal position (commit order then): cleanup maps that to partition heads. One without
    partition heads made after the upgrade is refused."""
    a, b = await two_partitions(client, namespace)
    await copy_rows(
        settings, scratch_database, namespace, f"id in ('{a}', '{b}') OR entity = 'policy'", each=True
    )
    await published(scratch_database)
    key = write_key(tmp_path / "audit.pem")
    cp = await checkpoint_database(scratch_database, signing_key=key)
    # As the code before partitions left it: no partition heads, signed over its journal
    # position, made before migration 15 (which numbered rows per partition in position order).
    # Its position seals all of a and b up to revision 2 (copied in time order: a first).
    (b2,) = await fetch(scratch_database, f"SELECT position FROM journal WHERE {where(b, 2)}")
    position = b2["position"]
    v1 = load_signing_key(key).sign(checkpoint_message(cp.root, None, position))
    await sql(
        scratch_database,
        f"UPDATE audit_checkpoints SET partition_heads = NULL, journal_position = {position}, "
        f"signature = decode('{v1.hex()}', 'hex'), created = (SELECT applied - interval '1 day' "
        f"FROM twinstore_migrations WHERE version = {PARTITIONED_SCHEMA}) WHERE id = {cp.id}",
    )
    assert (await verify_database(scratch_database, signing_key=key)).ok
    dry = await cleanup_database(scratch_database, FUTURE, run_by="test", dry_run=True, signing_key=key)
    assert dry.legacy_checkpoint and dry.events == 5 + 2 and dry.as_dict()["legacy_checkpoint"]
    done = cli(
        scratch_database, "audit", "cleanup", "--before", FUTURE.isoformat(), TWINSTORE_AUDIT_SIGNING_KEY=key
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed 7 events of 2 things" in done.stdout and "made before partitions" in done.stdout
    assert await revisions(scratch_database, a) == [6] and await revisions(scratch_database, b) == [
        3,
        4,
        5,
        6,
    ]
    (run,) = await fetch(scratch_database, "SELECT partition_bounds::text AS b FROM journal_cleanups")
    bounds = parse_vector(run["b"])
    assert bounds[partition(b)] == await seq_of(scratch_database, b, 3) - 1
    assert bounds[partition(a)] >= await seq_of(scratch_database, a, 6)
    assert (await verify_database(scratch_database, checkpoints="all", signing_key=key)).ok
    # Without partition heads but made after the upgrade (an older twinstore): refused.
    await sql(scratch_database, f"UPDATE audit_checkpoints SET created = now() WHERE id = {cp.id}")
    report = await cleanup_database(scratch_database, FUTURE, run_by="test")
    assert report.reason is not None and "run `twinstore audit checkpoint`" in report.reason
    assert report.events == 0 and await revisions(scratch_database, b) == [3, 4, 5, 6]


async def test_cleanup_record_covers_its_bounds(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str, tmp_path: Path
) -> None:
    a, b = await two_partitions(client, namespace)
    await copy_rows(settings, scratch_database, namespace, f"id in ('{a}', '{b}') OR entity = 'policy'")
    await published(scratch_database)
    key = write_key(tmp_path / "audit.pem")
    other = write_key(tmp_path / "other.pem")
    cp = await checkpoint_database(scratch_database, signing_key=key)
    # A checkpoint that does not verify with the configured key is not relied on.
    report = await cleanup_database(scratch_database, FUTURE, run_by="test", signing_key=other)
    assert report.reason is not None and "does not verify with audit_signing_key" in report.reason
    await sql(
        scratch_database,
        "UPDATE audit_checkpoints SET partition_heads = jsonb_set(partition_heads, "
        f"'{{{partition(a)}}}', to_jsonb(2 + (partition_heads ->> '{partition(a)}')::bigint))",
    )
    report = await cleanup_database(scratch_database, FUTURE, run_by="test", signing_key=key)
    assert report.reason is not None and "the signature does not verify" in report.reason
    assert await revisions(scratch_database, a) == [1, 2, 3, 4, 5, 6]
    await sql(
        scratch_database,
        "UPDATE audit_checkpoints SET partition_heads = jsonb_set(partition_heads, "
        f"'{{{partition(a)}}}', to_jsonb((partition_heads ->> '{partition(a)}')::bigint - 2))",
    )
    report = await cleanup_database(scratch_database, FUTURE, run_by="test", signing_key=key)
    assert (
        report.ok
        and report.events == 5 + 5
        and report.bounds == {p: seq for p, seq in cp.partition_heads.items()}
    )
    assert (await verify_database(scratch_database, signing_key=key)).ok

    async def breaks(signing_key: str | None = None) -> list[str]:
        report = await verify_database(scratch_database, signing_key=signing_key)
        assert all(x.kind == "cleanup-invalid" for x in report.breaks), report.breaks
        return [x.detail for x in report.breaks]

    # Bounds raised in the record: the digest no longer recomputes (with or without a key), and
    # they exceed the checkpoint's partition heads.
    raised = f"'{{{partition(b)}}}', to_jsonb(1 + (partition_bounds ->> '{partition(b)}')::bigint)"
    await sql(
        scratch_database,
        f"UPDATE journal_cleanups SET partition_bounds = jsonb_set(partition_bounds, {raised})",
    )
    found = await breaks()
    assert len(found) == 2 and "beyond what checkpoint" in found[0] and "digest" in found[1], found
    assert len(await breaks(key)) == 2  # the signature signs the digest, which still holds
    lowered = f"'{{{partition(b)}}}', to_jsonb((partition_bounds ->> '{partition(b)}')::bigint - 1)"
    await sql(
        scratch_database,
        f"UPDATE journal_cleanups SET partition_bounds = jsonb_set(partition_bounds, {lowered})",
    )
    assert await breaks(key) == []
    # Dropping the bounds does not make a v1 record of it: the digest started from them.
    await sql(scratch_database, "UPDATE journal_cleanups SET partition_bounds = NULL")
    assert len(await breaks()) == 1
    # A record from before partitions: no bounds, digest from GENESIS, the v1 signature.
    (run,) = await fetch(scratch_database, "SELECT * FROM journal_cleanups")
    anchors = await fetch(
        scratch_database,
        "SELECT entity, id, revision, hash, snapshot_hash FROM journal_retention ORDER BY seq",
    )
    digest = GENESIS
    for x in anchors:
        leaf = anchor_leaf(x["entity"], x["id"], x["revision"], bytes(x["hash"]), bytes(x["snapshot_hash"]))
        digest = fold_anchor(digest, leaf)
    message = cleanup_message(run["id"], run["cutoff"], run["entities"], run["events"], digest, v2=False)
    signature = load_signing_key(key).sign(message)
    await sql(
        scratch_database,
        f"UPDATE journal_cleanups SET digest = decode('{digest.hex()}', 'hex'), "
        f"signature = decode('{signature.hex()}', 'hex')",
    )
    assert await breaks(key) == []
    await sql(scratch_database, "UPDATE journal_cleanups SET events = events + 1")
    assert await breaks(key) == ["the signature does not verify"]
