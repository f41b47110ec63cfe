"""Ditto's streaming subscriptions for persisted events (``.../streaming/subscribeForPersistedEvents``)
over a real WebSocket (uvicorn in this process), with real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from tests.api.helpers import create, full_access, url
from tests.api.test_ws import BASIC, OTHER, command, serving
from tests.conftest import new_thing_id
from twinstore.api import history as history_module
from twinstore.runtime import Runtime
from twinstore.settings import Settings

HISTORY_NOT_FOUND = "things:thing.history.notfound"
NOT_FOUND = "streaming.subscription.not.found"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ws_url(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    async with serving(settings, runtime) as base:
        yield base + "/ws/2"


def streaming(thing_id: str, action: str, value: Any = ..., path: str = "/", cid: str | None = None) -> str:
    namespace, name = thing_id.split(":", 1)
    envelope: dict[str, Any] = {
        "topic": f"{namespace}/{name}/things/twin/streaming/{action}",
        "headers": {"correlation-id": cid or secrets.token_hex(6)},
        "path": path,
    }
    if value is not ...:
        envelope["value"] = value
    return json.dumps(envelope)


async def receive(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str)
    envelope: dict[str, Any] = json.loads(message)
    return envelope


async def quiet(ws: ClientConnection, seconds: float = 0.3) -> None:
    """Nothing arrives for ``seconds``."""
    with pytest.raises(TimeoutError):
        got = await asyncio.wait_for(ws.recv(), seconds)
        pytest.fail(f"unexpected message: {got!r}")


async def subscribe(ws: ClientConnection, thing_id: str, value: Any = ..., path: str = "/") -> str:
    """Send ``subscribeForPersistedEvents``; the ``created`` answer's subscription id."""
    await ws.send(streaming(thing_id, "subscribeForPersistedEvents", value, path, cid="sub-1"))
    created = await receive(ws)
    assert created["topic"] == thing_id.replace(":", "/", 1) + "/things/twin/streaming/created", created
    assert created["path"] == "/" and created["headers"]["correlation-id"] == "sub-1"
    stream_id = created["value"]["subscriptionId"]
    assert isinstance(stream_id, str) and stream_id
    return stream_id


async def request(ws: ClientConnection, thing_id: str, stream_id: str, demand: Any) -> None:
    await ws.send(streaming(thing_id, "request", {"subscriptionId": stream_id, "demand": demand}))


async def items(ws: ClientConnection, thing_id: str, stream_id: str, n: int) -> list[dict[str, Any]]:
    """The next ``n`` messages, which must be ``next`` events of ``stream_id``: their items."""
    got = []
    for _ in range(n):
        envelope = await receive(ws)
        assert envelope["topic"] == thing_id.replace(":", "/", 1) + "/things/twin/streaming/next", envelope
        assert envelope["value"]["subscriptionId"] == stream_id
        got.append(envelope["value"]["item"])
    return got


async def drain(
    ws: ClientConnection, thing_id: str, value: Any = ..., path: str = "/"
) -> list[dict[str, Any]]:
    """Subscribe, request everything, and collect the items until ``complete``."""
    stream_id = await subscribe(ws, thing_id, value, path)
    await request(ws, thing_id, stream_id, 1_000_000)
    got = []
    while True:
        envelope = await receive(ws)
        assert envelope["value"]["subscriptionId"] == stream_id, envelope
        action = envelope["topic"].rsplit("/", 1)[1]
        if action == "complete":
            return got
        assert action == "next", envelope
        got.append(envelope["value"]["item"])


async def failure(ws: ClientConnection, thing_id: str, value: Any = ..., path: str = "/") -> dict[str, Any]:
    """Subscribe; nothing but ``created`` before the first request; then ``failed``: its error."""
    stream_id = await subscribe(ws, thing_id, value, path)
    await quiet(ws, 0.1)
    await request(ws, thing_id, stream_id, 5)
    failed = await receive(ws)
    assert failed["topic"].endswith("/things/twin/streaming/failed"), failed
    assert failed["value"]["subscriptionId"] == stream_id
    error: dict[str, Any] = failed["value"]["error"]
    assert {"status", "error", "message", "description"} <= error.keys(), error
    return error


async def _thing_with_writes(client: httpx.AsyncClient, n: int) -> str:
    """A thing at revision ``n + 1``: created with x=0, then x set to 1..n (revision r holds x=r-1)."""
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 0}, "features": {"f": {"properties": {"p": 0}}}})
    for i in range(1, n + 1):
        r = await client.put(url(thing_id, "/attributes/x"), json=i)
        assert r.status_code == 204, r.text
    return thing_id


async def test_demand_is_respected_then_complete(ws_url: str, client: httpx.AsyncClient) -> None:
    thing_id = await _thing_with_writes(client, 8)  # revisions 1..9
    async with connect(ws_url, additional_headers=BASIC) as ws:
        stream_id = await subscribe(ws, thing_id, {"fromHistoricalRevision": 3, "toHistoricalRevision": 7})
        await quiet(ws)  # nothing before the first request, not even 'complete'
        await request(ws, thing_id, stream_id, 2)
        first = await items(ws, thing_id, stream_id, 2)
        await quiet(ws)  # never more than the demand
        assert [(i["revision"], i["path"], i["value"]) for i in first] == [
            (3, "/attributes/x", 2),
            (4, "/attributes/x", 3),
        ]
        # The item is the Ditto Protocol event envelope the live stream sends.
        item = first[0]
        assert item["topic"] == thing_id.replace(":", "/", 1) + "/things/twin/events/modified"
        assert item["headers"]["ditto-originator"] == "nginx:ditto"
        assert item["timestamp"].endswith("Z")
        await request(ws, thing_id, stream_id, 1)
        await request(ws, thing_id, stream_id, 9)  # demand adds up: 10, and 3 are left in the range
        rest = await items(ws, thing_id, stream_id, 3)
        assert [i["revision"] for i in rest] == [5, 6, 7]
        complete = await receive(ws)
        assert complete["topic"].endswith("/things/twin/streaming/complete")
        assert complete["value"] == {"subscriptionId": stream_id}
        await quiet(ws)
        # The subscription is over: a further request fails as for an unknown one.
        await request(ws, thing_id, stream_id, 1)
        failed = await receive(ws)
        assert (
            failed["topic"].endswith("/streaming/failed") and failed["value"]["error"]["error"] == NOT_FOUND
        )


async def test_whole_history_by_default_and_up_to_the_head(ws_url: str, client: httpx.AsyncClient) -> None:
    thing_id = await _thing_with_writes(client, 3)  # revisions 1..4
    async with connect(ws_url, additional_headers=BASIC) as ws:
        everything = await drain(ws, thing_id)
        assert [i["revision"] for i in everything] == [1, 2, 3, 4]
        assert everything[0]["topic"].endswith("/things/twin/events/created")
        assert everything[0]["value"]["attributes"] == {"x": 0}
        assert [i["revision"] for i in await drain(ws, thing_id, {"fromHistoricalRevision": 0})] == [
            1,
            2,
            3,
            4,
        ]
        beyond = {"fromHistoricalRevision": 3, "toHistoricalRevision": 99}
        assert [i["revision"] for i in await drain(ws, thing_id, beyond)] == [3, 4]
        # Exactly the demand: 'complete' follows the last item without another request.
        stream_id = await subscribe(ws, thing_id, {"fromHistoricalRevision": 3})
        await request(ws, thing_id, stream_id, 2)
        assert [i["revision"] for i in await items(ws, thing_id, stream_id, 2)] == [3, 4]
        assert (await receive(ws))["topic"].endswith("/streaming/complete")


async def test_cancel_stops_the_stream(ws_url: str, client: httpx.AsyncClient) -> None:
    thing_id = await _thing_with_writes(client, 5)
    async with connect(ws_url, additional_headers=BASIC) as ws:
        stream_id = await subscribe(ws, thing_id)
        await request(ws, thing_id, stream_id, 1)
        assert [i["revision"] for i in await items(ws, thing_id, stream_id, 1)] == [1]
        await ws.send(streaming(thing_id, "cancel", {"subscriptionId": stream_id}))
        await quiet(ws)  # no answer to a cancel
        await request(ws, thing_id, stream_id, 10)
        failed = await receive(ws)  # and nothing else
        assert failed["topic"].endswith("/streaming/failed")
        assert failed["value"]["subscriptionId"] == stream_id
        assert failed["value"]["error"]["error"] == NOT_FOUND and failed["value"]["error"]["status"] == 404
        await quiet(ws)
        # The session goes on: commands and new subscriptions work.
        await ws.send(json.dumps(command(thing_id, "retrieve", "/attributes/x", cid="c-1")))
        reply = await receive(ws)
        assert (reply["status"], reply["value"], reply["headers"]["correlation-id"]) == (200, 5, "c-1")
        assert len(await drain(ws, thing_id)) == 6


async def test_several_subscriptions_at_once(ws_url: str, client: httpx.AsyncClient) -> None:
    one, two = await _thing_with_writes(client, 4), await _thing_with_writes(client, 2)
    async with connect(ws_url, additional_headers=BASIC) as ws:
        a = await subscribe(ws, one, {"fromHistoricalRevision": 2})
        b = await subscribe(ws, two)
        assert a != b
        await request(ws, one, a, 2)
        await request(ws, two, b, 1)
        got: dict[str, list[int]] = {a: [], b: []}
        for _ in range(3):
            envelope = await receive(ws)
            assert envelope["topic"].endswith("/streaming/next")
            got[envelope["value"]["subscriptionId"]].append(envelope["value"]["item"]["revision"])
        assert got == {a: [2, 3], b: [1]}
        await quiet(ws)
        await ws.send(streaming(two, "cancel", {"subscriptionId": b}))
        await request(ws, one, a, 5)
        assert [i["revision"] for i in await items(ws, one, a, 2)] == [4, 5]
        assert (await receive(ws))["value"] == {"subscriptionId": a}
        # A subscription still open when the socket closes is simply dropped.
        await subscribe(ws, one)
    async with connect(ws_url, additional_headers=BASIC) as ws:
        assert len(await drain(ws, two)) == 3


async def test_timestamp_range(ws_url: str, client: httpx.AsyncClient) -> None:
    thing_id = await _thing_with_writes(client, 2)  # revisions 1..3
    await asyncio.sleep(0.05)
    start = datetime.now(UTC)
    await asyncio.sleep(0.05)
    for i in (3, 4):  # revisions 4, 5
        assert (await client.put(url(thing_id, "/attributes/x"), json=i)).status_code == 204
    await asyncio.sleep(0.05)
    end = datetime.now(UTC)
    await asyncio.sleep(0.05)
    assert (await client.put(url(thing_id, "/attributes/x"), json=5)).status_code == 204  # revision 6
    value = {
        "fromHistoricalTimestamp": start.isoformat().replace("+00:00", "Z"),
        "toHistoricalTimestamp": end.isoformat().replace("+00:00", "Z"),
    }
    async with connect(ws_url, additional_headers=BASIC) as ws:
        got = await drain(ws, thing_id, value, "/attributes/x")
        assert [(i["revision"], i["value"]) for i in got] == [(4, 3), (5, 4)]
        del value["toHistoricalTimestamp"]
        got = await drain(ws, thing_id, value)
        assert [(i["revision"], i["value"]) for i in got] == [(4, 3), (5, 4), (6, 5)]
        until = {"toHistoricalTimestamp": start.isoformat()}  # no 'from': since the first event
        assert [i["revision"] for i in await drain(ws, thing_id, until)] == [1, 2, 3]


async def test_filter_and_resource_path(ws_url: str, client: httpx.AsyncClient) -> None:
    thing_id = await _thing_with_writes(client, 2)  # revisions 1..3
    r = await client.put(url(thing_id, "/features/f/properties/p"), json=7)  # revision 4
    assert r.status_code == 204
    assert (await client.put(url(thing_id, "/attributes/x"), json=3)).status_code == 204  # revision 5
    async with connect(ws_url, additional_headers=BASIC) as ws:
        got = await drain(ws, thing_id, {"fromHistoricalRevision": 1, "filter": "ge(attributes/x,2)"})
        assert [(i["revision"], i["value"]) for i in got] == [(3, 2), (5, 3)]
        # Only events touching the resource of the 'path' (the creation holds the whole thing).
        got = await drain(ws, thing_id, {}, "/features/f/properties")
        assert [(i["revision"], i["path"]) for i in got] == [(1, "/"), (4, "/features/f/properties/p")]
        assert got[1]["value"] == 7
        got = await drain(ws, thing_id, {"filter": "eq(features/f/properties/p,7)"})
        assert [i["revision"] for i in got] == [4]


async def test_partial_events_never_show_an_unreadable_feature(
    ws_url: str, client: httpx.AsyncClient
) -> None:
    thing_id = new_thing_id()
    await create(
        client, thing_id, {"attributes": {"x": 1}, "features": {"f": {"properties": {"p": "secret-1"}}}}
    )
    r = await client.patch(
        url(thing_id),
        content=json.dumps({"attributes": {"x": 2}, "features": {"f": {"properties": {"p": "secret-2"}}}}),
        headers={"content-type": "application/merge-patch+json"},
    )
    assert r.status_code == 204, r.text
    r = await client.put(url(thing_id, "/features/f/properties/p"), json="secret-3")
    assert r.status_code == 204
    policy = full_access("nginx:ditto")
    policy["entries"]["reader"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/": {"grant": ["READ"], "revoke": []},
            "thing:/features/f": {"grant": [], "revoke": ["READ"]},
        },
    }
    assert (await client.put(f"/api/2/policies/{thing_id}", json=policy)).status_code == 204
    async with connect(ws_url, additional_headers=OTHER) as ws:
        got = await drain(ws, thing_id)
        # Under the *current* policy: the feature is cut out of every event, and the event that
        # only changed it (revision 3) is not sent at all.
        assert [i["revision"] for i in got] == [1, 2]
        assert got[1]["path"] == "/" and got[1]["value"]["attributes"] == {"x": 2}
        assert got[0]["value"]["attributes"] == {"x": 1}
        assert all(i["value"].get("features", {}) == {} for i in got)
        assert "secret" not in json.dumps(got)
        assert await drain(ws, thing_id, {}, "/features/f") == []
    async with connect(ws_url, additional_headers=BASIC) as ws:  # the owner sees everything
        got = await drain(ws, thing_id)
        assert [i["revision"] for i in got] == [1, 2, 3] and got[2]["value"] == "secret-3"


async def test_errors_fail_the_subscription_after_the_first_request(
    ws_url: str, client: httpx.AsyncClient
) -> None:
    thing_id = await _thing_with_writes(client, 1)  # revisions 1..2
    async with connect(ws_url, additional_headers=BASIC) as ws:
        for value in (
            {"fromHistoricalRevision": "one"},
            {"fromHistoricalRevision": -1},
            {"fromHistoricalRevision": 1.5},
            {"fromHistoricalRevision": True},
            {"fromHistoricalRevision": 2, "toHistoricalRevision": 1},
            {"fromHistoricalTimestamp": "yesterday"},
            {"fromHistoricalTimestamp": 5},
            {"fromHistoricalRevision": 1, "toHistoricalTimestamp": "2024-01-01T00:00:00Z"},
            {
                "fromHistoricalTimestamp": "2024-02-01T00:00:00Z",
                "toHistoricalTimestamp": "2024-01-01T00:00:00Z",
            },
            {"filter": "eq(attributes/x"},
            {"filter": 3},
            [1],
        ):
            error = await failure(ws, thing_id, value)
            assert error["status"] == 400, (value, error)
        assert (await failure(ws, thing_id, {"fromHistoricalRevision": 3}))["error"] == HISTORY_NOT_FOUND
        future = {"fromHistoricalTimestamp": "2999-01-01T00:00:00Z"}
        assert (await failure(ws, thing_id, future))["error"] == HISTORY_NOT_FOUND
        past = {
            "fromHistoricalTimestamp": "2000-01-01T00:00:00Z",
            "toHistoricalTimestamp": "2000-01-02T00:00:00Z",
        }
        assert (await failure(ws, thing_id, past))["error"] == HISTORY_NOT_FOUND
        missing = await failure(ws, new_thing_id())
        assert (missing["status"], missing["error"]) == (404, "things:thing.notfound")
        # A demand that is not positive breaks reactive streams' rule 3.9 and ends the subscription.
        for demand in (0, -3, "many"):
            stream_id = await subscribe(ws, thing_id)
            await request(ws, thing_id, stream_id, demand)
            failed = await receive(ws)
            assert failed["value"]["error"]["error"] == "streaming.subscription.protocol.error"
            assert failed["value"]["error"]["status"] == 400
            await request(ws, thing_id, stream_id, 1)
            assert (await receive(ws))["value"]["error"]["error"] == NOT_FOUND
        # Requests without a subscription, unknown actions: error envelopes on the thing's errors topic.
        await ws.send(streaming(thing_id, "request", {"demand": 1}, cid="bad-1"))
        error = await receive(ws)
        assert error["topic"] == thing_id.replace(":", "/", 1) + "/things/twin/errors"
        assert (error["status"], error["headers"]["correlation-id"]) == (400, "bad-1")
        await ws.send(streaming(thing_id, "subscribeForSnapshots", {}))
        error = await receive(ws)
        assert error["topic"].endswith("/things/twin/errors")
        assert error["value"]["error"] == "protocoladapter:unknown.topicpath"
    async with connect(ws_url, additional_headers=OTHER) as ws:
        unreadable = await failure(ws, thing_id, {"fromHistoricalRevision": 1})
        assert (unreadable["status"], unreadable["error"]) == (404, "things:thing.notfound")


async def test_deleted_thing_history_streams_without_the_deletion(
    ws_url: str, client: httpx.AsyncClient
) -> None:
    thing_id = await _thing_with_writes(client, 1)
    assert (await client.delete(url(thing_id))).status_code == 204  # revision 3
    async with connect(ws_url, additional_headers=BASIC) as ws:
        got = await drain(ws, thing_id)
        assert [(i["revision"], i["topic"].rsplit("/", 1)[1]) for i in got] == [
            (1, "created"),
            (2, "modified"),
        ]
        assert await drain(ws, thing_id, {"fromHistoricalRevision": 3}) == []  # only the deletion
    async with connect(ws_url, additional_headers=OTHER) as ws:
        unreadable = await failure(ws, thing_id)
        assert unreadable["error"] == "things:thing.notfound"


async def test_pages_are_read_as_demand_arrives(
    ws_url: str, client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    thing_id = await _thing_with_writes(client, 9)  # revisions 1..10
    journal = runtime.journal
    assert journal is not None
    pages: list[list[int]] = []
    original = journal.event_pages

    async def counted(thing: str, after: int, to: int, *, page: int = 500) -> AsyncIterator[list[Any]]:
        async for events in original(thing, after, to, page=page):
            if thing == thing_id:
                pages.append([e.revision for e in events])
            yield events

    monkeypatch.setattr(journal, "event_pages", counted)
    monkeypatch.setattr(history_module, "HISTORY_PAGE", 3)
    async with connect(ws_url, additional_headers=BASIC) as ws:
        stream_id = await subscribe(ws, thing_id)
        await quiet(ws, 0.1)
        assert pages == []  # nothing is read before the first request
        await request(ws, thing_id, stream_id, 2)
        assert [i["revision"] for i in await items(ws, thing_id, stream_id, 2)] == [1, 2]
        await quiet(ws, 0.1)
        assert pages == [[1, 2, 3]]
        await request(ws, thing_id, stream_id, 2)
        assert [i["revision"] for i in await items(ws, thing_id, stream_id, 2)] == [3, 4]
        await quiet(ws, 0.1)
        assert pages == [[1, 2, 3], [4, 5, 6]]
        await request(ws, thing_id, stream_id, 100)
        assert [i["revision"] for i in await items(ws, thing_id, stream_id, 6)] == [5, 6, 7, 8, 9, 10]
        assert (await receive(ws))["topic"].endswith("/streaming/complete")
        assert pages == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
