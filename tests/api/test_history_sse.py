"""History streams: SSE of persisted events with ``from-/to-historical-revision|timestamp``, over a
real socket with a streaming client (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest_asyncio

from tests.api.helpers import assert_error, create, full_access, url
from tests.api.test_ws import serving
from tests.conftest import AUTH, new_thing_id
from twinstore.runtime import Runtime
from twinstore.settings import Settings

SSE = {"accept": "text/event-stream"}
OTHER = ("other", "secret")
HISTORY_NOT_FOUND = "things:thing.history.notfound"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def http_url(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    async with serving(settings, runtime) as url:
        yield url.replace("ws://", "http://")


async def stream(
    base: str, path: str, params: dict[str, str], auth: tuple[str, str] = AUTH
) -> list[dict[str, Any]]:
    """Every SSE event (``id``, parsed ``data``) until the server ends the stream."""

    async def read() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        async with (
            httpx.AsyncClient(base_url=base, auth=auth, timeout=10) as http,
            http.stream("GET", path, params=params, headers=SSE) as r,
        ):
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            event: dict[str, Any] = {}
            async for line in r.aiter_lines():
                if not line:
                    if event:
                        events.append(event)
                    event = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                event[name] = json.loads(value) if name == "data" else value
        return events

    return await asyncio.wait_for(read(), 20)


async def error(base: str, path: str, params: dict[str, str], auth: tuple[str, str] = AUTH) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, auth=auth, timeout=10) as http:
        return await http.get(path, params=params, headers=SSE)


async def _thing_with_writes(client: httpx.AsyncClient, n: int) -> str:
    """A thing at revision ``n + 1``: created with x=0, then x set to 1..n (revision r holds x=r-1)."""
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 0}, "features": {"f": {"properties": {"p": 0}}}})
    for i in range(1, n + 1):
        r = await client.put(url(thing_id, "/attributes/x"), json=i)
        assert r.status_code == 204, r.text
    return thing_id


async def test_revision_range_yields_exactly_those_events_then_ends(
    http_url: str, client: httpx.AsyncClient
) -> None:
    thing_id = await _thing_with_writes(client, 8)
    events = await stream(
        http_url, url(thing_id), {"from-historical-revision": "3", "to-historical-revision": "6"}
    )
    assert [e["id"] for e in events] == ["3", "4", "5", "6"]
    assert [e["data"] for e in events] == [
        {"thingId": thing_id, "attributes": {"x": i}} for i in (2, 3, 4, 5)
    ]
    # From 0 without an upper bound: the whole history up to the current revision, then the end.
    events = await stream(
        http_url,
        url(thing_id),
        {"from-historical-revision": "0", "fields": "thingId,attributes,_revision,_modified"},
    )
    assert [e["data"]["_revision"] for e in events] == list(range(1, 10))
    assert events[0]["data"]["attributes"] == {"x": 0}
    assert all(e["data"]["_modified"].endswith("Z") for e in events)
    # An upper bound beyond the head is the head.
    events = await stream(
        http_url, url(thing_id), {"from-historical-revision": "8", "to-historical-revision": "99"}
    )
    assert [e["id"] for e in events] == ["8", "9"]


async def test_timestamp_range(http_url: str, client: httpx.AsyncClient) -> None:
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
    params = {
        "from-historical-timestamp": start.isoformat().replace("+00:00", "Z"),
        "to-historical-timestamp": end.isoformat().replace("+00:00", "Z"),
    }
    events = await stream(http_url, url(thing_id, "/attributes/x"), params)
    assert [(e["id"], e["data"]) for e in events] == [("4", 3), ("5", 4)]
    del params["to-historical-timestamp"]
    events = await stream(http_url, url(thing_id, "/attributes/x"), params)
    assert [(e["id"], e["data"]) for e in events] == [("4", 3), ("5", 4), ("6", 5)]


async def test_sub_path_stream_and_filter(http_url: str, client: httpx.AsyncClient) -> None:
    thing_id = await _thing_with_writes(client, 2)  # revisions 1..3
    r = await client.put(url(thing_id, "/features/f/properties/p"), json=7)  # revision 4
    assert r.status_code == 204
    assert (await client.put(url(thing_id, "/attributes/x"), json=3)).status_code == 204  # revision 5
    params = {"from-historical-revision": "1"}
    events = await stream(http_url, url(thing_id, "/features/f/properties"), params)
    assert [(e["id"], e["data"]) for e in events] == [("1", {"p": 0}), ("4", {"p": 7})]
    events = await stream(http_url, url(thing_id, "/attributes"), params)
    assert [(e["id"], e["data"]) for e in events] == [
        ("1", {"x": 0}),
        ("2", {"x": 1}),
        ("3", {"x": 2}),
        ("5", {"x": 3}),
    ]
    events = await stream(http_url, url(thing_id), {**params, "filter": "ge(attributes/x,2)"})
    assert [e["id"] for e in events] == ["3", "5"]


async def test_partial_read_gets_partial_events(http_url: str, client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 1}, "features": {"f": {"properties": {"p": 1}}}})
    r = await client.patch(
        url(thing_id),
        content=json.dumps({"attributes": {"x": 2}, "features": {"f": {"properties": {"p": 2}}}}),
        headers={"content-type": "application/merge-patch+json"},
    )
    assert r.status_code == 204, r.text
    assert (await client.put(url(thing_id, "/features/f/properties/p"), json=3)).status_code == 204
    policy = full_access("nginx:ditto")
    policy["entries"]["reader"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {"thing:/attributes": {"grant": ["READ"], "revoke": []}},
    }
    assert (await client.put(f"/api/2/policies/{thing_id}", json=policy)).status_code == 204
    # Every event is shown as far as the *current* policy lets the other subject read it; the
    # feature-only change (revision 3) is not sent at all.
    events = await stream(http_url, url(thing_id), {"from-historical-revision": "1"}, auth=OTHER)
    assert [(e["id"], e["data"]) for e in events] == [
        ("1", {"thingId": thing_id, "attributes": {"x": 1}}),
        ("2", {"thingId": thing_id, "attributes": {"x": 2}}),
    ]


async def test_bad_parameters_are_400_and_unknown_ranges_404(
    http_url: str, client: httpx.AsyncClient
) -> None:
    thing_id = await _thing_with_writes(client, 1)  # revisions 1..2
    path = url(thing_id)
    for params in (
        {"from-historical-revision": "one"},
        {"from-historical-revision": "-1"},
        {"from-historical-revision": "1.5"},
        {"to-historical-revision": "2"},
        {"from-historical-revision": "2", "to-historical-revision": "1"},
        {"from-historical-timestamp": "yesterday"},
        {"from-historical-revision": "1", "to-historical-timestamp": "2024-01-01T00:00:00Z"},
        {
            "from-historical-timestamp": "2024-02-01T00:00:00Z",
            "to-historical-timestamp": "2024-01-01T00:00:00Z",
        },
        {"from-historical-revision": "1", "filter": "eq(attributes/x"},
    ):
        code = "rql.expression.invalid" if "filter" in params else "things:request.invalid"
        assert_error(await error(http_url, path, params), 400, code)
    assert_error(await error(http_url, path, {"from-historical-revision": "3"}), 404, HISTORY_NOT_FOUND)
    future = {"from-historical-timestamp": "2999-01-01T00:00:00Z"}
    assert_error(await error(http_url, path, future), 404, HISTORY_NOT_FOUND)
    past = {
        "from-historical-timestamp": "2000-01-01T00:00:00Z",
        "to-historical-timestamp": "2000-01-02T00:00:00Z",
    }
    assert_error(await error(http_url, path, past), 404, HISTORY_NOT_FOUND)
    unreadable = await error(http_url, path, {"from-historical-revision": "1"}, auth=OTHER)
    assert_error(unreadable, 404, "things:thing.notfound")
    missing = await error(http_url, url(new_thing_id()), {"from-historical-revision": "1"})
    assert_error(missing, 404, "things:thing.notfound")


async def test_deleted_thing_history_streams(http_url: str, client: httpx.AsyncClient) -> None:
    thing_id = await _thing_with_writes(client, 1)
    assert (await client.delete(url(thing_id))).status_code == 204
    events = await stream(http_url, url(thing_id, "/attributes/x"), {"from-historical-revision": "1"})
    assert [(e["id"], e["data"]) for e in events] == [("1", 0), ("2", 1)]
