"""Things enforced by their policies, end to end: default and inline policies, partial reads,
guarded writes, expiry, JWT subjects, cache invalidation (in-process and across processes)
and POST /api/2/checkPermissions (real PostgreSQL and NATS)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from litestar import Litestar

from tests.api.helpers import JSON_PATCH, MERGE, assert_error, body, create, full_access, revision, thing, url
from tests.conftest import new_thing_id
from twinstore.api.app import create_app
from twinstore.auth import Authenticator
from twinstore.runtime import Runtime
from twinstore.settings import Settings, load_settings

OTHER = ("other", "secret")
ISSUER = "https://login.example/realms/twins"
R = {"grant": ["READ"], "revoke": []}
W = {"grant": ["WRITE"], "revoke": []}
RW = {"grant": ["READ", "WRITE"], "revoke": []}
NO_READ = {"grant": [], "revoke": ["READ"]}
NO_WRITE = {"grant": [], "revoke": ["WRITE"]}

THING = {
    "attributes": {"visible": 1, "x": "hidden", "a": {"b": 1, "c": 2}},
    "features": {
        "f": {"properties": {"a": 10, "b": {"deep": 20}}, "desiredProperties": {"a": 11}},
        "g": {"properties": {"z": 0}},
    },
}


@pytest_asyncio.fixture(loop_scope="session")
async def other(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=OTHER) as c:
        yield c


def policy(**entries: tuple[list[str], dict[str, Any]]) -> dict[str, Any]:
    """Owner ``nginx:ditto`` with full access, plus ``label=(subjects, resources)`` entries."""
    doc = full_access("nginx:ditto")
    for label, (subjects, resources) in entries.items():
        doc["entries"][label] = {"subjects": {s: {"type": "test"} for s in subjects}, "resources": resources}
    return doc


async def thing_with_policy(
    client: httpx.AsyncClient, doc: dict[str, Any], value: dict[str, Any] | None = None
) -> tuple[str, str]:
    """A new thing (``THING`` by default) governed by a new policy ``doc``; (thingId, policyId)."""
    thing_id = new_thing_id()
    policy_id = new_thing_id("org.test.policy")
    r = await client.put(f"/api/2/policies/{policy_id}", json=doc)
    assert r.status_code == 201, r.text
    await create(client, thing_id, {"policyId": policy_id, **(THING if value is None else value)})
    return thing_id, policy_id


async def journal_rows(runtime: Runtime, entity: str, entity_id: str) -> int:
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con:
        count = await con.fetchval(
            "SELECT count(*) FROM journal WHERE entity = $1 AND id = $2", entity, entity_id
        )
    return int(count)


# ---- default and inline policies ---------------------------------------------------------


async def test_put_without_policy_id_creates_default_policy(
    client: httpx.AsyncClient, other: httpx.AsyncClient, runtime: Runtime, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    assert (await thing(client, thing_id))["policyId"] == thing_id
    r = await client.get(f"/api/2/policies/{thing_id}")
    assert r.status_code == 200, r.text
    default = r.json()["entries"]["DEFAULT"]
    assert list(default["subjects"]) == ["nginx:ditto"]
    assert {k: sorted(v["grant"]) for k, v in default["resources"].items()} == {
        "thing:/": ["READ", "WRITE"],
        "policy:/": ["READ", "WRITE"],
        "message:/": ["READ", "WRITE"],
    }
    assert all(v["revoke"] == [] for v in default["resources"].values())
    assert r.json()["policyId"] == thing_id
    assert list(r.json()["entries"]) == ["DEFAULT"]
    assert await journal_rows(runtime, "policy", thing_id) == 1

    assert_error(await other.get(url(thing_id)), 404, "things:thing.notfound")
    assert_error(await other.get(url(thing_id, "/attributes/a")), 404, "things:thing.notfound")
    assert_error(await other.get(f"/api/2/policies/{thing_id}"), 404, "policies:policy.notfound")
    assert_error(await other.put(url(thing_id, "/attributes/a"), json=2), 404, "things:thing.notfound")
    assert_error(await other.delete(url(thing_id)), 404, "things:thing.notfound")
    assert_error(await other.put(url(thing_id), json={}), 404, "things:thing.notfound")
    assert await revision(client, thing_id) == 1


async def test_post_without_policy_id_creates_default_policy(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    r = await other.post("/api/2/things", params={"namespace": "org.test"}, json={"attributes": {"k": 1}})
    assert r.status_code == 201, r.text
    thing_id = r.json()["thingId"]
    assert r.json()["policyId"] == thing_id
    r = await other.get(f"/api/2/policies/{thing_id}")
    assert r.status_code == 200, r.text
    assert list(r.json()["entries"]["DEFAULT"]["subjects"]) == ["nginx:other"]
    assert (await other.get(url(thing_id))).json()["attributes"] == {"k": 1}
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")


async def test_inline_policy_is_created_and_not_part_of_the_thing(
    client: httpx.AsyncClient, other: httpx.AsyncClient, thing_id: str
) -> None:
    inline = policy(reader=(["nginx:other"], {"thing:/attributes": R}))
    r = await client.put(url(thing_id), json={"_policy": inline, "attributes": {"a": 1}})
    assert r.status_code == 201, r.text
    assert "_policy" not in r.json()
    got = await thing(client, thing_id)
    assert got == {"thingId": thing_id, "policyId": thing_id, "attributes": {"a": 1}}
    r = await client.get(f"/api/2/policies/{thing_id}")
    assert r.status_code == 200, r.text
    assert r.json()["entries"] == inline["entries"]
    r = await other.get(url(thing_id))
    assert r.status_code == 200, r.text
    assert r.json() == {"thingId": thing_id, "attributes": {"a": 1}}


async def test_inline_policy_with_explicit_policy_id(client: httpx.AsyncClient, thing_id: str) -> None:
    policy_id = new_thing_id("org.test.policy")
    r = await client.put(url(thing_id), json={"policyId": policy_id, "_policy": full_access("nginx:ditto")})
    assert r.status_code == 201, r.text
    assert (await thing(client, thing_id))["policyId"] == policy_id
    assert (await client.get(f"/api/2/policies/{policy_id}")).status_code == 200
    assert_error(await client.get(f"/api/2/policies/{thing_id}"), 404, "policies:policy.notfound")


async def test_inline_policy_without_own_policy_write_needs_lockout(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    inline = {
        "entries": {"e": {"subjects": {"nginx:ditto": {}}, "resources": {"thing:/": RW, "policy:/": R}}}
    }
    r = await client.put(url(thing_id), json={"_policy": inline})
    assert_error(r, 403, "policies:policy.modificationinvalid")
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
    assert_error(await client.get(f"/api/2/policies/{thing_id}"), 404, "policies:policy.notfound")
    r = await client.put(url(thing_id), json={"_policy": inline}, headers={"allow-policy-lockout": "true"})
    assert r.status_code == 201, r.text
    assert (await thing(client, thing_id))["policyId"] == thing_id


async def test_inline_policy_without_thing_write_is_not_creatable_and_leaves_no_policy(
    client: httpx.AsyncClient, runtime: Runtime, thing_id: str
) -> None:
    inline = {
        "entries": {"e": {"subjects": {"nginx:ditto": {}}, "resources": {"thing:/": R, "policy:/": RW}}}
    }
    r = await client.put(url(thing_id), json={"_policy": inline})
    assert_error(r, 403, "things:thing.notcreatable")
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
    assert_error(await client.get(f"/api/2/policies/{thing_id}"), 404, "policies:policy.notfound")
    assert await journal_rows(runtime, "policy", thing_id) == 0
    r = await client.put(url(thing_id), json={"_policy": full_access("nginx:ditto")})
    assert r.status_code == 201, r.text


async def test_inline_policy_with_another_id_than_the_things_policy_id_is_400(
    client: httpx.AsyncClient, runtime: Runtime, thing_id: str
) -> None:
    inline = {**full_access("nginx:ditto"), "policyId": "org.test.policy:elsewhere"}
    r = await client.put(url(thing_id), json={"policyId": thing_id, "_policy": inline})
    assert_error(r, 400, "things:policyId.notallowed")
    assert await journal_rows(runtime, "policy", thing_id) == 0
    assert await journal_rows(runtime, "thing", thing_id) == 0


async def test_inline_policy_on_an_existing_thing_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.put(url(thing_id), json={"_policy": full_access("nginx:other")})
    assert_error(r, 400, "things:policy.notallowed")
    assert await revision(client, thing_id) == 1
    entries = (await client.get(f"/api/2/policies/{thing_id}")).json()["entries"]
    assert list(entries) == ["DEFAULT"]


async def test_copy_policy_from_a_policy_id_and_from_a_things_policy(
    client: httpx.AsyncClient, other: httpx.AsyncClient, thing_id: str
) -> None:
    source_thing, source_policy = await thing_with_policy(
        client, policy(reader=(["nginx:other"], {"thing:/attributes": R}))
    )
    source = (await client.get(f"/api/2/policies/{source_policy}")).json()
    r = await client.put(url(thing_id), json={"_copyPolicyFrom": source_policy, "attributes": {"a": 1}})
    assert r.status_code == 201, r.text
    assert "_copyPolicyFrom" not in r.json()
    copied = (await client.get(f"/api/2/policies/{thing_id}")).json()
    assert copied == {**source, "policyId": thing_id}
    assert (await other.get(url(thing_id))).json() == {"thingId": thing_id, "attributes": {"a": 1}}
    # by reference to another thing's policyId
    second = new_thing_id()
    ref = f"{{{{ ref:things/{source_thing}/policyId }}}}"
    r = await client.put(url(second), json={"_copyPolicyFrom": ref})
    assert r.status_code == 201, r.text
    assert (await client.get(f"/api/2/policies/{second}")).json() == {**source, "policyId": second}


async def test_copy_policy_needs_read_on_the_whole_source(
    client: httpx.AsyncClient, other: httpx.AsyncClient, runtime: Runtime, thing_id: str
) -> None:
    # other may read the things of this policy but not the policy itself
    _, source_policy = await thing_with_policy(client, policy(reader=(["nginx:other"], {"thing:/": R})))
    r = await other.put(url(thing_id), json={"_copyPolicyFrom": source_policy})
    assert_error(r, 404, "policies:policy.notfound")
    r = await other.put(url(thing_id), json={"_copyPolicyFrom": "org.test:no-such-policy"})
    assert_error(r, 404, "policies:policy.notfound")
    r = await client.put(
        url(thing_id), json={"_copyPolicyFrom": source_policy, "_policy": full_access("x:y")}
    )
    assert_error(r, 400, "things:policy.notallowed")
    assert await journal_rows(runtime, "policy", thing_id) == 0
    assert await journal_rows(runtime, "thing", thing_id) == 0


async def test_existing_policy_without_thing_write_is_not_creatable(
    client: httpx.AsyncClient, other: httpx.AsyncClient, runtime: Runtime, thing_id: str
) -> None:
    policy_id = new_thing_id("org.test.policy")
    doc = policy(reader=(["nginx:other"], {"thing:/": R, "policy:/": R}))
    assert (await client.put(f"/api/2/policies/{policy_id}", json=doc)).status_code == 201
    r = await other.put(url(thing_id), json={"policyId": policy_id})
    body_ = assert_error(r, 403, "things:thing.notcreatable")
    assert policy_id in body_["message"]
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
    assert await journal_rows(runtime, "thing", thing_id) == 0
    await create(client, thing_id, {"policyId": policy_id})
    assert (await other.get(url(thing_id))).json() == {"thingId": thing_id, "policyId": policy_id}


# ---- partial reads -----------------------------------------------------------------------


async def test_read_of_one_property_only(client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    thing_id, _ = await thing_with_policy(
        client, policy(p=(["nginx:other"], {"thing:/features/f/properties/a": R}))
    )
    r = await other.get(url(thing_id))
    assert r.status_code == 200, r.text
    assert r.json() == {"thingId": thing_id, "features": {"f": {"properties": {"a": 10}}}}
    assert r.headers["etag"] == '"rev:1"'
    assert (await other.get(url(thing_id, "/features/f/properties/a"))).json() == 10
    assert (await other.get(url(thing_id, "/features"))).json() == {"f": {"properties": {"a": 10}}}
    assert (await other.get(url(thing_id, "/features/f"))).json() == {"properties": {"a": 10}}
    assert_error(await other.get(url(thing_id, "/attributes")), 404, "things:attributes.notfound")
    assert_error(await other.get(url(thing_id, "/policyId")), 404, "things:policyId.notfound")
    assert_error(await other.get(url(thing_id, "/features/g")), 404, "things:feature.notfound")
    assert (await thing(client, thing_id))["attributes"] == THING["attributes"]


async def test_hidden_and_absent_paths_look_the_same(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    grants = {"thing:/attributes/visible": R, "thing:/features/f/properties/a": R}
    thing_id, _ = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    attribute, feature, prop = (
        "things:attribute.notfound",
        "things:feature.notfound",
        "things:feature.property.notfound",
    )
    for hidden, absent, error in [
        ("/attributes/x", "/attributes/nope", attribute),
        ("/attributes/a/b", "/attributes/nope/b", attribute),
        ("/features/f/properties/b", "/features/f/properties/nope", prop),
        ("/features/f/properties/b/deep", "/features/f/properties/nope/deep", prop),
        ("/features/g", "/features/nope", feature),
        ("/features/g/properties/z", "/features/nope/properties/z", feature),
        ("/features/g/properties", "/features/nope/properties", feature),
    ]:
        seen_hidden = assert_error(await other.get(url(thing_id, hidden)), 404, error)
        seen_absent = assert_error(await other.get(url(thing_id, absent)), 404, error)
        assert seen_hidden["error"] == seen_absent["error"], (hidden, absent)
        if hidden.rsplit("/", 1)[0] == absent.rsplit("/", 1)[0]:
            assert seen_hidden == {
                **seen_absent,
                "message": seen_absent["message"].replace(absent, hidden),
            }, (hidden, absent)
    assert_error(await other.get(url(thing_id, "/attributes/x")), 404, "things:attribute.notfound")
    assert_error(await client.get(url(thing_id, "/attributes/nope")), 404, "things:attribute.notfound")
    # the owner sees the hidden path
    assert (await client.get(url(thing_id, "/attributes/x"))).json() == "hidden"


async def test_revoke_beneath_a_grant_hides_a_sub_property(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    grants = {"thing:/features/f": R, "thing:/features/f/properties/b": NO_READ}
    thing_id, _ = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    assert (await other.get(url(thing_id))).json() == {
        "thingId": thing_id,
        "features": {"f": {"properties": {"a": 10}, "desiredProperties": {"a": 11}}},
    }
    assert (await other.get(url(thing_id, "/features/f/properties"))).json() == {"a": 10}
    assert_error(
        await other.get(url(thing_id, "/features/f/properties/b")), 404, "things:feature.property.notfound"
    )
    assert_error(
        await other.get(url(thing_id, "/features/f/properties/b/deep")),
        404,
        "things:feature.property.notfound",
    )


async def test_fields_on_the_filtered_view(client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    grants = {"thing:/features/f/properties/a": R, "thing:/attributes/visible": R}
    thing_id, _ = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    r = await other.get(url(thing_id), params={"fields": "thingId,policyId,attributes,features/f/properties"})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "thingId": thing_id,
        "attributes": {"visible": 1},
        "features": {"f": {"properties": {"a": 10}}},
    }
    r = await other.get(url(thing_id), params={"fields": "attributes/x,features/g,_revision"})
    assert r.status_code == 200, r.text
    assert r.json() == {"_revision": 1}
    r = await other.get(url(thing_id, "/features"), params={"fields": "f/properties/b,f/properties/a"})
    assert r.json() == {"f": {"properties": {"a": 10}}}


async def test_list_by_ids_leaves_out_unreadable_and_filters_readable(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    full, _ = await thing_with_policy(client, policy(p=(["nginx:other"], {"thing:/": R})))
    partial, _ = await thing_with_policy(
        client, policy(p=(["nginx:other"], {"thing:/attributes/visible": R}))
    )
    hidden, _ = await thing_with_policy(client, policy())
    absent = new_thing_id()
    ids = ",".join([hidden, partial, absent, full])
    r = await other.get("/api/2/things", params={"ids": ids})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [t["thingId"] for t in got] == [partial, full]
    assert got[0] == {"thingId": partial, "attributes": {"visible": 1}}
    assert got[1]["attributes"] == THING["attributes"] and got[1]["policyId"]
    r = await other.get("/api/2/things", params={"ids": ids, "fields": "thingId,features"})
    assert r.json() == [{"thingId": partial}, {"thingId": full, "features": THING["features"]}]
    r = await client.get("/api/2/things", params={"ids": ids})
    assert [t["thingId"] for t in r.json()] == [hidden, partial, full]


# ---- guarded writes ----------------------------------------------------------------------


async def test_readable_but_not_writable_is_403(client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    thing_id, policy_id = await thing_with_policy(client, policy(p=(["nginx:other"], {"thing:/": R})))
    assert_error(await other.put(url(thing_id), json={"attributes": {}}), 403, "things:thing.notmodifiable")
    assert_error(await other.delete(url(thing_id)), 403, "things:thing.notmodifiable")
    assert_error(
        await other.put(url(thing_id, "/attributes/x"), json=1), 403, "things:attribute.notmodifiable"
    )
    assert_error(
        await other.put(url(thing_id, "/attributes/new"), json=1), 403, "things:attribute.notmodifiable"
    )
    assert_error(
        await other.put(url(thing_id, "/attributes"), json={}), 403, "things:attributes.notmodifiable"
    )
    r = await other.put(url(thing_id, "/features/f/properties/a"), json=1)
    assert_error(r, 403, "things:feature.property.notmodifiable")
    assert_error(await other.delete(url(thing_id, "/features/f")), 403, "things:feature.notmodifiable")
    r = await other.patch(url(thing_id), content=body({"attributes": {"x": 2}}), headers=MERGE)
    assert_error(r, 403, "things:thing.notmodifiable")
    assert await revision(client, thing_id) == 1
    assert await thing(client, thing_id) == {"thingId": thing_id, "policyId": policy_id, **THING}


async def test_not_readable_at_all_is_404_on_writes(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    thing_id, _ = await thing_with_policy(client, policy())
    assert_error(await other.put(url(thing_id, "/attributes/x"), json=1), 404, "things:thing.notfound")
    assert_error(
        await other.patch(url(thing_id), content=body({"a": 1}), headers=MERGE), 404, "things:thing.notfound"
    )
    assert_error(await other.delete(url(thing_id, "/features")), 404, "things:thing.notfound")
    assert await revision(client, thing_id) == 1


async def test_write_without_read_is_404(client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    thing_id, _ = await thing_with_policy(client, policy(p=(["nginx:other"], {"thing:/attributes/x": W})))
    assert_error(await other.put(url(thing_id, "/attributes/x"), json=1), 404, "things:thing.notfound")
    assert_error(await other.delete(url(thing_id, "/attributes/x")), 404, "things:thing.notfound")
    assert_error(await other.get(url(thing_id, "/attributes/x")), 404, "things:thing.notfound")
    assert await revision(client, thing_id) == 1


async def test_write_revoked_below_the_grant(client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    grants = {"thing:/": R, "thing:/attributes/a": W, "thing:/attributes/a/b": NO_WRITE}
    thing_id, _ = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    # a write replacing /attributes/a would also replace the unwritable /attributes/a/b
    assert_error(
        await other.put(url(thing_id, "/attributes/a"), json={"c": 3}), 403, "things:attribute.notmodifiable"
    )
    assert_error(await other.delete(url(thing_id, "/attributes/a")), 403, "things:attribute.notmodifiable")
    assert_error(
        await other.put(url(thing_id, "/attributes/a/b"), json=5), 403, "things:attribute.notmodifiable"
    )
    assert await revision(client, thing_id) == 1
    r = await other.put(url(thing_id, "/attributes/a/c"), json=3)
    assert r.status_code == 204, r.text
    r = await other.put(url(thing_id, "/attributes/a/new"), json={"deep": 1})
    assert r.status_code == 201, r.text
    assert (await thing(client, thing_id))["attributes"]["a"] == {"b": 1, "c": 3, "new": {"deep": 1}}


async def test_merge_patch_needs_write_on_every_changed_leaf(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    grants = {"thing:/": R, "thing:/attributes/a": W, "thing:/attributes/a/b": NO_WRITE}
    thing_id, _ = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    r = await other.patch(
        url(thing_id, "/attributes"), content=body({"a": {"c": 30, "d": 40}}), headers=MERGE
    )
    assert r.status_code == 204, r.text
    r = await other.patch(url(thing_id), content=body({"attributes": {"a": {"c": None}}}), headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["attributes"]["a"] == {"b": 1, "d": 40}
    for patch_ in (
        {"attributes": {"a": {"b": 2}}},
        {"attributes": {"a": {"c": 1, "b": 2}}},
        {"attributes": {"a": None}},
        {"attributes": {"visible": 2}},
        {"attributes": {"a": {"d": 1}}, "features": {"f": {"properties": {"a": 1}}}},
    ):
        r = await other.patch(url(thing_id), content=body(patch_), headers=MERGE)
        assert_error(r, 403, "things:thing.notmodifiable")
        assert r.json()["error"].endswith(".notmodifiable"), r.json()
    assert await revision(client, thing_id) == 3


async def test_json_patch_needs_write_on_every_op_path(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    grants = {"thing:/": R, "thing:/attributes/a": W, "thing:/attributes/a/b": NO_WRITE}
    thing_id, _ = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    ops = [{"op": "add", "path": "/attributes/a/e", "value": 5}, {"op": "remove", "path": "/attributes/a/c"}]
    r = await other.patch(url(thing_id), content=body(ops), headers=JSON_PATCH)
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["attributes"]["a"] == {"b": 1, "e": 5}
    for ops in (
        [{"op": "replace", "path": "/attributes/a/b", "value": 2}],
        [{"op": "add", "path": "/attributes/a/f", "value": 1}, {"op": "remove", "path": "/attributes/a/b"}],
        [{"op": "move", "from": "/attributes/a/b", "path": "/attributes/a/g"}],
        [{"op": "copy", "from": "/attributes/a/e", "path": "/attributes/visible"}],
    ):
        r = await other.patch(url(thing_id), content=body(ops), headers=JSON_PATCH)
        assert_error(r, 403, "things:thing.notmodifiable")
    ops = [
        {"op": "test", "path": "/attributes/visible", "value": 1},
        {"op": "add", "path": "/attributes/a/h", "value": 1},
    ]
    r = await other.patch(url(thing_id), content=body(ops), headers=JSON_PATCH)
    assert r.status_code == 204, r.text
    assert await revision(client, thing_id) == 3


async def test_preconditions_on_unreadable_thing_are_404(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    thing_id, _ = await thing_with_policy(client, policy())
    for headers in (
        {"if-match": '"rev:9"'},
        {"if-match": "*"},
        {"if-none-match": "*"},
        {"if-none-match": '"rev:1"'},
    ):
        assert_error(await other.get(url(thing_id), headers=headers), 404, "things:thing.notfound")
        r = await other.put(url(thing_id, "/attributes/x"), json=1, headers=headers)
        assert_error(r, 404, "things:thing.notfound")
    # on a hidden path of a partly readable thing, preconditions answer as for an absent path
    partial, _ = await thing_with_policy(
        client, policy(p=(["nginx:other"], {"thing:/attributes/visible": R}))
    )
    for headers, status in (({"if-match": "*"}, 412), ({"if-none-match": "*"}, 404)):
        hidden = await other.get(url(partial, "/attributes/x"), headers=headers)
        absent = await other.get(url(partial, "/attributes/nope"), headers=headers)
        assert (hidden.status_code, absent.status_code) == (status, status), (hidden.text, absent.text)
        assert hidden.json()["error"] == absent.json()["error"]
        assert hidden.json() == {**absent.json(), "message": absent.json()["message"].replace("nope", "x")}


async def test_changing_policy_id_needs_write_on_it_and_a_readable_policy(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    grants = {"thing:/": R, "thing:/attributes": W}
    thing_id, policy_id = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    mine = new_thing_id("org.test.policy")
    assert (await other.put(f"/api/2/policies/{mine}", json=full_access("nginx:other"))).status_code == 201
    assert_error(await other.put(url(thing_id, "/policyId"), json=mine), 403, "things:policyId.notmodifiable")
    r = await other.patch(url(thing_id), content=body({"policyId": mine}), headers=MERGE)
    assert_error(r, 403, "things:thing.notmodifiable")

    # the owner may write policyId, but only to a policy that exists and that it may read
    missing = new_thing_id("org.test.policy")
    assert_error(await client.put(url(thing_id, "/policyId"), json=missing), 404, "policies:policy.notfound")
    assert_error(await client.put(url(thing_id, "/policyId"), json=mine), 404, "policies:policy.notfound")
    r = await client.patch(url(thing_id), content=body({"policyId": mine}), headers=MERGE)
    assert_error(r, 404, "policies:policy.notfound")
    ops = [{"op": "replace", "path": "/policyId", "value": mine}]
    r = await client.patch(url(thing_id), content=body(ops), headers=JSON_PATCH)
    assert_error(r, 404, "policies:policy.notfound")
    assert (await thing(client, thing_id))["policyId"] == policy_id
    assert await revision(client, thing_id) == 1

    readable = new_thing_id("org.test.policy")
    assert (
        await client.put(f"/api/2/policies/{readable}", json=full_access("nginx:ditto"))
    ).status_code == 201
    r = await client.put(url(thing_id, "/policyId"), json=readable)
    assert r.status_code == 204, r.text
    assert_error(await other.get(url(thing_id)), 404, "things:thing.notfound")


# ---- expiry ------------------------------------------------------------------------------


async def test_subject_expiry_ends_access(client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    expiry = (datetime.now(UTC) + timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    doc = policy()
    doc["entries"]["temp"] = {
        "subjects": {"nginx:other": {"type": "temporary", "expiry": expiry}},
        "resources": {"thing:/": R},
    }
    thing_id, policy_id = await thing_with_policy(client, doc)
    r = await other.get(url(thing_id))
    assert r.status_code == 200, r.text
    stored = (await client.get(f"/api/2/policies/{policy_id}/entries/temp/subjects/nginx:other")).json()
    assert stored["expiry"] == expiry
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = await other.get(url(thing_id))
        if r.status_code == 404:
            break
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.1)
    assert_error(r, 404, "things:thing.notfound")
    assert datetime.now(UTC) >= datetime.fromisoformat(expiry)
    assert (await client.get(url(thing_id))).status_code == 200


# ---- JWT subjects ------------------------------------------------------------------------


class _WithAuth:
    """The session runtime with another authenticator (JWT and basic)."""

    def __init__(self, runtime: Runtime, auth: Authenticator) -> None:
        self._runtime = runtime
        self.auth = auth

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


@pytest_asyncio.fixture(loop_scope="session")
async def jwt_client(
    tmp_path: Path, settings: Settings, runtime: Runtime, users_file: Path, signing_key: rsa.RSAPrivateKey
) -> AsyncIterator[httpx.AsyncClient]:
    jwks = tmp_path / "jwks.json"
    public = RSAAlgorithm.to_jwk(signing_key.public_key(), as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1"}]}))
    jwt_settings = load_settings(
        {},
        users_file=str(users_file),
        jwt_issuers=[
            {
                "issuer": ISSUER,
                "prefix": "idp",
                "subjects": ["{{ jwt:sub }}", "{{ jwt:groups }}"],
                "audience": "twinstore",
                "jwks_file": str(jwks),
            }
        ],
    )
    proxy = cast(Runtime, _WithAuth(runtime, Authenticator.from_settings(jwt_settings)))
    transport = httpx.ASGITransport(app=create_app(settings, proxy))
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore") as c:
        yield c


def bearer(key: rsa.RSAPrivateKey, **claims: Any) -> dict[str, str]:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "twinstore", "sub": "alice", "exp": now + 300, **claims}
    return {"authorization": "Bearer " + jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})}


async def test_group_subject_grants_and_group_revoke_wins(
    client: httpx.AsyncClient, jwt_client: httpx.AsyncClient, signing_key: rsa.RSAPrivateKey
) -> None:
    doc = policy(
        operators=(["idp:operators"], {"thing:/": RW}),
        auditors=(["idp:auditors"], {"thing:/attributes/x": NO_READ, "thing:/features/f": NO_WRITE}),
    )
    thing_id, policy_id = await thing_with_policy(client, doc)
    alice = bearer(signing_key, groups=["operators"])
    r = await jwt_client.get(url(thing_id), headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["attributes"] == THING["attributes"]
    bob = bearer(signing_key, sub="bob")
    assert_error(await jwt_client.get(url(thing_id), headers=bob), 404, "things:thing.notfound")

    # alice, granted as herself and through a group, is revoked through another group
    r = await client.put(
        f"/api/2/policies/{policy_id}/entries/alice",
        json={"subjects": {"idp:alice": {}}, "resources": {"thing:/": RW}},
    )
    assert r.status_code == 201, r.text
    both = bearer(signing_key, groups=["operators", "auditors"])
    r = await jwt_client.get(url(thing_id), headers=both)
    assert r.status_code == 200, r.text
    assert "x" not in r.json()["attributes"]
    assert_error(
        await jwt_client.get(url(thing_id, "/attributes/x"), headers=both), 404, "things:attribute.notfound"
    )
    r = await jwt_client.put(url(thing_id, "/features/f/properties/a"), json=1, headers=both)
    assert_error(r, 403, "things:feature.property.notmodifiable")
    r = await jwt_client.put(
        url(thing_id, "/attributes/y"), json=1, headers=both, params={"correlation-id": "jwt-1"}
    )
    assert r.status_code == 201, r.text
    # without the auditors group alice sees everything again
    r = await jwt_client.get(url(thing_id, "/attributes/x"), headers=bearer(signing_key))
    assert r.status_code == 200, r.text
    # basic still works on the same app
    assert (await jwt_client.get(url(thing_id), auth=("ditto", "ditto"))).status_code == 200


async def test_jwt_creates_thing_with_default_policy_for_its_subject(
    jwt_client: httpx.AsyncClient, signing_key: rsa.RSAPrivateKey, thing_id: str
) -> None:
    alice = bearer(signing_key, groups=["operators"])
    r = await jwt_client.put(url(thing_id), json={"attributes": {"a": 1}}, headers=alice)
    assert r.status_code == 201, r.text
    r = await jwt_client.get(f"/api/2/policies/{thing_id}", headers=alice)
    assert r.status_code == 200, r.text
    assert list(r.json()["entries"]["DEFAULT"]["subjects"]) == ["idp:alice"]
    other_operator = bearer(signing_key, sub="carol", groups=["operators"])
    assert_error(await jwt_client.get(url(thing_id), headers=other_operator), 404, "things:thing.notfound")


@pytest.mark.parametrize("attack", ["alg none", "wrong key", "expired"])
async def test_bad_jwt_is_401_and_writes_nothing(
    client: httpx.AsyncClient,
    jwt_client: httpx.AsyncClient,
    runtime: Runtime,
    signing_key: rsa.RSAPrivateKey,
    wrong_key: rsa.RSAPrivateKey,
    thing_id: str,
    attack: str,
) -> None:
    now = int(time.time())
    headers = {
        "alg none": {
            "authorization": "Bearer "
            + jwt.encode(
                {"iss": ISSUER, "aud": "twinstore", "sub": "alice", "exp": now + 60}, None, algorithm="none"
            )
        },
        "wrong key": bearer(wrong_key),
        "expired": bearer(signing_key, exp=now - 60),
    }[attack]
    r = await jwt_client.put(url(thing_id), json={"attributes": {"a": 1}}, headers=headers)
    body_ = assert_error(r, 401, "gateway:authentication.failed")
    assert body_["description"] == "Check if your credentials were correct."
    assert "www-authenticate" in r.headers
    assert_error(await jwt_client.get(url(thing_id), headers=headers), 401, "gateway:authentication.failed")
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
    assert await journal_rows(runtime, "thing", thing_id) == 0
    assert await journal_rows(runtime, "policy", thing_id) == 0

    # an existing thing the token's subject could write is not written either
    existing, _ = await thing_with_policy(client, policy(alice=(["idp:alice"], {"thing:/": RW})))
    r = await jwt_client.put(url(existing, "/attributes/pwned"), json=True, headers=headers)
    assert_error(r, 401, "gateway:authentication.failed")
    assert await revision(client, existing) == 1


# ---- cache invalidation ------------------------------------------------------------------


async def test_revoke_applies_to_the_very_next_read(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    thing_id, policy_id = await thing_with_policy(client, policy(p=(["nginx:other"], {"thing:/": RW})))
    assert (await other.get(url(thing_id))).status_code == 200
    assert (await other.put(url(thing_id, "/attributes/k"), json=1)).status_code == 201
    r = await client.put(f"/api/2/policies/{policy_id}/entries/p/resources/thing:/", json=R)
    assert r.status_code == 204, r.text
    assert_error(
        await other.put(url(thing_id, "/attributes/k"), json=2), 403, "things:attribute.notmodifiable"
    )
    assert (await client.delete(f"/api/2/policies/{policy_id}/entries/p")).status_code == 204
    assert_error(await other.get(url(thing_id)), 404, "things:thing.notfound")
    r = await client.put(
        f"/api/2/policies/{policy_id}/entries/p",
        json={"subjects": {"nginx:other": {}}, "resources": {"thing:/attributes": R}},
    )
    assert r.status_code == 201, r.text
    assert (await other.get(url(thing_id))).json() == {
        "thingId": thing_id,
        "attributes": {**THING["attributes"], "k": 1},
    }
    # Deleting the policy while the thing uses it is refused by default (policy_delete_in_use;
    # "allow", Ditto's behaviour, is tested in tests/security/test_history_and_oracles.py).
    r = await client.delete(f"/api/2/policies/{policy_id}")
    assert_error(r, 409, "policies:policy.notdeletable")
    assert (await other.get(url(thing_id))).status_code == 200


@pytest.mark.slow
async def test_revoke_reaches_another_process_within_two_seconds(
    client: httpx.AsyncClient, server_process: Any
) -> None:
    thing_id, policy_id = await thing_with_policy(client, policy(p=(["nginx:other"], {"thing:/": R})))
    server = await asyncio.to_thread(lambda: server_process().start())
    async with httpx.AsyncClient(base_url=server.url, auth=OTHER, timeout=5) as remote:
        r = await remote.get(url(thing_id))
        assert r.status_code == 200, r.text
        assert r.json()["attributes"] == THING["attributes"]
        r = await remote.get(url(thing_id))  # cached in that process now
        assert r.status_code == 200, r.text
        r = await client.delete(f"/api/2/policies/{policy_id}/entries/p")
        assert r.status_code == 204, r.text
        start = time.monotonic()
        while time.monotonic() - start < 2:
            r = await remote.get(url(thing_id))
            if r.status_code == 404:
                break
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.05)
        assert_error(r, 404, "things:thing.notfound")


# ---- checkPermissions --------------------------------------------------------------------


def check(resource: str, entity: str, *permissions: str) -> dict[str, Any]:
    return {"resource": resource, "entityId": entity, "hasPermissions": list(permissions)}


async def test_check_permissions_follows_the_policy(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    grants = {
        "thing:/features/f": R,
        "thing:/features/f/properties/b": NO_READ,
        "thing:/features/f/properties/a": W,
    }
    thing_id, policy_id = await thing_with_policy(client, policy(p=(["nginx:other"], grants)))
    checks = {
        "a": check("thing:/features/f/properties/a", thing_id, "READ"),
        "a-rw": check("thing:/features/f/properties/a", thing_id, "READ", "WRITE"),
        "a-deeper": check("thing:/features/f/properties/a/x", thing_id, "WRITE"),
        "f": check("thing:/features/f", thing_id, "READ"),
        "props": check("thing:/features/f/properties", thing_id, "READ"),
        "desired": check("thing:/features/f/desiredProperties", thing_id, "READ"),
        "b": check("thing:/features/f/properties/b", thing_id, "READ"),
        "root": check("thing:/", thing_id, "READ"),
        "g": check("thing:/features/g", thing_id, "READ"),
        "exec": check("thing:/features/f", thing_id, "EXECUTE"),
        "none": check("thing:/features/f", thing_id),
        "unknown": check("thing:/", new_thing_id(), "READ"),
        "policy": check("policy:/", policy_id, "READ"),
        "message": check("message:/", thing_id, "WRITE"),
    }
    r = await other.post("/api/2/checkPermissions", json=checks)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "a": True,
        "a-rw": True,
        "a-deeper": True,
        "f": False,
        "props": False,
        "desired": True,
        "b": False,
        "root": False,
        "g": False,
        "exec": False,
        "none": True,
        "unknown": False,
        "policy": False,
        "message": False,
    }
    r = await client.post("/api/2/checkPermissions", json=checks)
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == set(checks)
    assert all(got[k] for k in checks if k not in ("exec", "unknown")), got
    assert got["exec"] is False and got["unknown"] is False


@pytest.mark.parametrize(
    ("request_body", "error"),
    [
        ([1], "json.invalid"),
        ("x", "json.invalid"),
        ({"a": "thing:/"}, "json.invalid"),
        ({"a": {"resource": "thing:/", "hasPermissions": ["READ"]}}, "json.invalid"),
        ({"a": {"resource": "thing:/", "entityId": "org.test:x", "hasPermissions": "READ"}}, "json.invalid"),
        ({"a": {"resource": "thing:/", "entityId": "org.test:x", "hasPermissions": ["FLY"]}}, "json.invalid"),
        # a resource a policy entry could not hold either
        (
            {"a": {"resource": "thing", "entityId": "org.test:x", "hasPermissions": ["READ"]}},
            "policies:entry.invalid",
        ),
        (
            {"a": {"resource": "car:/", "entityId": "org.test:x", "hasPermissions": ["READ"]}},
            "policies:entry.invalid",
        ),
    ],
    ids=[
        "array",
        "string",
        "check-not-object",
        "no-entity",
        "permissions-not-array",
        "unknown-permission",
        "resource-without-path",
        "unknown-resource-type",
    ],
)
async def test_check_permissions_bad_body_is_400(
    client: httpx.AsyncClient, request_body: Any, error: str
) -> None:
    assert_error(
        await client.post(
            "/api/2/checkPermissions",
            content=body(request_body),
            headers={"content-type": "application/json"},
        ),
        400,
        error,
    )


async def test_check_permissions_needs_authentication(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/2/checkPermissions", json={}, auth=("ditto", "wrong"))
    assert_error(r, 401, "gateway:authentication.failed")
    r = await client.post("/api/2/checkPermissions", json={})
    assert r.status_code == 200 and r.json() == {}
