"""Ditto's ``condition`` header / parameter: RQL evaluated on the thing, 412 when it does not hold."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from litestar import Litestar

from tests.api.helpers import assert_error, create, full_access, revision, thing, url
from tests.conftest import new_thing_id


@pytest_asyncio.fixture(loop_scope="session")
async def other(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://twinstore", auth=("other", "secret")
    ) as c:
        yield c


async def test_write_applies_only_when_the_condition_holds(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"state": "idle", "n": 3}})
    r = await client.put(
        url(thing_id, "/attributes/state"),
        json="running",
        headers={"condition": 'eq(attributes/state,"busy")'},
    )
    body = assert_error(r, 412, "things:condition.failed")
    assert "does not match" in body["message"]
    assert await revision(client, thing_id) == 1
    r = await client.put(
        url(thing_id, "/attributes/state"),
        json="running",
        params={"condition": 'and(eq(attributes/state,"idle"),gt(attributes/n,2))'},
    )
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["attributes"]["state"] == "running"


async def test_read_with_condition(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"n": 3}})
    r = await client.get(url(thing_id, "/attributes"), params={"condition": "lt(attributes/n,3)"})
    assert_error(r, 412, "things:condition.failed")
    r = await client.get(url(thing_id, "/attributes"), params={"condition": "le(attributes/n,3)"})
    assert r.status_code == 200 and r.json() == {"n": 3}


async def test_invalid_condition_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.get(url(thing_id), params={"condition": "eq(attributes/n,"})
    body = assert_error(r, 400, "things:condition.invalid")
    assert "position" in body["message"]


async def test_condition_is_not_checked_when_creating(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={}, headers={"condition": 'eq(attributes/x,"never")'})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "condition", ['eq(attributes/secret,"s")', 'ne(attributes/secret,"s")', "exists(attributes/secret)"]
)
async def test_condition_on_an_unreadable_field_fails_whatever_its_value(
    client: httpx.AsyncClient, other: httpx.AsyncClient, condition: str
) -> None:
    policy_id = new_thing_id("org.test.cond")
    doc = full_access("nginx:ditto")
    doc["entries"]["other"] = {
        "subjects": {"nginx:other": {}},
        "resources": {
            "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
            "thing:/attributes/secret": {"grant": [], "revoke": ["READ"]},
        },
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=doc)).status_code == 201
    thing_id = new_thing_id()
    await create(client, thing_id, {"policyId": policy_id, "attributes": {"secret": "s", "open": 1}})
    r = await other.put(url(thing_id, "/attributes/open"), json=2, headers={"condition": condition})
    body = assert_error(r, 412, "things:condition.failed")
    assert "insufficient permissions" in body["message"]
    r = await other.get(url(thing_id), params={"condition": condition})
    assert_error(r, 412, "things:condition.failed")
    # the owner, who may read it, gets the condition evaluated
    r = await client.get(url(thing_id, "/attributes/open"), params={"condition": 'eq(attributes/secret,"s")'})
    assert r.status_code == 200, r.text
