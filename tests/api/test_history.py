"""Historical reads: ``at-historical-revision`` / ``at-historical-timestamp`` on a thing and its
sub-resources, answered from snapshots plus events (real PostgreSQL, through the HTTP API)."""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest_asyncio
from litestar import Litestar

from tests.api.helpers import MERGE, assert_error, create, full_access, url
from tests.conftest import new_thing_id

OTHER = ("other", "secret")
HISTORY_NOT_FOUND = "things:thing.history.notfound"


@pytest_asyncio.fixture(loop_scope="session")
async def other(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=OTHER) as c:
        yield c


async def _current(client: httpx.AsyncClient, thing_id: str) -> tuple[int, dict[str, Any]]:
    r = await client.get(url(thing_id))
    assert r.status_code == 200, r.text
    return int(r.headers["etag"].strip('"').removeprefix("rev:")), r.json()


async def _random_edit(client: httpx.AsyncClient, thing_id: str, rng: random.Random, step: int) -> None:
    choice = rng.randrange(6)
    if choice == 0:
        r = await client.put(url(thing_id, f"/attributes/a{rng.randrange(4)}"), json=step)
    elif choice == 1:
        patch: dict[str, Any] = {f"a{rng.randrange(4)}": None}
        patch[f"a{rng.randrange(4)}"] = {"n": step}
        r = await client.patch(
            url(thing_id, "/attributes"),
            content=json.dumps(patch),
            headers=MERGE,
        )
    elif choice == 2:
        feature = f"/features/f{rng.randrange(3)}"
        r = await client.put(url(thing_id, feature + "/properties/p"), json={"v": step})
        if r.status_code == 404:
            r = await client.put(url(thing_id, feature), json={"properties": {"p": step}})
    elif choice == 3:
        r = await client.delete(url(thing_id, f"/features/f{rng.randrange(3)}"))
        if r.status_code == 404:
            r = await client.put(url(thing_id, "/attributes/fallback"), json=step)
    elif choice == 4:
        r = await client.delete(url(thing_id, f"/attributes/a{rng.randrange(4)}"))
        if r.status_code == 404:
            r = await client.put(url(thing_id, "/definition"), json=f"com.acme:t:{step}.0.0")
    else:
        r = await client.put(url(thing_id, "/attributes"), json={"reset": step})
    assert r.status_code in (201, 204), r.text


async def test_every_revision_equals_the_state_seen_live(client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    rng = random.Random(5)
    await create(client, thing_id, {"attributes": {"a0": 0}})
    seen = dict([await _current(client, thing_id)])
    for step in range(1, 26):  # more than two snapshots apart (tests snapshot every 10)
        await _random_edit(client, thing_id, rng, step)
        revision, state = await _current(client, thing_id)
        seen[revision] = copy.deepcopy(state)
    assert len(seen) == 26
    for revision, state in seen.items():
        by_header = await client.get(url(thing_id), headers={"at-historical-revision": str(revision)})
        by_query = await client.get(url(thing_id), params={"at-historical-revision": str(revision)})
        for r in (by_header, by_query):
            assert r.status_code == 200, r.text
            assert r.json() == state, revision
            assert r.headers["etag"] == f'"rev:{revision}"'
            assert r.headers["at-historical-revision"] == str(revision)
            assert datetime.fromisoformat(r.headers["at-historical-timestamp"]).tzinfo is not None
            historical = json.loads(r.headers["historical-headers"])
            assert historical["ditto-originator"] == "nginx:ditto"
            assert "correlation-id" in historical
        # sub-resources at that revision
        for path in ("/attributes", "/features", "/policyId"):
            part = state.get(path[1:])
            r = await client.get(url(thing_id, path), headers={"at-historical-revision": str(revision)})
            if part is None:
                assert r.status_code == 404, r.text
            else:
                assert r.status_code == 200, r.text
                assert r.json() == part


async def test_historical_headers_name_the_change(client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 1}})
    r = await client.put(url(thing_id, "/attributes/x"), json=2, headers={"correlation-id": "change-two"})
    assert r.status_code == 204
    r = await client.get(url(thing_id, "/attributes/x"), headers={"at-historical-revision": "2"})
    assert r.status_code == 200 and r.json() == 2
    assert json.loads(r.headers["historical-headers"]) == {
        "ditto-originator": "nginx:ditto",
        "correlation-id": "change-two",
    }
    r = await client.get(url(thing_id, "/attributes/x"), headers={"at-historical-revision": "1"})
    assert r.status_code == 200 and r.json() == 1
    r = await client.get(url(thing_id, "/features/f/properties/p"), params={"at-historical-revision": "1"})
    assert_error(r, 404, "things:feature.notfound")


async def test_timestamp_between_events_gives_the_earlier_revision(client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 1}})
    await asyncio.sleep(0.05)
    between = datetime.now(UTC)
    await asyncio.sleep(0.05)
    r = await client.put(url(thing_id, "/attributes/x"), json=2)
    assert r.status_code == 204
    stamp = between.isoformat().replace("+00:00", "Z")
    for r in (
        await client.get(url(thing_id), headers={"at-historical-timestamp": stamp}),
        await client.get(url(thing_id), params={"at-historical-timestamp": stamp}),
    ):
        assert r.status_code == 200, r.text
        assert r.json()["attributes"] == {"x": 1}
        assert r.headers["etag"] == '"rev:1"'
        assert r.headers["at-historical-revision"] == "1"
    now = datetime.now(UTC).isoformat()
    r = await client.get(url(thing_id, "/attributes/x"), headers={"at-historical-timestamp": now})
    assert r.status_code == 200 and r.json() == 2
    before = (between - timedelta(hours=1)).isoformat()
    r = await client.get(url(thing_id), headers={"at-historical-timestamp": before})
    body = assert_error(r, 404, HISTORY_NOT_FOUND)
    assert thing_id in body["message"]


async def test_out_of_range_revisions_are_404(client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 1}})
    for revision in ("2", "0", "-1", "99999"):
        r = await client.get(url(thing_id), headers={"at-historical-revision": revision})
        assert_error(r, 404, HISTORY_NOT_FOUND)


async def test_invalid_values_are_400(client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id)
    for headers in (
        {"at-historical-revision": "one"},
        {"at-historical-revision": "1.5"},
        {"at-historical-timestamp": "yesterday"},
        {"at-historical-revision": "1", "at-historical-timestamp": "2024-01-01T00:00:00Z"},
    ):
        assert_error(await client.get(url(thing_id), headers=headers), 400, "header.invalid")
    r = await client.get(url(thing_id), params={"at-historical-timestamp": "2024-13-01"})
    assert_error(r, 400, "header.invalid")


async def test_caller_without_read_gets_404(client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 1}})
    for params in ({"at-historical-revision": "1"}, {"at-historical-revision": "5"}):
        assert_error(await other.get(url(thing_id), params=params), 404, "things:thing.notfound")
    missing = new_thing_id()
    r = await client.get(url(missing), params={"at-historical-revision": "1"})
    assert_error(r, 404, "things:thing.notfound")


async def test_history_is_filtered_by_the_current_policy(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 1}, "features": {"f": {"properties": {"p": 1}}}})
    policy = full_access("nginx:ditto")
    policy["entries"]["reader"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {"thing:/attributes": {"grant": ["READ"], "revoke": []}},
    }
    r = await client.put(f"/api/2/policies/{thing_id}", json=policy)
    assert r.status_code == 204, r.text
    # Revision 1 was written before the other subject could read anything: now it may read its
    # attributes at every revision, never the feature.
    r = await other.get(url(thing_id), params={"at-historical-revision": "1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"thingId": thing_id, "attributes": {"x": 1}}
    r = await other.get(url(thing_id, "/features/f"), params={"at-historical-revision": "1"})
    assert r.status_code == 404


async def test_deleted_thing_history_stays_readable(client: httpx.AsyncClient) -> None:
    thing_id = new_thing_id()
    await create(client, thing_id, {"attributes": {"x": 1}})
    assert (await client.put(url(thing_id, "/attributes/x"), json=2)).status_code == 204
    assert (await client.delete(url(thing_id))).status_code == 204
    r = await client.get(url(thing_id), headers={"at-historical-revision": "2"})
    assert r.status_code == 200, r.text
    assert r.json()["attributes"] == {"x": 2}
    r = await client.get(url(thing_id), headers={"at-historical-revision": "3"})
    assert_error(r, 404, HISTORY_NOT_FOUND)
    r = await client.get(url(thing_id), headers={"at-historical-timestamp": datetime.now(UTC).isoformat()})
    assert_error(r, 404, HISTORY_NOT_FOUND)
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
