"""Issue 15 items 6, 9 and 11 against a real server: bounded headers on every input path, deep
values refused before they join a group commit (and never failing a neighbour), response
headers built from any script, and a database that drops its connections answered 503.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections import Counter
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.api.helpers import assert_error
from tests.conftest import ServerProcess, new_thing_id
from tests.security.conftest import USERS
from twinstore import protocol
from twinstore.model.errors import HeadersTooLargeError, JsonInvalidError
from twinstore.settings import Settings

THINGS = "/api/2/things/"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def ws_url(live: dict[str, Any]) -> str:
    return str(live["ditto"].base_url).replace("http://", "ws://").rstrip("/") + "/ws/2"


def basic(user: str) -> dict[str, str]:
    name, password = USERS[user]
    return {"authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


async def ws_command(live: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    async with connect(ws_url(live), additional_headers=basic("ditto"), max_size=None) as ws:
        await ws.send(json.dumps(envelope))
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 20))
        return answer


# ---- item 6: headers are bounded on every input path --------------------------------------


async def test_a_4_mb_correlation_id_is_refused_with_431_and_nothing_is_committed(
    live: dict[str, Any],
) -> None:
    """Over a real socket (uvicorn with httptools sets no header limit of its own): before, the
    write was committed with the 4 MB id in its event, which then blocked the relay."""
    client = live["ditto"]
    thing_id = new_thing_id()
    r = await client.put(THINGS + thing_id, json={}, headers={"correlation-id": "c" * (4 << 20)})
    assert_error(r, 431, "headers.too.large")
    assert "correlation-id" not in r.headers  # never echoed
    assert "8192" in r.json()["message"]
    # the same id as a query parameter (Ditto headers may be given so) counts too
    r = await client.put(THINGS + thing_id, json={}, params={"correlation-id": "q" * 9000})
    assert_error(r, 431, "headers.too.large")
    assert_error(await client.get(THINGS + thing_id), 404, "things:thing.notfound")
    # within the limit all is as before
    r = await client.put(THINGS + thing_id, json={}, headers={"correlation-id": "k" * 4000})
    assert r.status_code == 201, r.text
    assert r.headers["correlation-id"] == "k" * 4000


async def test_a_websocket_envelope_with_oversized_headers_is_refused(live: dict[str, Any]) -> None:
    thing_id = new_thing_id()
    namespace, name = thing_id.split(":", 1)
    answer = await ws_command(
        live,
        {
            "topic": f"{namespace}/{name}/things/twin/commands/create",
            "headers": {"correlation-id": "w" * 9000},
            "path": "/",
            "value": {},
        },
    )
    assert answer["status"] == 431, answer
    assert answer["value"]["error"] == "headers.too.large"
    assert_error(await live["ditto"].get(THINGS + thing_id), 404, "things:thing.notfound")


def test_a_nats_command_envelope_with_oversized_headers_is_refused_as_a_whole() -> None:
    """NATS ingestion decodes command envelopes with protocol.write_command: a refusal there
    terminates the message and reports it on the errors stream (twinstore.ingest)."""
    envelope = {
        "topic": "org.test/t/things/twin/commands/modify",
        "headers": {"correlation-id": "n" * 9000},
        "path": "/attributes/a",
        "value": 1,
    }
    with pytest.raises(HeadersTooLargeError):
        protocol.write_command(envelope, "nginx:ingest")
    envelope["headers"] = {"x": nested(300)}  # a header value too deep to encode is too large
    with pytest.raises(HeadersTooLargeError):
        protocol.write_command(envelope, "nginx:ingest")


# ---- item 9: deep input is refused before a batch, and never fails a neighbour -------------


async def test_deep_values_and_paths_are_400_and_fail_no_neighbour(live: dict[str, Any]) -> None:
    """A value nested 500 levels (or a 500-segment path) was a recursion error inside the group
    commit: 503 for it and for ~23 of 100 concurrent writes of another user."""
    ditto, other = live["ditto"], live["other"]
    mine, theirs = new_thing_id(), new_thing_id()
    assert (await ditto.put(THINGS + mine, json={})).status_code == 201
    assert (await other.put(THINGS + theirs, json={"attributes": {}})).status_code == 201
    deep_path = "/".join(["a"] * 500)
    writes = [
        ditto.put(THINGS + mine + "/attributes/deep", json=nested(500)),
        ditto.put(THINGS + mine + "/attributes/" + deep_path, json=1),
        ditto.patch(
            THINGS + mine,
            content=orjson.dumps({"attributes": nested(150)}),
            headers={"content-type": "application/merge-patch+json"},
        ),
        *(other.put(THINGS + theirs + f"/attributes/n{i}", json=i) for i in range(100)),
    ]
    results = await asyncio.gather(*writes)
    for r in results[:3]:
        body = assert_error(r, 400, "json.invalid")
        assert "levels" in body["message"] or "segments" in body["message"]
    assert Counter(r.status_code for r in results[3:]) == Counter({201: 100})
    r = await other.get(THINGS + theirs + "/attributes")
    assert len(r.json()) == 100
    assert (await ditto.get(THINGS + mine + "/attributes")).status_code == 404  # nothing of them landed
    # just within the limit (100 levels, path included) is fine
    r = await ditto.put(THINGS + mine + "/attributes/ok", json=nested(98))
    assert r.status_code == 201, r.text


async def test_a_deep_websocket_envelope_is_refused(live: dict[str, Any]) -> None:
    thing_id = new_thing_id()
    namespace, name = thing_id.split(":", 1)
    answer = await ws_command(
        live,
        {
            "topic": f"{namespace}/{name}/things/twin/commands/create",
            "headers": {"correlation-id": "deep"},
            "path": "/",
            "value": {"attributes": nested(600)},
        },
    )
    assert answer["status"] == 400, answer
    assert answer["value"]["error"] == "json.invalid"
    assert answer["headers"]["correlation-id"] == "deep"
    assert_error(await live["ditto"].get(THINGS + thing_id), 404, "things:thing.notfound")


def test_deep_ingested_writes_are_refused_before_the_journal() -> None:
    with pytest.raises(JsonInvalidError):
        from twinstore.model.limits import check_depth

        check_depth(nested(99), "/attributes/x")


# ---- item 11: response headers from input of any script ------------------------------------


async def test_ids_and_paths_outside_latin_1_get_a_percent_encoded_location(live: dict[str, Any]) -> None:
    """Before: the write was committed, then building the Location header failed with 500."""
    client = live["ditto"]
    thing_id = f"org.test:ünï-€-{secrets.token_hex(3)}"
    r = await client.put(THINGS + quote(thing_id, safe=":"), json={"attributes": {}})
    assert r.status_code == 201, r.text
    location = r.headers["location"]
    assert location.isascii() and location.endswith(THINGS + quote(thing_id, safe=":")), location
    assert (await client.get(location)).json()["thingId"] == thing_id
    r = await client.put(THINGS + quote(thing_id, safe=":") + "/attributes/" + quote("日本"), json=1)
    assert r.status_code == 201, r.text
    assert r.headers["location"].endswith("/attributes/%E6%97%A5%E6%9C%AC")
    assert (await client.get(r.headers["location"])).json() == 1


async def test_a_correlation_id_outside_latin_1_is_refused_before_anything_is_committed(
    live: dict[str, Any],
) -> None:
    """It would be echoed in a response header: a query parameter may carry any character."""
    client = live["ditto"]
    thing_id = new_thing_id()
    r = await client.put(THINGS + thing_id, json={}, params={"correlation-id": "id-€"})
    assert_error(r, 400, "header.invalid")
    assert_error(await client.get(THINGS + thing_id), 404, "things:thing.notfound")


# ---- item 11: PostgreSQL dropping connections is an outage (503), never a 500 ---------------


async def _terminate(admin: asyncpg.Connection, database: str) -> int:
    return int(
        await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    )


async def test_connections_dropped_and_database_gone_mid_load_answer_503_not_500(
    own_settings: Settings, servers: tuple[str, str]
) -> None:
    """The server's connections are terminated again and again under load, and its database
    is renamed away for a while (other tests' PostgreSQL keeps running): every answer is a
    success, a 4xx, or 503 things:persistence.unavailable; the service recovers afterwards."""
    assert own_settings.database_url is not None
    # (the embedded servers' URLs have a socket path in their query: ?host=/tmp/.../postgres)
    database = urlsplit(own_settings.database_url).path.lstrip("/")
    away = database + "_away"
    server = await asyncio.to_thread(lambda: ServerProcess(own_settings).start())
    auth = USERS["ditto"]
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    admin = await asyncpg.connect(servers[0])
    renamed = False
    try:
        async with httpx.AsyncClient(base_url=server.url, auth=auth, timeout=30) as client:
            things = [new_thing_id() for _ in range(8)]
            for t in things:
                assert (await client.put(THINGS + t, json={"attributes": {}})).status_code == 201
            stop = asyncio.Event()

            async def load(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    t = things[(worker + i) % len(things)]
                    kind = i % 4
                    if kind == 0:
                        r = await client.put(THINGS + t + f"/attributes/w{worker}", json=i)
                    elif kind == 1:
                        r = await client.get(THINGS + t)
                    elif kind == 2:
                        r = await client.get("/api/2/search/things", params={"filter": "exists(attributes)"})
                    else:
                        r = await client.get("/api/2/policies/" + t)
                    statuses[r.status_code] += 1
                    if r.status_code >= 500 and (
                        r.status_code != 503 or r.json().get("error") != "things:persistence.unavailable"
                    ):
                        bad.append(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}")

            workers = [asyncio.create_task(load(w)) for w in range(12)]
            try:
                for _ in range(8):  # connections cut under load
                    await asyncio.sleep(0.25)
                    await _terminate(admin, database)
                deadline = time.monotonic() + 5  # the database gone (renamed) for a second
                while not renamed and time.monotonic() < deadline:
                    await _terminate(admin, database)
                    try:
                        await admin.execute(f'ALTER DATABASE "{database}" RENAME TO "{away}"')
                        renamed = True
                    except asyncpg.ObjectInUseError:
                        await asyncio.sleep(0.01)
                await asyncio.sleep(1.0)
                if renamed:
                    await admin.execute(f'ALTER DATABASE "{away}" RENAME TO "{database}"')
                    renamed = False
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 60)
            assert not bad, bad[:5]
            assert statuses[503] > 0, statuses  # the outage was seen
            # and it is over: writes succeed again
            deadline = time.monotonic() + 30
            while True:
                r = await client.put(THINGS + things[0] + "/attributes/after", json=1)
                if r.status_code in (201, 204) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert r.status_code in (201, 204), r.text
    finally:
        if renamed:
            with contextlib.suppress(Exception):
                await _terminate(admin, away)
                await admin.execute(f'ALTER DATABASE "{away}" RENAME TO "{database}"')
        await admin.close()
        await asyncio.to_thread(server.stop)
    assert "unhandled error" not in server.logs(), server.logs()[-3000:]  # what a 500 logs
