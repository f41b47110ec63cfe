"""``START-SEND-EVENTS`` over a real WebSocket (uvicorn in this process), with real NATS."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.api.helpers import full_access
from tests.api.test_ws import BASIC, OTHER, command, serving
from tests.conftest import new_thing_id
from twinstore.runtime import Runtime
from twinstore.settings import Settings


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ws_url(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    async with serving(settings, runtime) as url:
        yield url + "/ws/2"


async def text(ws: ClientConnection, timeout: float = 30) -> str:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str)
    return message


async def start(ws: ClientConnection, query: str = "") -> None:
    await ws.send("START-SEND-EVENTS" + (f"?{query}" if query else ""))
    assert await text(ws) == "START-SEND-EVENTS:ACK"


async def next_event(ws: ClientConnection, *thing_ids: str) -> dict[str, Any]:
    """The next event envelope of one of ``thing_ids`` (events of other tests' things are skipped)."""
    prefixes = tuple(t.replace(":", "/", 1) + "/things/twin/events/" for t in thing_ids)
    while True:
        envelope: dict[str, Any] = json.loads(await text(ws))
        if envelope.get("topic", "").startswith(prefixes):
            return envelope


async def put(client: httpx.AsyncClient, thing_id: str, path: str, value: Any) -> None:
    r = await client.put(f"/api/2/things/{thing_id}{path}", json=value)
    assert r.status_code in (201, 204), r.text


async def test_control_messages_are_acknowledged(ws_url: str) -> None:
    async with connect(ws_url, additional_headers=BASIC) as ws:
        for name in ("START-SEND-EVENTS", "START-SEND-MESSAGES", "STOP-SEND-MESSAGES", "STOP-SEND-EVENTS"):
            await ws.send(name)
            assert await text(ws) == f"{name}:ACK"
        await ws.send("START-SEND-EVENTS?filter=" + quote("eq(attributes/a"))
        error = json.loads(await text(ws))
        assert error["status"] == 400 and error["value"]["error"] == "rql.expression.invalid"


async def test_an_event_arrives_after_a_write(ws_url: str, client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await start(ws)
        await put(client, thing_id, "", {"attributes": {"a": 1}})
        await put(client, thing_id, "/attributes/a", 2)
        created = await next_event(ws, thing_id)
        assert created["topic"] == thing_id.replace(":", "/") + "/things/twin/events/created"
        assert created["value"]["attributes"] == {"a": 1} and created["revision"] == 1
        modified = await next_event(ws, thing_id)
        assert modified["topic"].endswith("/events/modified")
        assert (modified["path"], modified["value"], modified["revision"]) == ("/attributes/a", 2, 2)
        assert modified["headers"]["ditto-originator"] == "nginx:ditto"
        # Commands keep working on a session that streams events.
        await ws.send(json.dumps(command(thing_id, "retrieve", "/attributes/a", cid="c-1")))
        while True:
            reply = json.loads(await text(ws))
            if reply.get("headers", {}).get("correlation-id") == "c-1":
                break
        assert reply["status"] == 200 and reply["value"] == 2


async def test_namespace_and_rql_filters(ws_url: str, client: httpx.AsyncClient) -> None:
    wanted, unwanted = new_thing_id("org.wanted"), new_thing_id("org.unwanted")
    query = "namespaces=org.wanted,org.nothing&filter=" + quote("gt(attributes/temp,20)")
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await start(ws, query)
        await put(client, unwanted, "", {"attributes": {"temp": 30}})
        await put(client, wanted, "", {"attributes": {"temp": 10}})
        await put(client, wanted, "/attributes/temp", 15)
        await put(client, unwanted, "/attributes/temp", 40)
        await put(client, wanted, "/attributes/temp", 25)
        event = await next_event(ws, wanted, unwanted)
        assert (event["topic"].split("/")[0], event["revision"], event["value"]) == ("org.wanted", 3, 25)


async def passed(runtime: Runtime, writes: Any, *thing_ids: str) -> None:
    """Run ``writes`` and wait until their events went through this process's fan-out."""
    assert runtime.fanout is not None
    watcher = runtime.fanout.subscribe(("nginx:ditto",), thing_ids=frozenset(thing_ids))
    await runtime.fanout.listening()
    try:
        await writes
        pending = set(thing_ids)
        while pending:
            pending.discard((await asyncio.wait_for(watcher.get(), 30)).event.thing_id)
    finally:
        watcher.close()


async def test_extra_fields_enrich_the_filter_and_the_envelope(
    ws_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    kitchen, cellar = new_thing_id(), new_thing_id()
    query = "extraFields=attributes/location&filter=" + quote('eq(attributes/location,"kitchen")')

    async def create() -> None:
        for thing_id, where in ((cellar, "cellar"), (kitchen, "kitchen")):
            await put(client, thing_id, "", {"attributes": {"location": where}, "features": {"t": {}}})

    async with connect(ws_url, additional_headers=BASIC) as ws:
        await passed(runtime, create(), kitchen, cellar)  # their creation is not what is awaited below
        await start(ws, query)
        await put(client, cellar, "/features/t/properties", {"v": 1})
        await put(client, kitchen, "/features/t/properties", {"v": 2})
        event = await next_event(ws, kitchen, cellar)
        assert event["topic"].startswith(kitchen.replace(":", "/"))
        assert event["value"] == {"v": 2} and event["path"] == "/features/t/properties"
        assert event["extra"] == {"attributes": {"location": "kitchen"}}


async def test_partial_events_never_show_a_revoked_value(ws_url: str, client: httpx.AsyncClient) -> None:
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
    shared, private = new_thing_id(), new_thing_id()
    async with connect(ws_url, additional_headers=OTHER) as ws:
        await start(ws)
        await put(client, private, "", {"attributes": {"secret": "p0"}})  # only nginx:ditto may read it
        await put(client, shared, "", {"policyId": policy_id, "attributes": {"secret": "s1", "public": 1}})
        await put(client, shared, "/attributes/secret", "s2")
        await put(client, private, "/attributes/secret", "p1")
        await put(client, shared, "/attributes/public", 2)
        received = [await next_event(ws, shared, private) for _ in range(2)]
        assert [e["topic"].split("/")[1] for e in received] == [shared.split(":")[1]] * 2
        assert received[0]["value"]["attributes"] == {"public": 1}
        assert (received[1]["path"], received[1]["value"], received[1]["revision"]) == (
            "/attributes/public",
            2,
            3,
        )
        assert "s1" not in json.dumps(received) and "s2" not in json.dumps(received)


async def test_stop_send_events_stops(ws_url: str, client: httpx.AsyncClient, runtime: Runtime) -> None:
    thing_id = new_thing_id()
    assert runtime.fanout is not None
    watcher = runtime.fanout.subscribe(("nginx:ditto",), thing_ids=frozenset([thing_id]))
    await runtime.fanout.listening()
    try:
        async with connect(ws_url, additional_headers=BASIC) as ws:
            await start(ws)
            await put(client, thing_id, "", {})
            assert (await next_event(ws, thing_id))["revision"] == 1
            await ws.send("STOP-SEND-EVENTS")
            assert await text(ws) == "STOP-SEND-EVENTS:ACK"
            await put(client, thing_id, "/attributes", {"a": 1})
            for revision in (1, 2):  # revision 2 has passed through this process's fan-out
                assert (await asyncio.wait_for(watcher.get(), 30)).event.revision == revision
            await start(ws)
            await put(client, thing_id, "/attributes/a", 2)
            assert (await next_event(ws, thing_id))["revision"] == 3
    finally:
        watcher.close()


@pytest.mark.slow
async def test_events_written_through_one_process_reach_a_websocket_on_another(
    server_process: Any,
) -> None:
    writer, reader = server_process().start(), server_process().start()
    thing_id = new_thing_id()
    ws_base = reader.url.replace("http://", "ws://")
    async with (
        connect(ws_base + "/ws/2", additional_headers=BASIC) as ws,
        httpx.AsyncClient(base_url=writer.url, auth=("ditto", "ditto"), timeout=10) as http,
    ):
        await start(ws)
        await put(http, thing_id, "", {"attributes": {"n": 0}})
        for n in range(1, 20):
            await put(http, thing_id, "/attributes/n", n)
        revisions = [(await next_event(ws, thing_id))["revision"] for _ in range(20)]
        assert revisions == list(range(1, 21))
        # One more write: anything duplicated would have arrived before its event.
        await put(http, thing_id, "/attributes/n", 20)
        assert (await next_event(ws, thing_id))["revision"] == 21


async def tiny_socket(url: str) -> socket.socket:
    """A client socket with a small receive buffer, so that not reading blocks the server soon."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, (host, port))
    return raw


async def test_a_websocket_that_does_not_read_is_closed_and_others_keep_receiving(
    ws_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    from tests.test_fanout import publish  # hand-made envelopes: far faster than writes

    assert runtime.fanout is not None
    thing_id = new_thing_id()
    await passed(runtime, put(client, thing_id, "", {}), thing_id)
    big = "x" * 50_000
    runtime.fanout.queue_size = 8
    try:
        async with (
            connect(
                ws_url,
                additional_headers=BASIC,
                max_queue=1,
                max_size=None,
                compression=None,
                sock=await tiny_socket(ws_url),
            ) as slow,
            connect(ws_url, additional_headers=BASIC, max_size=None) as fast,
        ):
            await start(slow)
            runtime.fanout.queue_size = 1024
            await start(fast)
            received = 0

            async def read_fast() -> None:
                nonlocal received
                while received < 400:
                    await next_event(fast, thing_id)
                    received += 1

            reader = asyncio.create_task(read_fast())
            for revision in range(1000, 1400):
                await publish(runtime, thing_id, revision, "/attributes/blob", big)
            await asyncio.wait_for(reader, 10)
            assert received == 400
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # what was sent before the close, then the close
                    await asyncio.wait_for(slow.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert closed.value.rcvd.reason == "too slow: 8 events behind"
    finally:
        runtime.fanout.queue_size = 1024


async def test_a_filter_on_thing_ids_narrows_the_sessions_index_keys(
    ws_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """A session filtering on its own things is not asked about every event (fanout.filter_scope)."""
    out = runtime.fanout
    assert out is not None
    mine, other = new_thing_id("org.narrow"), new_thing_id("org.narrow")
    query = "filter=" + quote(f'and(eq(thingId,"{mine}"),gt(attributes/n,0))')
    all_before = len(out._all)
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await start(ws, query)
        assert len(out._all) == all_before and len(out._by_thing.get(mine, ())) == 1
        await put(client, other, "", {"attributes": {"n": 5}})
        await put(client, mine, "", {"attributes": {"n": 0}})
        await put(client, mine, "/attributes/n", 1)
        event = await next_event(ws, mine, other)
        assert (event["topic"].split("/")[1], event["revision"]) == (mine.split(":")[1], 2)
    for _ in range(100):  # the session's subscription goes with it
        if mine not in out._by_thing:
            break
        await asyncio.sleep(0.05)
    assert mine not in out._by_thing
