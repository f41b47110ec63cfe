"""The event fan-out against real NATS: dedupe, order, partial events, slow subscribers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from tests.api.helpers import full_access, relay_held
from tests.conftest import new_thing_id
from twinstore.bus.envelope import event_envelope
from twinstore.bus.relay import journal_heads
from twinstore.fanout import (
    Delivery,
    FanOut,
    SlowConsumerError,
    Subscription,
    decode_event,
    filter_scope,
    intersect_scopes,
    position_of,
)
from twinstore.model import rql
from twinstore.model.thing import Event
from twinstore.runtime import Runtime
from twinstore.settings import Settings

DITTO = ("nginx:ditto",)
OTHER = ("nginx:other",)


def fanout(runtime: Runtime) -> FanOut:
    assert runtime.fanout is not None
    return runtime.fanout


async def next_delivery(sub: Subscription, timeout: float = 30) -> Delivery:
    return await asyncio.wait_for(sub.get(), timeout)


async def publish(runtime: Runtime, thing_id: str, revision: int, path: str, value: Any) -> None:
    """An event envelope on NATS by hand, as the relay would publish it."""
    assert runtime.nc is not None
    event = Event(
        thing_id=thing_id,
        revision=revision,
        timestamp=datetime.now(UTC),
        action="modified",
        path=path,
        value=value,
        originator="nginx:ditto",
    )
    headers = {"Nats-Msg-Id": f"thing:{thing_id}:{revision}", "Ditto-Thing-Id": thing_id}
    await runtime.nc.publish(
        runtime.subjects.event_subject(thing_id), orjson.dumps(event_envelope(event)), headers=headers
    )


async def test_decode_event_round_trips_the_envelope() -> None:
    event = Event(
        thing_id="a.b:c",
        revision=7,
        timestamp=datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC),
        action="merged",
        path="/features/f/properties",
        value={"x": 1},
        originator="nginx:ditto",
        correlation_id="cid",
    )
    assert decode_event(orjson.dumps(event_envelope(event)), {"Ditto-Thing-Id": "a.b:c"}) == event
    assert decode_event(orjson.dumps(event_envelope(event)), None) == event
    assert decode_event(b"not json", None) is None


async def test_events_arrive_in_revision_order(client: httpx.AsyncClient, runtime: Runtime) -> None:
    thing_id = new_thing_id()
    sub = fanout(runtime).subscribe(DITTO, thing_ids=frozenset([thing_id]))
    await fanout(runtime).listening()
    try:
        assert (await client.put(f"/api/2/things/{thing_id}", json={})).status_code == 201
        for i in range(5):
            r = await client.put(f"/api/2/things/{thing_id}/attributes/a", json=i)
            assert r.status_code in (201, 204)
        revisions = [(await next_delivery(sub)).event.revision for _ in range(6)]
        assert revisions == [1, 2, 3, 4, 5, 6]
    finally:
        sub.close()


async def test_a_republished_envelope_is_delivered_once(client: httpx.AsyncClient, runtime: Runtime) -> None:
    thing_id = new_thing_id()
    sub = fanout(runtime).subscribe(DITTO, thing_ids=frozenset([thing_id]))
    await fanout(runtime).listening()
    try:
        # The relay publishes the creation (revision 1) whenever it gets to it: waited for, so
        # it cannot arrive among the envelopes below (a run once counted it there).
        assert (await client.put(f"/api/2/things/{thing_id}", json={})).status_code == 201
        assert (await next_delivery(sub)).event.revision == 1
        await publish(runtime, thing_id, 100, "/attributes/x", 1)
        await publish(runtime, thing_id, 100, "/attributes/x", 1)  # a relay republish
        await publish(runtime, thing_id, 99, "/attributes/x", 0)  # older than what was seen
        await publish(runtime, thing_id, 101, "/attributes/x", 2)
        first = await next_delivery(sub)
        second = await next_delivery(sub)
        # The third publish came last, so anything duplicated would have arrived before it.
        assert [(first.event.revision, first.event.value), (second.event.revision, second.event.value)] == [
            (100, 1),
            (101, 2),
        ]
    finally:
        sub.close()


async def test_partial_events_and_unreadable_things(client: httpx.AsyncClient, runtime: Runtime) -> None:
    policy_id = new_thing_id("org.policy")
    policy = full_access("nginx:ditto")
    policy["entries"]["other"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/": {"grant": ["READ"], "revoke": []},
            "thing:/attributes/secret": {"grant": [], "revoke": ["READ"]},
        },
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=policy)).status_code == 201
    shared, private = new_thing_id("org.fanout"), new_thing_id("org.fanout")
    sub = fanout(runtime).subscribe(OTHER, thing_ids=frozenset([shared, private]))
    await fanout(runtime).listening()
    try:
        r = await client.put(f"/api/2/things/{private}", json={"attributes": {"secret": 0}})
        assert r.status_code == 201  # default policy: only nginx:ditto
        r = await client.put(
            f"/api/2/things/{shared}",
            json={"policyId": policy_id, "attributes": {"secret": 1, "public": 2}},
        )
        assert r.status_code == 201
        r = await client.patch(
            f"/api/2/things/{shared}/attributes",
            content=b'{"secret": 3, "public": 4}',
            headers={"content-type": "application/merge-patch+json"},
        )
        assert r.status_code == 204
        assert (await client.put(f"/api/2/things/{shared}/attributes/secret", json=5)).status_code == 204
        assert (await client.put(f"/api/2/things/{shared}/attributes/public", json=6)).status_code == 204
        seen = [await next_delivery(sub) for _ in range(3)]
        assert [d.event.thing_id for d in seen] == [shared] * 3
        assert seen[0].event.value["attributes"] == {"public": 2}
        assert seen[1].event.value == {"public": 4}
        assert (seen[2].event.path, seen[2].event.value) == ("/attributes/public", 6)
        assert "secret" not in orjson.dumps([d.event.value for d in seen]).decode()
    finally:
        sub.close()


async def test_a_slow_subscriber_is_dropped_and_others_keep_receiving(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    thing_id = new_thing_id()
    assert (await client.put(f"/api/2/things/{thing_id}", json={})).status_code == 201
    slow = fanout(runtime).subscribe(DITTO, thing_ids=frozenset([thing_id]), maxsize=3)
    await fanout(runtime).listening()
    fast = fanout(runtime).subscribe(DITTO, namespaces=frozenset([thing_id.split(":")[0]]))
    await fanout(runtime).listening()
    try:
        for revision in range(1000, 1010):
            await publish(runtime, thing_id, revision, "/attributes/n", revision)
        got: list[int] = []
        while len(got) < 10:
            delivery = await next_delivery(fast)
            if delivery.event.thing_id == thing_id and delivery.event.revision >= 1000:  # not the creation
                got.append(delivery.event.revision)
        assert got == list(range(1000, 1010))
        with pytest.raises(SlowConsumerError, match="too slow: 3 events behind"):
            await next_delivery(slow)
    finally:
        slow.close()
        fast.close()


def test_filter_scope_narrows_by_thing_id_and_namespace() -> None:
    def scope(text: str) -> tuple[list[str], list[str]] | None:
        found = filter_scope(rql.parse_filter(text))
        return None if found is None else (sorted(found[0]), sorted(found[1]))

    assert scope('eq(thingId,"a:1")') == (["a:1"], [])
    assert scope('in(thingId,"a:1","b:2")') == (["a:1", "b:2"], [])
    assert scope('in(_namespace,"a","b")') == ([], ["a", "b"])
    assert scope('and(in(thingId,"a:1","b:2"),eq(_namespace,"a"),gt(attributes/x,1))') == (["a:1"], [])
    assert scope('and(eq(thingId,"a:1"),eq(thingId,"b:2"))') == ([], [])  # matches nothing
    assert scope('or(eq(thingId,"a:1"),in(_namespace,"b"),eq(thingId,"b:2"))') == (["a:1"], ["b"])
    unindexed = ['or(eq(thingId,"a:1"),exists(attributes/x))', 'not(eq(thingId,"a:1"))', "exists(attributes)"]
    for text in unindexed:
        assert scope(text) is None
    assert scope('like(thingId,"a:*")') is None
    assert filter_scope(None) is None
    both = intersect_scopes(
        (frozenset({"a:1", "b:2"}), frozenset({"c"})), (frozenset(), frozenset({"a", "c"}))
    )
    assert both == (frozenset({"a:1"}), frozenset({"c"}))


async def test_a_change_reaches_only_the_sessions_whose_filter_names_its_thing(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """1,000 subscribers filtering on their own things: routing one change touches one of them."""
    out = fanout(runtime)
    thing_id = new_thing_id("org.scope")
    namespace = thing_id.split(":")[0]
    assert (await client.put(f"/api/2/things/{thing_id}", json={"attributes": {"n": 0}})).status_code == 201
    all_before = len(out._all)
    others = [
        out.subscribe(DITTO, filter=rql.parse_filter(f'in(thingId,"{thing_id}-{i}a","{thing_id}-{i}b")'))
        for i in range(1000)
    ]
    mine = out.subscribe(
        DITTO,
        namespaces=frozenset([namespace]),
        filter=rql.parse_filter(f'and(eq(thingId,"{thing_id}"),gt(attributes/n,0))'),
    )
    await out.listening()
    try:
        assert len(out._all) == all_before  # none of them is asked about every event
        assert [mine] == list(out._by_thing[thing_id]) and namespace not in out._by_namespace
        assert all(out._by_thing[f"{thing_id}-{i}a"] == {others[i]} for i in range(1000))
        assert (await client.put(f"/api/2/things/{thing_id}/attributes/n", json=1)).status_code == 204
        while (delivery := await next_delivery(mine)).event.revision < 2:
            pass  # the creation, when the relay published it after the subscription
        assert delivery.event.revision == 2
        assert all(not sub._items and sub.reason is None for sub in others)
    finally:
        for sub in [*others, mine]:
            sub.close()
    assert not any(key.startswith(thing_id) for key in out._by_thing)  # unsubscribed from every key


async def test_a_subscription_skips_deliveries_at_or_below_its_start(runtime: Runtime) -> None:
    thing_id = new_thing_id()
    sub = fanout(runtime).subscribe(DITTO, thing_ids=frozenset([thing_id]))
    await fanout(runtime).listening()
    try:
        view: Any = object()

        def delivery(revision: int, position: tuple[int, int] | None) -> Delivery:
            event = Event(
                thing_id=thing_id,
                revision=revision,
                timestamp=datetime.now(UTC),
                action="modified",
                path="/attributes/n",
                value=revision,
            )
            return Delivery(event, view, position)

        assert sub.offer(delivery(1, (0, 10))) and sub.offer(delivery(2, (3, 12)))
        assert sub.offer(delivery(3, (5, 1)))
        # queued before the heads were known: (0, 10) goes; positions count per partition
        sub.start_after({0: 11, 3: 11, 5: 0})
        assert sub.offer(delivery(4, (0, 11))) and sub.offer(delivery(5, (3, 11)))
        assert sub.offer(delivery(6, (0, 13))) and sub.offer(delivery(7, None))
        assert [(await next_delivery(sub)).event.revision for _ in range(4)] == [2, 3, 6, 7]
        assert not sub._items
    finally:
        sub.close()
    assert position_of({"Twinstore-Partition": "3", "Twinstore-Position": "42"}) == (3, 42)
    assert position_of({"Twinstore-Position": "42"}) is None  # no partition: no position
    assert position_of({"Twinstore-Partition": "3", "Twinstore-Position": "x"}) is None
    assert position_of(None) is None


async def test_only_changes_committed_after_a_subscription_reach_it_in_every_partition(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    """Changes of things in several partitions, committed before the subscription but published
    after it (the relay held back), are not delivered; the changes committed after it are."""
    assert runtime.pool is not None and runtime.recorder is not None
    recorder = runtime.recorder
    things: list[str] = []
    while len(things) < 8:  # at most two per partition: four partitions or more
        t = new_thing_id()
        if sum(recorder.partition(x) == recorder.partition(t) for x in things) < 2:
            things.append(t)
    out = fanout(runtime)
    async with relay_held(runtime, settings):
        for t in things:
            assert (await client.put(f"/api/2/things/{t}", json={"attributes": {"n": 0}})).status_code == 201
            assert (await client.put(f"/api/2/things/{t}/attributes/n", json=1)).status_code == 204
        sub = out.subscribe(DITTO, thing_ids=frozenset(things))
        await out.listening()
        sub.start_after(await journal_heads(runtime.pool))
        for t in things[:4]:  # after the subscription, the relay still held
            assert (await client.put(f"/api/2/things/{t}/attributes/n", json=2)).status_code == 204
    try:
        for t in things[4:]:  # after the subscription, the relay publishing again
            assert (await client.put(f"/api/2/things/{t}/attributes/n", json=2)).status_code == 204
        got = [await next_delivery(sub) for _ in things]
        assert sorted(d.event.thing_id for d in got) == sorted(things)
        assert {(d.event.revision, d.event.value) for d in got} == {(3, 2)}
        for d in got:
            assert d.position is not None and d.position[0] == recorder.partition(d.event.thing_id)
        # the backlog (revisions 1 and 2) came before them on each thing's subject: dropped
        assert not sub._items
    finally:
        sub.close()


async def test_the_nats_subscription_is_held_only_while_someone_listens(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receiving every event costs a process about as much as deciding it: without live
    subscribers it does not subscribe; the first subscriber's from_now waits until it does
    (every later change reaches it), and IDLE_SECONDS after the last one left it stops."""
    from twinstore import fanout as fanout_module
    from twinstore.api.live import from_now

    monkeypatch.setattr(fanout_module, "IDLE_SECONDS", 0.3)
    out = fanout(runtime)
    await out._quiet()  # whatever earlier tests of the session left
    assert not out.listening_now
    thing_id = new_thing_id()
    assert (await client.put(f"/api/2/things/{thing_id}", json={"attributes": {"n": 0}})).status_code == 201
    assert runtime.pool is not None
    sub = await from_now(out.subscribe(DITTO, thing_ids=frozenset([thing_id])), runtime.pool)
    try:
        assert out.listening_now
        assert (await client.put(f"/api/2/things/{thing_id}/attributes/n", json=1)).status_code == 204
        delivery = await next_delivery(sub)
        assert (delivery.event.revision, delivery.event.value) == (2, 1)  # not the creation
    finally:
        sub.close()
    assert out.listening_now  # for IDLE_SECONDS yet
    for _ in range(100):
        if not out.listening_now:
            break
        await asyncio.sleep(0.05)
    assert not out.listening_now
    # a subscriber arriving later gets the subscription back
    again = await from_now(out.subscribe(DITTO, thing_ids=frozenset([thing_id])), runtime.pool)
    try:
        assert out.listening_now
        assert (await client.put(f"/api/2/things/{thing_id}/attributes/n", json=2)).status_code == 204
        assert (await next_delivery(again)).event.revision == 3
    finally:
        again.close()
