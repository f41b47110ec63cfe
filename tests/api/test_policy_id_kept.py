"""A thing's policyId can be changed through every write path, but never removed.

Found by tests/test_schemathesis.py: ``PATCH /policyId`` with a merge-patch ``null`` and a JSON
patch ``remove /policyId`` used to leave a thing without a policy.
"""

from __future__ import annotations

import httpx

from tests.api.helpers import JSON_PATCH, MERGE, assert_error, body, create, make_policy, revision, thing, url


async def test_merge_null_at_policy_id_is_refused(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id, "/policyId"), content=body(None), headers=MERGE)
    assert_error(r, 400, "things:policyId.notdeletable")
    assert (await thing(client, thing_id))["policyId"] == thing_id
    assert await revision(client, thing_id) == 1


async def test_json_patch_removing_policy_id_is_refused(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    ops = [{"op": "remove", "path": "/policyId"}]
    r = await client.patch(url(thing_id), content=body(ops), headers=JSON_PATCH)
    assert_error(r, 400, "things:policyId.notdeletable")
    assert (await thing(client, thing_id))["policyId"] == thing_id
    assert await revision(client, thing_id) == 1


async def test_policy_id_can_be_merged_and_json_patched(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    await make_policy(client, "org.test:other")
    await make_policy(client, "org.test:third")
    r = await client.patch(url(thing_id, "/policyId"), content=body("org.test:other"), headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["policyId"] == "org.test:other"
    ops = [{"op": "replace", "path": "/policyId", "value": "org.test:third"}]
    r = await client.patch(url(thing_id), content=body(ops), headers=JSON_PATCH)
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["policyId"] == "org.test:third"
    assert await revision(client, thing_id) == 3
