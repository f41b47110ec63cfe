"""A live subscription gets no event of a change committed before it (as Ditto).

The relay publishes after the commit, so without care the events of changes acknowledged just
before ``START-SEND-EVENTS`` (or before an SSE stream opened) still arrive afterwards. These
tests hold the relay back while the earlier changes are made, so the backlog is certainly
published after the subscription, and check that only the later change arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest

from tests.api.helpers import relay_held
from tests.api.test_events_ws import next_event, passed, put, start, ws_url
from tests.api.test_sse import SSE, http_url, next_sse
from tests.api.test_ws import BASIC
from tests.conftest import AUTH, new_thing_id
from twinstore.runtime import Runtime
from twinstore.settings import Settings

__all__ = ["http_url", "ws_url"]  # module fixtures, shared


async def many_writes(client: httpx.AsyncClient, thing_id: str, n: int) -> None:
    await put(client, thing_id, "", {"attributes": {"n": 0}})
    await asyncio.gather(*(put(client, thing_id, f"/attributes/a{i}", i) for i in range(1, n)))


async def test_a_websocket_gets_no_event_of_a_change_acknowledged_before_start_send_events(
    ws_url: str, client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    from websockets.asyncio.client import connect

    thing_id = new_thing_id()
    async with connect(ws_url, additional_headers=BASIC) as ws:
        async with relay_held(runtime, settings):
            await many_writes(client, thing_id, 50)  # acknowledged, not yet published
            await start(ws)
        await put(client, thing_id, "/attributes/n", 1)  # revision 51, after the subscription
        event = await next_event(ws, thing_id)
        assert (event["revision"], event["path"], event["value"]) == (51, "/attributes/n", 1)


async def test_an_sse_stream_gets_no_event_of_a_change_acknowledged_before_it_opened(
    http_url: str, client: httpx.AsyncClient, runtime: Runtime, settings: Settings
) -> None:
    thing_id = new_thing_id()
    async with httpx.AsyncClient(base_url=http_url, auth=AUTH, timeout=10) as http:
        async with relay_held(runtime, settings):
            await many_writes(client, thing_id, 30)
            stream = await http.send(
                http.build_request("GET", f"/api/2/things/{thing_id}", headers=SSE), stream=True
            )
        try:
            assert stream.status_code == 200
            await put(client, thing_id, "/attributes/n", 1)
            event = await next_sse(stream.aiter_lines())
            assert event == {"id": "31", "data": {"thingId": thing_id, "attributes": {"n": 1}}}
        finally:
            await stream.aclose()


async def test_a_subscription_after_the_relay_caught_up_still_gets_every_later_change(
    ws_url: str, client: httpx.AsyncClient, runtime: Runtime
) -> None:
    from websockets.asyncio.client import connect

    thing_id = new_thing_id()
    await passed(runtime, put(client, thing_id, "", {}), thing_id)
    async with connect(ws_url, additional_headers=BASIC) as ws:
        await start(ws)
        for n in range(5):
            await put(client, thing_id, "/attributes/n", n)
        assert [(await next_event(ws, thing_id))["revision"] for _ in range(5)] == [2, 3, 4, 5, 6]


@pytest.mark.slow
async def test_across_processes_only_changes_after_the_subscription_arrive(
    server_process: Any, runtime: Runtime, settings: Settings
) -> None:
    """Written through process A, subscribed on process B: B reads the head from the shared journal."""
    from websockets.asyncio.client import connect

    things = [new_thing_id() for _ in range(6)]  # in several journal partitions
    async with contextlib.AsyncExitStack() as stack:
        async with relay_held(runtime, settings):
            # started in the block: their relays get no partition until it ends
            writer, reader = await asyncio.gather(
                asyncio.to_thread(server_process().start), asyncio.to_thread(server_process().start)
            )
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=writer.url, auth=AUTH, timeout=10)
            )
            ws = await stack.enter_async_context(
                connect(reader.url.replace("http://", "ws://") + "/ws/2", additional_headers=BASIC)
            )
            await asyncio.gather(*(many_writes(http, t, 10) for t in things))
            await start(ws)
        for t in things:
            await put(http, t, "/attributes/n", 1)
        firsts: dict[str, tuple[int, str]] = {}
        while len(firsts) < len(things):
            event = await next_event(ws, *things)
            thing = ":".join(event["topic"].split("/")[:2])
            firsts.setdefault(thing, (event["revision"], event["path"]))
        assert set(firsts.values()) == {(11, "/attributes/n")}
