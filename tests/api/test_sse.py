"""Server-Sent Events (``Accept: text/event-stream``) over a real socket, with real NATS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.api.test_events_ws import passed, put
from tests.api.test_ws import serving
from tests.conftest import AUTH, new_thing_id
from twinstore.api import sse
from twinstore.runtime import Runtime
from twinstore.settings import Settings

SSE = {"accept": "text/event-stream"}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def http_url(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    async with serving(settings, runtime) as url:
        yield url.replace("ws://", "http://")


async def next_sse(lines: AsyncIterator[str], timeout: float = 10) -> dict[str, Any]:
    """The next SSE event (``id`` and parsed ``data``); comments (keep-alives) are skipped."""

    async def read() -> dict[str, Any]:
        event: dict[str, Any] = {}
        async for line in lines:
            if not line:
                if "data" in event:
                    return event
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = json.loads(value) if name == "data" else value
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(read(), timeout)


async def test_sse_of_one_thing_and_of_a_feature(
    http_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    thing_id = new_thing_id()
    await passed(
        runtime, put(client, thing_id, "", {"attributes": {"a": 1}, "features": {"f": {}}}), thing_id
    )
    async with (
        httpx.AsyncClient(base_url=http_url, auth=AUTH, timeout=10) as http,
        http.stream("GET", f"/api/2/things/{thing_id}", headers=SSE) as whole,
        http.stream("GET", f"/api/2/things/{thing_id}/features/f/properties", headers=SSE) as props,
    ):
        assert whole.status_code == 200 and whole.headers["content-type"].startswith("text/event-stream")
        whole_lines, props_lines = whole.aiter_lines(), props.aiter_lines()
        await put(client, thing_id, "/attributes/a", 2)
        await put(client, thing_id, "/features/f/properties/x", 5)
        first = await next_sse(whole_lines)
        assert first == {"id": "2", "data": {"thingId": thing_id, "attributes": {"a": 2}}}
        second = await next_sse(whole_lines)
        assert second["id"] == "3"
        assert second["data"] == {"thingId": thing_id, "features": {"f": {"properties": {"x": 5}}}}
        # The feature's stream skips the attribute change: its first event is the property.
        assert await next_sse(props_lines) == {"id": "3", "data": {"x": 5}}
    # The plain GET is unchanged.
    r = await client.get(f"/api/2/things/{thing_id}/attributes")
    assert r.status_code == 200 and r.json() == {"a": 2}


async def test_sse_of_things_with_a_filter_and_fields(
    http_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    hot, cold = new_thing_id("org.sse"), new_thing_id("org.sse")
    params = {"namespaces": "org.sse", "filter": "gt(attributes/temp,20)", "fields": "thingId,attributes"}
    async with (
        httpx.AsyncClient(base_url=http_url, auth=AUTH, timeout=10) as http,
        http.stream("GET", "/api/2/things", params=params, headers=SSE) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.aiter_lines()
        await put(client, cold, "", {"attributes": {"temp": 5}})
        await put(client, hot, "", {"attributes": {"temp": 10}})
        await put(client, cold, "/attributes/temp", 6)
        await put(client, hot, "/attributes/temp", 25)
        event = await next_sse(lines)
        assert event == {"id": f"{hot}:2", "data": {"thingId": hot, "attributes": {"temp": 25}}}


async def test_sse_filter_on_a_thing_id_narrows_the_index_keys(
    http_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    out = runtime.fanout
    assert out is not None
    thing_id = new_thing_id("org.sse")
    all_before = len(out._all)
    params = {"filter": f'eq(thingId,"{thing_id}")'}
    async with (
        httpx.AsyncClient(base_url=http_url, auth=AUTH, timeout=10) as http,
        http.stream("GET", "/api/2/things", params=params, headers=SSE) as stream,
    ):
        lines = stream.aiter_lines()
        assert len(out._all) == all_before and len(out._by_thing.get(thing_id, ())) == 1
        await put(client, thing_id, "", {"attributes": {"a": 1}})
        event = await next_sse(lines)
        assert event["id"] == f"{thing_id}:1" and event["data"]["attributes"] == {"a": 1}


async def test_sse_of_things_by_ids_with_extra_fields(
    http_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    thing_id = new_thing_id()
    await passed(runtime, put(client, thing_id, "", {"attributes": {"room": "lab"}}), thing_id)
    params = {"ids": thing_id, "extraFields": "attributes/room"}
    async with (
        httpx.AsyncClient(base_url=http_url, auth=AUTH, timeout=10) as http,
        http.stream("GET", "/api/2/things", params=params, headers=SSE) as stream,
    ):
        lines = stream.aiter_lines()
        await put(client, thing_id, "/features/t", {"properties": {"v": 1}})
        event = await next_sse(lines)
        assert event["id"] == f"{thing_id}:2"
        assert event["data"] == {
            "thingId": thing_id,
            "attributes": {"room": "lab"},
            "features": {"t": {"properties": {"v": 1}}},
        }


async def test_an_idle_stream_gets_keep_alive_comments(
    http_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE", 0.2)
    async with (
        httpx.AsyncClient(base_url=http_url, auth=AUTH, timeout=10) as http,
        http.stream("GET", f"/api/2/things/{new_thing_id()}", headers=SSE) as stream,
    ):
        lines = stream.aiter_lines()
        assert await asyncio.wait_for(anext(lines), 10) == ":"
