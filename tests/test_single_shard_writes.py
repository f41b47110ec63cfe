"""Every write transaction writes one journal partition (issue 17, "Citus-ready for real").

A database distributed by partition (README, "Running on Citus") runs a transaction on one shard
only if every row it writes carries the same partition. The test's own database records, by
trigger on every table, the transaction id, the table and the partition of each row written;
then real writes go through the in-process API, the ingest consumers, the relay and the anomaly
store of a runtime with ``journal_partitions_per_transaction = 1``: things created, replaced,
merged, patched and deleted concurrently in many partitions, policies created, changed and
deleted, telemetry ingested with its progress mark, detectors attached, an anomaly labelled a
false alarm and learnt in the scorer's checkpoint. Each transaction must have written rows of
one partition, and no row of a table without one.

The one case of two partitions, a new thing bringing a new policy of another id, is two
transactions, each of one partition; when the thing's then fails, the policy is deleted again
(Ditto's rollback of an implicitly created policy). With the default of 8 partitions per
transaction, concurrent writes do share transactions across partitions (the check sees it).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from tests.conftest import AUTH, bounded, eventually, new_thing_id
from tests.test_ingest import Source, property_values
from twinstore.api.app import create_app
from twinstore.bus.ingest import Update
from twinstore.model.partition import partition_of
from twinstore.runtime import Runtime
from twinstore.settings import Settings
from twinstore.store.schema import migrate

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARTITIONS = 16
THINGS = 48
PATH = "/features/flow/properties/value"

# Every row written, by trigger: the transaction, the table, the row's partition (NULL: a table
# without one) and its id (for the test to find an entity's transactions).
RECORD = """
CREATE TABLE write_partitions (txid bigint NOT NULL, tbl text NOT NULL, partition integer, id text);
CREATE FUNCTION record_write_partition() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r jsonb := CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END;
BEGIN
    INSERT INTO write_partitions
    VALUES (txid_current(), TG_TABLE_NAME, (r ->> 'partition')::integer,
            coalesce(r ->> 'id', r ->> 'thing_id', r ->> 'consumer', r ->> 'name'));
    RETURN NULL;
END
$$;
"""
TABLES = """
SELECT table_name FROM information_schema.tables
WHERE table_schema = 'public' AND table_type = 'BASE TABLE' AND table_name <> 'write_partitions'
"""
# Per write transaction: the partitions of its rows and whether it wrote a row without one.
TRANSACTIONS = """
SELECT txid, array_agg(DISTINCT tbl ORDER BY tbl) AS tables,
       coalesce(array_agg(DISTINCT partition) FILTER (WHERE partition IS NOT NULL), '{}') AS partitions,
       bool_or(partition IS NULL) AS unpartitioned
FROM write_partitions GROUP BY txid
"""


def policy(subject: str = "nginx:ditto") -> dict[str, Any]:
    return {
        "entries": {
            "owner": {
                "subjects": {subject: {"type": "test"}},
                "resources": {
                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                },
            }
        }
    }


def id_in(partition: int, prefix: str) -> str:
    """A new id of ``partition``."""
    while True:
        entity_id = new_thing_id(prefix)
        if partition_of(entity_id, PARTITIONS) == partition:
            return entity_id


@asynccontextmanager
async def recorded_runtime(
    own_settings: Settings, per_transaction: int
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, asyncpg.Connection]]:
    """A runtime on the test's own database, its every row write recorded from the start."""
    s = msgspec.structs.replace(
        own_settings,
        partitions=PARTITIONS,
        journal_partitions_per_transaction=per_transaction,
        snapshot_every=3,
        anomaly_checkpoint_seconds=0.2,
    )
    con = await asyncpg.connect(s.database_url)
    try:
        await migrate(con, PARTITIONS)
        await con.execute(RECORD)
        for r in await con.fetch(TABLES):
            await con.execute(
                "CREATE TRIGGER record_write_partition AFTER INSERT OR UPDATE OR DELETE "
                f'ON "{r["table_name"]}" FOR EACH ROW EXECUTE FUNCTION record_write_partition()'
            )
        rt = Runtime(s)
        await bounded(rt.open(), 60, "opening the runtime")
        try:
            transport = httpx.ASGITransport(app=create_app(s, rt))
            async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=AUTH) as c:
                yield rt, c, con
        finally:
            await bounded(rt.close(), 60, "closing the runtime")
    finally:
        await con.close()


async def transactions(con: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await con.fetch(TRANSACTIONS))


async def all_ok(*requests: Awaitable[httpx.Response]) -> list[httpx.Response]:
    responses = await asyncio.gather(*requests)
    for r in responses:
        assert r.status_code < 300, (r.request.method, r.request.url, r.status_code, r.text)
    return list(responses)


@pytest.mark.timeout(180)
async def test_every_write_transaction_writes_one_partition(own_settings: Settings) -> None:
    async with recorded_runtime(own_settings, per_transaction=1) as (rt, client, con):
        ns = f"org.shard{secrets.token_hex(3)}"
        policies = [id_in(p, ns) for p in range(0, PARTITIONS, 3)]
        await all_ok(*(client.put(f"/api/2/policies/{pid}", json=policy()) for pid in policies))
        things = [id_in(i % PARTITIONS, ns) for i in range(THINGS)]

        def thing(i: int, n: int) -> dict[str, Any]:
            return {
                "policyId": policies[i % len(policies)],
                "attributes": {"n": n},
                "features": {"flow": {"properties": {"value": n}}},
            }

        # created concurrently, then replaced, merged, patched and changed in place: group
        # commits of many partitions at once, snapshots every 3 revisions
        await all_ok(*(client.put(f"/api/2/things/{t}", json=thing(i, 0)) for i, t in enumerate(things)))
        for n in range(1, 4):
            await all_ok(
                *(client.put(f"/api/2/things/{t}", json=thing(i, n)) for i, t in enumerate(things)),
                *(
                    client.patch(
                        f"/api/2/things/{t}/attributes",
                        content=f'{{"m": {n}}}',
                        headers={"content-type": "application/merge-patch+json"},
                    )
                    for t in things
                ),
                *(client.put(f"/api/2/things/{t}/attributes/k", json=n) for t in things),
            )
        # policy changes (one of them while things use it) and a deletion (every partition's lock)
        reader = policy("nginx:reader")["entries"]["owner"]
        await all_ok(*(client.put(f"/api/2/policies/{pid}/entries/reader", json=reader) for pid in policies))
        spare = id_in(PARTITIONS - 1, ns)
        await all_ok(client.put(f"/api/2/policies/{spare}", json=policy()))
        await all_ok(client.delete(f"/api/2/policies/{spare}"))
        # telemetry through the ingest consumers: its events and progress mark in one transaction
        source = Source(rt, "ditto-user")
        await source.values([Update(t, PATH, 1000 + i) for i, t in enumerate(things)])

        async def ingested() -> bool:
            found = await asyncio.gather(*(property_values(rt.settings, t, PATH) for t in things))
            return all(1000 + i in values for i, values in enumerate(found))

        await eventually(ingested, 30, "the telemetry applied")
        # a detector attached and detached, an anomaly (as the scorer writes it) labelled
        labelled = things[5]
        detector = {"algorithm": "mahalanobis", "parameters": {"warmup": 20}, "properties": ["value"]}
        await all_ok(client.put(f"/api/2/things/{labelled}/features/flow/anomaly/detector", json=detector))
        await all_ok(client.put(f"/api/2/things/{things[6]}/features/flow/anomaly/detector", json=detector))
        await all_ok(client.delete(f"/api/2/things/{things[6]}/features/flow/anomaly/detector"))
        await con.execute(
            "INSERT INTO anomalies (thing_id, feature_id, revision, ts, score, threshold, contributions, "
            "partition) VALUES ($1, 'flow', 2, now(), 9, 1, '{}', $2)",
            labelled,
            partition_of(labelled, PARTITIONS),
        )
        label = f"/api/2/things/{labelled}/features/flow/anomaly/anomalies/2/label"
        await all_ok(client.put(label, json="false-alarm"))
        # the scorer of its partition scores new values and checkpoints: its detector's state,
        # and the false alarm marked as learnt, in one transaction
        for n in range(5):
            await all_ok(client.put(f"/api/2/things/{labelled}/features/flow/properties/value", json=n))

        async def checkpointed() -> bool:
            saved = await con.fetchval("SELECT count(*) FROM anomaly_state WHERE thing_id = $1", labelled)
            fed = await con.fetchval(
                "SELECT fed FROM anomalies WHERE thing_id = $1 AND revision = 2", labelled
            )
            return bool(saved) and bool(fed)

        await eventually(checkpointed, 30, "the scorer's checkpoint with the false alarm learnt")
        # deleted concurrently, in every partition
        await all_ok(*(client.delete(f"/api/2/things/{t}") for t in things[:PARTITIONS]))

        # the relay publishes every partition (its cursors are written too)
        async def published() -> bool:
            heads = await con.fetchval("SELECT sum(seq) FROM partition_heads")
            cursors = await con.fetchval("SELECT sum(seq) FROM relay_cursors WHERE name = 'events'")
            return bool(heads and cursors == heads)

        await eventually(published, 30, "the relay's cursors at the partitions' heads")

        spanning = [r for r in await transactions(con) if len(r["partitions"]) != 1 or r["unpartitioned"]]
        assert not spanning, [dict(r) for r in spanning[:5]]
        written = {t for r in await transactions(con) for t in r["tables"]}
        # every kind of write happened (the check would pass vacuously otherwise)
        assert {
            "journal",
            "partition_heads",
            "things",
            "snapshots",
            "policies",
            "ingest_progress",
            "anomaly_detectors",
            "anomaly_state",
            "anomalies",
            "relay_cursors",
        } <= written, written
        spread = await con.fetch(
            "SELECT partition, count(DISTINCT txid) AS n FROM write_partitions WHERE tbl = 'journal' "
            "GROUP BY partition"
        )
        assert len(spread) == PARTITIONS and all(r["n"] > 3 for r in spread)


@pytest.mark.timeout(120)
async def test_a_new_thing_with_a_new_policy_of_another_partition(own_settings: Settings) -> None:
    """Two transactions, one partition each; a thing that then fails takes its policy back."""
    async with recorded_runtime(own_settings, per_transaction=1) as (_, client, con):
        ns = f"org.shard{secrets.token_hex(3)}"
        thing_id, policy_id = id_in(1, ns), id_in(2, ns)
        r = await client.put(f"/api/2/things/{thing_id}", json={"policyId": policy_id, "_policy": policy()})
        assert r.status_code == 201, r.text
        rows = await con.fetch(
            "SELECT DISTINCT txid, partition FROM write_partitions "
            "WHERE tbl = 'journal' AND id = any($1::text[])",
            [thing_id, policy_id],
        )
        assert len(rows) == 2 and {r["partition"] for r in rows} == {1, 2}, [dict(r) for r in rows]
        assert not [r for r in await transactions(con) if len(r["partitions"]) != 1 or r["unpartitioned"]]

        # the policy is committed first; the thing is then refused (too large for
        # max_thing_bytes, which only the journal checks): the policy is deleted again
        failed, undone = id_in(3, ns), id_in(4, ns)
        big = {"policyId": undone, "_policy": policy(), "attributes": {"blob": "x" * 110_000}}
        r = await client.put(f"/api/2/things/{failed}", json=big)
        assert r.status_code == 413, r.text
        events = await con.fetch(
            "SELECT action, path FROM journal WHERE entity = 'policy' AND id = $1 ORDER BY revision", undone
        )
        assert [(e["action"], e["path"]) for e in events] == [("created", "/"), ("deleted", "/")]
        assert (await client.get(f"/api/2/policies/{undone}")).status_code == 404
        assert (await client.get(f"/api/2/things/{failed}")).status_code == 404
        # as if never taken: the same creation, within the limit, goes through
        r = await client.put(f"/api/2/things/{failed}", json={**big, "attributes": {}})
        assert r.status_code == 201, r.text
        assert not [r for r in await transactions(con) if len(r["partitions"]) != 1 or r["unpartitioned"]]


@pytest.mark.timeout(120)
async def test_with_several_partitions_per_transaction_they_share_transactions(
    own_settings: Settings,
) -> None:
    """The default (8 per transaction): concurrent writes of one group of partitions commit
    together, which the recorded check sees (so it is no check that always passes)."""
    async with recorded_runtime(own_settings, per_transaction=8) as (_, client, con):
        ns = f"org.shard{secrets.token_hex(3)}"
        things = [id_in(i % PARTITIONS, ns) for i in range(4 * PARTITIONS)]

        async def spans() -> bool:
            await all_ok(*(client.put(f"/api/2/things/{t}", json={"attributes": {}}) for t in things))
            rows = await transactions(con)
            assert all(len({p // 8 for p in r["partitions"]}) == 1 for r in rows)  # one group each
            return any(len(r["partitions"]) > 1 for r in rows)

        await eventually(spans, 60, "a transaction of several partitions", interval=0.1)
