"""The recorder (twinstore.store.recorder), the one appender of the journal, for every entity.

One suite for things (the journal's group commit), policies (PolicyStore) and anomaly labels:
each event lands in its id's partition with the next ``seq`` of that partition and its entity's
chain hash; seqs are gapless and in commit order per partition under concurrency; partitions
commit in parallel; no write transaction touches more than one partition.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import pytest
import pytest_asyncio

from tests.conftest import bounded, new_thing_id, verify_chain
from twinstore.anomaly import store as anomaly_store
from twinstore.model.partition import partition_of
from twinstore.model.policy import PolicyEvent, PolicyState
from twinstore.model.thing import Modify
from twinstore.runtime import create_pool
from twinstore.store.journal import Journal, WriteRequest
from twinstore.store.policies import PolicyStore
from twinstore.store.recorder import Recorder
from twinstore.store.schema import migrate

PARTITIONS = 8


@dataclass
class Store:
    pool: asyncpg.Pool
    recorder: Recorder
    journal: Journal
    policies: PolicyStore


@pytest_asyncio.fixture(loop_scope="session")
async def store(scratch_database: str) -> AsyncIterator[Store]:
    pool = await create_pool(scratch_database, 8)
    try:
        async with pool.acquire() as con:
            await migrate(con, PARTITIONS)
        recorder = await Recorder.load(pool)
        journal = Journal(pool, recorder=recorder, writers=4)
        journal.start()
        try:
            yield Store(pool, recorder, journal, PolicyStore(pool, recorder=recorder))
        finally:
            await bounded(journal.stop(), 20, "stopping the journal")
    finally:
        await bounded(pool.close(), 20, "closing the pool")


# ---- one writer per entity type: each appends one event of an entity through the recorder ----

Writer = Callable[[Store, str], Awaitable[tuple[str, str]]]  # -> (entity, journal id)


async def write_thing(s: Store, key: str) -> tuple[str, str]:
    await s.journal.write(
        WriteRequest(thing_id=key, command=Modify(path="/", value={"attributes": {}}), originator="nginx:t")
    )
    return "thing", key


async def write_policy(s: Store, key: str) -> tuple[str, str]:
    def decide(before: PolicyState, now: datetime) -> PolicyEvent:
        return PolicyEvent(
            policy_id=key,
            revision=before.revision + 1,
            timestamp=now,
            action="modified" if before.doc is not None else "created",
            path="/",
            value={"policyId": key, "entries": {}},
            originator="nginx:t",
        )

    await s.policies.write(key, decide)
    return "policy", key


async def write_label(s: Store, key: str) -> tuple[str, str]:
    async with s.pool.acquire() as con:
        revision = 1 + int(await con.fetchval("SELECT count(*) FROM anomalies WHERE thing_id = $1", key))
        await con.execute(
            "INSERT INTO anomalies (thing_id, feature_id, revision, ts, score, threshold, contributions, "
            "partition) VALUES ($1, 'f', $2, now(), 9, 1, '{}', $3)",
            key,
            revision,
            s.recorder.partition(key),
        )
    assert await anomaly_store.label_anomaly(s.pool, s.recorder, key, "f", revision, "confirmed", "nginx:t")
    return "anomaly", f"{key}/f"


WRITERS: dict[str, Writer] = {"thing": write_thing, "policy": write_policy, "anomaly": write_label}


@pytest.fixture(params=sorted(WRITERS))
def writer(request: pytest.FixtureRequest) -> Writer:
    return WRITERS[request.param]


async def rows(pool: asyncpg.Pool, entity: str, entity_id: str) -> list[asyncpg.Record]:
    async with pool.acquire() as con:
        return list(
            await con.fetch(
                "SELECT partition, seq, entity, id, revision, ts, action, path, value::text AS value, "
                "originator, correlation_id, hash, headers FROM journal WHERE entity = $1 AND id = $2 "
                "ORDER BY revision",
                entity,
                entity_id,
            )
        )


async def test_an_event_lands_in_its_partition_with_the_next_seq_and_its_chain_hash(
    store: Store, writer: Writer
) -> None:
    key = new_thing_id()
    partition = partition_of(key, PARTITIONS)
    async with store.pool.acquire() as con:
        head = await con.fetchval("SELECT seq FROM partition_heads WHERE partition = $1", partition)
    entity, entity_id = await writer(store, key)
    entity, entity_id = await writer(store, key)
    events = await rows(store.pool, entity, entity_id)
    assert [r["partition"] for r in events] == [partition, partition]  # a label: its thing's partition
    assert [r["seq"] for r in events] == [head + 1, head + 2]
    async with store.pool.acquire() as con:
        moved = await con.fetchval("SELECT seq FROM partition_heads WHERE partition = $1", partition)
    assert moved == head + 2
    verify_chain(events)


async def test_every_append_notifies_the_relays(store: Store, writer: Writer, scratch_database: str) -> None:
    con = await asyncpg.connect(scratch_database)
    heard = asyncio.Event()
    try:
        await con.add_listener("twinstore_journal", lambda *_: heard.set())
        await writer(store, new_thing_id())
        await asyncio.wait_for(heard.wait(), 5)
    finally:
        await con.close()


# ---- ordering and parallelism --------------------------------------------------------------


async def test_seqs_are_gapless_and_in_commit_order_per_partition_under_concurrency(store: Store) -> None:
    """Writers of all three entity types on many things at once; a reader that looks at each
    partition while they write must never find a seq missing below one it has seen: a seq
    handed out before another commits later would leave such a gap for a moment (the relay,
    tailing by seq, would skip it for ever)."""
    keys = [new_thing_id() for _ in range(24)]
    stop = asyncio.Event()
    gaps: list[str] = []
    looks = 0

    async def look() -> None:
        nonlocal looks
        async with store.pool.acquire() as con:
            while not stop.is_set():
                for r in await con.fetch(
                    "SELECT partition, array_agg(seq ORDER BY seq) AS seqs FROM journal GROUP BY partition"
                ):
                    seqs = list(r["seqs"])
                    if seqs != list(range(1, len(seqs) + 1)):
                        gaps.append(f"partition {r['partition']}: {seqs[:10]}...")
                looks += 1

    async def work(key: str) -> None:
        for i in range(6):
            await WRITERS[("thing", "policy", "anomaly")[i % 3]](store, key)

    looker = asyncio.create_task(look())
    await asyncio.gather(*(work(k) for k in keys))
    stop.set()
    await looker
    assert looks > 3 and not gaps, gaps[:5]
    async with store.pool.acquire() as con:
        heads = {r["partition"]: r["seq"] for r in await con.fetch("SELECT * FROM partition_heads")}
        counted = await con.fetch("SELECT partition, count(*) AS n FROM journal GROUP BY 1")
        counts = {r["partition"]: r["n"] for r in counted}
    assert {p: heads[p] for p in counts} == counts
    assert sum(counts.values()) == len(keys) * 6


async def test_partitions_commit_in_parallel_and_one_partition_waits_for_its_lock(store: Store) -> None:
    keys = [new_thing_id() for _ in range(64)]
    by_partition: dict[int, str] = {}
    for key in keys:
        by_partition.setdefault(partition_of(key, PARTITIONS), key)
    (held, held_key), (_, free_key) = list(by_partition.items())[:2]
    await write_thing(store, held_key)
    await write_thing(store, free_key)
    async with store.pool.acquire() as con, con.transaction():
        await store.recorder.lock(con, [held])
        # another partition commits while this one is locked ...
        await asyncio.wait_for(write_thing(store, free_key), 5)
        # ... this one waits for the lock
        blocked = asyncio.create_task(write_thing(store, held_key))
        await asyncio.sleep(0.5)
        assert not blocked.done()
    await asyncio.wait_for(blocked, 5)


async def test_no_write_transaction_touches_more_than_one_partition(store: Store) -> None:
    """What a database distributed by partition (Citus) needs for single-shard transactions:
    rows written by one transaction share their xmin; among journal rows and the thing
    projection no xmin spans two partitions, though the writes were queued together."""
    keys = [new_thing_id() for _ in range(200)]
    await asyncio.gather(*(write_thing(store, k) for k in keys))
    await asyncio.gather(*(w(store, k) for k in keys[:20] for w in (write_policy, write_label)))
    async with store.pool.acquire() as con:
        spans = await con.fetch(
            "SELECT xmin::text AS tx, count(DISTINCT partition) AS n FROM journal GROUP BY 1 "
            "HAVING count(DISTINCT partition) > 1"
        )
        transactions = await con.fetchval("SELECT count(DISTINCT xmin::text) FROM journal")
        things = await con.fetch("SELECT xmin::text AS tx, array_agg(id) AS ids FROM things GROUP BY 1")
    assert not spans, spans
    assert transactions < 200 + 40  # group commit still shares transactions within a partition
    for r in things:
        assert len({partition_of(i, PARTITIONS) for i in r["ids"]}) == 1, r["ids"]


def test_the_recorder_is_the_only_code_that_appends_to_the_journal() -> None:
    """Every INSERT into the journal is the recorder's (the one exception: `twinstore import`
    bulk-loads an empty store with COPY, numbering each partition itself)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "twinstore"
    writers = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"INSERT\s+INTO\s+journal\s*\(", p.read_text(), re.IGNORECASE)
    )
    assert writers == ["store/recorder.py"]


def test_partition_of_is_crc32_and_stable() -> None:
    # The same numbers in every process and language (an adapter in another language must agree).
    assert partition_of("org.acme:pump-1", 64) == 15
    assert partition_of("org.acme:pump-2", 64) == 53
    assert all(0 <= partition_of(new_thing_id(), 64) < 64 for _ in range(100))


async def test_with_groups_a_transaction_stays_within_its_group_of_partitions(store: Store) -> None:
    """journal_partitions_per_transaction = 4: transactions hold several partitions, all of one
    group (partition // 4), never two groups."""
    grouped = Journal(store.pool, recorder=store.recorder, writers=2, group_size=4)
    grouped.start()
    try:
        keys = [new_thing_id("org.grouped") for _ in range(200)]
        await asyncio.gather(
            *(
                grouped.write(
                    WriteRequest(
                        thing_id=k, command=Modify(path="/", value={"attributes": {}}), originator="nginx:t"
                    )
                )
                for k in keys
            )
        )
    finally:
        await bounded(grouped.stop(), 20, "stopping the journal")
    async with store.pool.acquire() as con:
        spans = await con.fetch(
            "SELECT xmin::text AS tx, array_agg(DISTINCT partition) AS parts FROM journal "
            "WHERE id LIKE 'org.grouped:%' GROUP BY 1"
        )
    assert any(len(r["parts"]) > 1 for r in spans)  # groups do share transactions
    assert all(len({p // 4 for p in r["parts"]}) == 1 for r in spans), [r["parts"] for r in spans]
