"""The journal on real PostgreSQL: group commit, gapless revisions, hash chain, snapshots."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import SELECT_JOURNAL, bounded, new_thing_id, verify_chain
from twinstore.model.errors import (
    HeaderInvalidError,
    JsonInvalidError,
    NotFoundError,
    PreconditionFailedError,
)
from twinstore.model.thing import Delete, Merge, Modify, ThingState, replay
from twinstore.runtime import Runtime
from twinstore.store.journal import Journal, WriteRequest
from twinstore.store.recorder import Recorder


def journal(runtime: Runtime) -> Journal:
    assert runtime.journal is not None
    return runtime.journal


def put(thing_id: str, path: str, value: object, **kw: object) -> WriteRequest:
    return WriteRequest(
        thing_id=thing_id, command=Modify(path=path, value=value), originator="nginx:test", **kw
    )  # type: ignore[arg-type]


async def test_concurrent_writes_share_transactions(runtime: Runtime) -> None:
    j = journal(runtime)
    thing_id = new_thing_id()
    await j.write(put(thing_id, "/", {"features": {"f": {"properties": {}}}}))
    batches_before = j.batches
    results = await asyncio.gather(
        *(j.write(put(thing_id, f"/features/f/properties/p{i}", i)) for i in range(200))
    )
    assert sorted(r.event.revision for r in results) == list(range(2, 202))
    assert j.batches - batches_before < 200  # group commit: fewer transactions than writes
    state = await j.load(thing_id)
    assert state.revision == 201
    assert state.doc is not None and len(state.doc["features"]["f"]["properties"]) == 200


async def test_failed_write_in_a_batch_does_not_affect_neighbours(runtime: Runtime) -> None:
    j = journal(runtime)
    a, b = new_thing_id(), new_thing_id()
    await j.write(put(a, "/", {}))
    results = await asyncio.gather(
        j.write(put(a, "/attributes/x", 1)),
        j.write(put(b, "/attributes/x", 1)),  # b does not exist: 404
        j.write(put(a, "/attributes/y", 2, if_match=['"rev:99"'])),  # 412
        j.write(put(a, "/attributes/z", 3)),
        j.write(put(a, "/attributes/n", "nul\x00")),  # PostgreSQL cannot store U+0000: 400
        j.write(put(a, "/attributes/m", 1, correlation_id="c\x00")),  # nor in a text column
        return_exceptions=True,
    )
    assert isinstance(results[5], HeaderInvalidError)
    assert isinstance(results[1], NotFoundError)
    assert isinstance(results[2], PreconditionFailedError)
    assert isinstance(results[4], JsonInvalidError)
    state = await j.load(a)
    assert state.revision == 3 and state.doc == {"thingId": a, "policyId": a, "attributes": {"x": 1, "z": 3}}
    assert not (await j.load(b)).exists


async def test_hash_chain_and_gapless_journal(runtime: Runtime) -> None:
    j = journal(runtime)
    thing_id = new_thing_id()
    await j.write(put(thing_id, "/", {"attributes": {"a": 1}}))
    for i in range(5):
        await j.write(
            WriteRequest(
                thing_id=thing_id,
                command=Merge(path="/attributes", value={"a": i, "b": None}),
                originator="nginx:x",
            )
        )
    await j.write(
        WriteRequest(thing_id=thing_id, command=Delete(path="/"), originator="nginx:x", correlation_id="c-1")
    )
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con:
        rows = await con.fetch(SELECT_JOURNAL, thing_id)
        head = await con.fetchval("SELECT hash FROM things WHERE id = $1", thing_id)
    assert len(rows) == 7
    assert bytes(head) == verify_chain(rows)
    assert rows[-1]["action"] == "deleted" and rows[-1]["correlation_id"] == "c-1"


@pytest.mark.parametrize("target", [1, 9, 10, 11, 25, 30])
async def test_snapshot_plus_later_events_equals_full_replay(runtime: Runtime, target: int) -> None:
    j = journal(runtime)  # the test settings snapshot every 10 revisions
    thing_id = new_thing_id()
    await j.write(put(thing_id, "/", {"attributes": {}}))
    for i in range(2, 31):
        await j.write(put(thing_id, f"/attributes/a{i % 4}", i))
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con:
        snaps = await con.fetch("SELECT revision FROM snapshots WHERE id = $1 ORDER BY revision", thing_id)
    assert [s["revision"] for s in snaps] == [10, 20, 30]
    full = replay(ThingState.absent(thing_id), await j.events(thing_id, 0, target))
    assert await j.load_at(thing_id, target) == full
    if target == 30:
        assert await j.load(thing_id) == full


async def test_two_journals_on_one_database_lose_no_update(runtime: Runtime) -> None:
    """Each journal plans from its cache; the heads checked under the lock catch the other's writes."""
    assert runtime.pool is not None
    first = journal(runtime)
    assert runtime.recorder is not None
    second = Journal(runtime.pool, snapshot_every=10, recorder=runtime.recorder)
    second.start()
    try:
        thing_id = new_thing_id()
        await first.write(put(thing_id, "/", {"attributes": {"n": 0}}))
        def redecided() -> int:  # found stale before the lock (prefetch) or under it
            return first.replans + first.prefetches + second.replans + second.prefetches

        replans = redecided()
        for i in range(1, 41):
            j = first if i % 2 else second
            await j.write(
                WriteRequest(
                    thing_id=thing_id,
                    command=Merge(path="/attributes", value={f"k{i}": i}),
                    originator="nginx:test",
                )
            )
        state = await first.load(thing_id)
        assert state.revision == 41
        assert state.doc is not None and len(state.doc["attributes"]) == 41  # n and k1..k40
        assert redecided() - replans >= 39  # every switch found a moved head
        # once switches are frequent, they are found before the lock (the lock only compares)
        assert first.prefetches + second.prefetches >= 20
        # both caches are current again: the next write of each plans without a re-read
        before = first.replans + first.prefetches
        await first.write(put(thing_id, "/attributes/n", 1))
        assert first.replans + first.prefetches == before + 1  # second wrote last
        await first.write(put(thing_id, "/attributes/n", 2))
        assert first.replans + first.prefetches == before + 1
    finally:
        await bounded(second.stop(), 20, "stopping the second journal")


async def test_unreachable_database_is_unavailable_not_internal(settings: object) -> None:
    from twinstore.model.errors import UnavailableError
    from twinstore.model.partition import DEFAULT_PARTITIONS
    from twinstore.runtime import create_pool

    pool = await create_pool(settings.database_url, 1)  # type: ignore[attr-defined]
    await pool.close()
    with pytest.raises(UnavailableError):
        await Journal(pool, recorder=Recorder(DEFAULT_PARTITIONS)).load(new_thing_id())


# ---- one member's input never fails its batch (issue 15 item 9) ---------------------------


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_failures_the_database_decides_fail_only_their_write(
    settings: object, scratch_database: str
) -> None:
    """PostgreSQL refusing a row (a B-tree index row over its maximum with a search index
    configured; U+0000 in a jsonb column) fails that write alone with a 4xx without driver text;
    the writes it shared its transaction with commit. Before, the whole batch answered 503."""
    import secrets

    from twinstore.model.errors import InvalidInputError, TooLargeError
    from twinstore.runtime import create_pool
    from twinstore.store.schema import ensure_search_indexes, migrate

    pool = await create_pool(scratch_database, 4)
    j: Journal | None = None
    try:
        async with pool.acquire() as con:
            await migrate(con)
            await ensure_search_indexes(con, [("attributes", "big")])
        # one group of every partition: the writes share transactions, the isolation is tested
        j = Journal(pool, recorder=await Recorder.load(pool), group_size=64)
        j.start()
        things = [new_thing_id() for _ in range(40)]
        await asyncio.gather(*(j.write(put(t, "/", {"attributes": {}})) for t in things))
        huge = secrets.token_hex(20_000)  # 40 KB that does not compress below a B-tree row's 2.7 KB
        for _ in range(3):  # the two loops split the writes: each round must still isolate
            batches, isolated = j.batches, j.isolated
            writes = [j.write(put(t, "/attributes/n", i)) for i, t in enumerate(things)]
            writes.insert(7, j.write(put(things[7], "/attributes/big", huge)))
            writes.insert(21, j.write(put(things[20], "/attributes/x", 1, headers={"source": "s\x00"})))
            results = await asyncio.gather(*writes, return_exceptions=True)
            assert isinstance(results[7], TooLargeError), results[7]
            assert results[7].status == 413 and "index" in results[7].message
            assert isinstance(results[21], InvalidInputError), results[21]
            assert results[21].status == 400
            for bad in (results[7], results[21]):
                assert "asyncpg" not in bad.message and "exceeds maximum" not in bad.message
            good = [r for i, r in enumerate(results) if i not in (7, 21)]
            assert all(not isinstance(r, BaseException) for r in good), good
            assert j.isolated - isolated == 2
            assert j.batches - batches < len(writes) - 10  # they did share transactions
        states = await j.load_many(things)
        assert all(s.doc is not None and s.doc["attributes"].get("n") is not None for s in states.values())
        assert "big" not in (states[things[7]].doc or {}).get("attributes", {})
        assert states[things[20]].revision == 4  # created, n three times; never x
    finally:
        if j is not None:
            await asyncio.wait_for(j.stop(), 20)
        await asyncio.wait_for(pool.close(), 20)


async def test_failures_python_raises_while_deciding_fail_only_their_write(runtime: Runtime) -> None:
    """A value too deeply nested to encode (orjson: 254 levels) reached the journal's plan and
    failed the whole batch; it is now that write's 400 (the service refuses it earlier still)."""
    j = journal(runtime)
    a, b = new_thing_id(), new_thing_id()
    await asyncio.gather(j.write(put(a, "/", {})), j.write(put(b, "/", {})))
    results = await asyncio.gather(
        j.write(put(a, "/attributes/x", 1)),
        j.write(put(b, "/attributes/deep", _nested(400))),
        j.write(put(a, "/attributes/y", 2)),
        j.write(put(b, "/attributes/z", 3)),
        return_exceptions=True,
    )
    assert isinstance(results[1], JsonInvalidError), results[1]
    assert [r for i, r in enumerate(results) if i != 1 and isinstance(r, BaseException)] == []
    assert (await j.load(a)).doc == {"thingId": a, "policyId": a, "attributes": {"x": 1, "y": 2}}
    assert (await j.load(b)).doc == {"thingId": b, "policyId": b, "attributes": {"z": 3}}


async def test_an_event_is_bounded_so_that_its_envelope_fits_the_bus(runtime: Runtime) -> None:
    """A change's value and path are bounded by max_thing_bytes even when the thing stays small
    (a merge of many nulls), its correlation-id and originator by max_header_bytes."""
    from twinstore.model.errors import HeadersTooLargeError, TooLargeError

    j = journal(runtime)
    t = new_thing_id()
    await j.write(put(t, "/", {"attributes": {}}))
    nulls = {f"k{i:06}": None for i in range(j.max_thing_bytes // 10)}
    with pytest.raises(TooLargeError):
        await j.write(
            WriteRequest(thing_id=t, command=Merge(path="/attributes", value=nulls), originator="nginx:test")
        )
    with pytest.raises(HeadersTooLargeError):
        await j.write(put(t, "/attributes/a", 1, correlation_id="c" * (j.max_header_bytes + 1)))
    assert (await j.load(t)).revision == 1
