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


async def full_readers(runtime: Runtime, policy_id: str) -> tuple[list[str], list[str]]:
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con:
        row = await con.fetchrow(
            "SELECT readers, full_readers, read_revokers, partial_readers FROM policies WHERE id = $1",
            policy_id,
        )
    assert row is not None
    # partial_readers: those who read something but not everything (search's policy-aware path)
    assert list(row["partial_readers"]) == [s for s in row["readers"] if s not in row["full_readers"]]
    return list(row["full_readers"]), list(row["read_revokers"])


async def test_full_readers_are_exactly_the_unrestricted_readers(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """``full_readers``: READ on thing:/ granted, no expiry, no READ revoked in thing: for them.

    Search and count trust SQL alone for these subjects, so an entry that hides anything from a
    subject must take it out (checked against the enforcer's own decision).
    """
    policy_id = new_thing_id("org.test.full")
    read_all = {"grant": ["READ"], "revoke": []}
    doc = full_access("nginx:ditto")
    doc["entries"]["all"] = {
        "subjects": {"idp:a": {}, "idp:b": {}, "idp:temp": {"type": "t", "expiry": "2099-01-01T00:00:00Z"}},
        "resources": {"thing:/": read_all},
    }
    doc["entries"]["hide"] = {  # a revoke names idp:b: it no longer reads everything
        "subjects": {"idp:b": {}, "idp:c": {}},
        "resources": {"thing:/attributes/secret": {"grant": [], "revoke": ["READ"]}},
    }
    doc["entries"]["some"] = {
        "subjects": {"idp:d": {}},
        "resources": {"thing:/features": read_all, "policy:/": read_all},
    }
    doc["entries"]["write-revoke"] = {  # revoking WRITE hides nothing
        "subjects": {"idp:a": {}},
        "resources": {"thing:/features": {"grant": [], "revoke": ["WRITE"]}},
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=doc)).status_code == 201
    full, revokers = await full_readers(runtime, policy_id)
    assert full == ["idp:a", "nginx:ditto"]
    assert revokers == ["idp:b", "idp:c"]
    enforcer = runtime.policies.cache.compile(policy_id, doc) if runtime.policies else None
    assert enforcer is not None
    for subject in ["idp:a", "idp:b", "idp:c", "idp:d", "idp:temp", "nginx:ditto"]:
        unrestricted = enforcer.view((subject,)).has_unrestricted("thing", [], "READ")
        # expiring subjects are left to the policy-aware path even while they read everything
        assert (subject in full) == (unrestricted and subject != "idp:temp"), subject
    r = await client.delete(f"/api/2/policies/{policy_id}/entries/hide")
    assert r.status_code == 204, r.text
    assert await full_readers(runtime, policy_id) == (["idp:a", "idp:b", "nginx:ditto"], [])
    assert (await client.delete(f"/api/2/policies/{policy_id}")).status_code == 204
    assert await full_readers(runtime, policy_id) == ([], [])
