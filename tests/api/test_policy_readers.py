"""The ``readers`` of a stored policy (subjects granted READ on some thing resource) follow every write."""

from __future__ import annotations

import httpx

from tests.api.helpers import full_access
from tests.conftest import new_thing_id
from twinstore.runtime import Runtime


async def readers(runtime: Runtime, policy_id: str) -> list[str]:
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con:
        return list(await con.fetchval("SELECT readers FROM policies WHERE id = $1", policy_id))


async def test_readers_follow_policy_writes(client: httpx.AsyncClient, runtime: Runtime) -> None:
    policy_id = new_thing_id("org.test.readers")
    doc = full_access("nginx:ditto")
    doc["entries"]["writers"] = {
        "subjects": {"nginx:writer": {}},
        "resources": {"thing:/": {"grant": ["WRITE"], "revoke": []}},
    }
    doc["entries"]["group"] = {
        "subjects": {"idp:ops": {}, "idp:qa": {}},
        "resources": {"thing:/features/f": {"grant": ["READ"], "revoke": []}},
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=doc)).status_code == 201
    assert await readers(runtime, policy_id) == ["idp:ops", "idp:qa", "nginx:ditto"]
    r = await client.delete(f"/api/2/policies/{policy_id}/entries/group")
    assert r.status_code == 204, r.text
    assert await readers(runtime, policy_id) == ["nginx:ditto"]
    r = await client.put(
        f"/api/2/policies/{policy_id}/entries/writers/resources/thing:/attributes",
        json={"grant": ["READ"], "revoke": []},
    )
    assert r.status_code == 201, r.text
    assert await readers(runtime, policy_id) == ["nginx:ditto", "nginx:writer"]
    assert (await client.delete(f"/api/2/policies/{policy_id}")).status_code == 204
    assert await readers(runtime, policy_id) == []
