"""``/api/2/things`` and ``/api/2/things/{thingId}``: list, create, retrieve, replace, patch, delete."""

from __future__ import annotations

import secrets
from datetime import datetime

import httpx
import pytest

from tests.api.helpers import JSON_PATCH, MERGE, assert_error, create, make_policy, revision, thing, url
from tests.conftest import new_thing_id

COFFEE = {
    "definition": "com.acme:coffeebrewer:0.1.0",
    "attributes": {
        "manufacturer": "ACME demo corp.",
        "location": "Berlin, main floor",
        "serialno": "42",
        "model": "Speaking coffee machine",
    },
    "features": {
        "coffee-brewer": {
            "definition": ["com.acme:coffeebrewer:0.1.0"],
            "properties": {"brewed-coffees": 0},
        },
        "water-tank": {
            "properties": {
                "configuration": {
                    "smartMode": True,
                    "brewingTemp": 87,
                    "tempToHold": 44,
                    "timeoutSeconds": 6000,
                },
                "status": {"waterAmount": 731, "temperature": 44},
            }
        },
    },
}


# ---- GET /api/2/things -----------------------------------------------------------------


async def test_get_things_by_ids_keeps_order_and_omits_missing(client: httpx.AsyncClient) -> None:
    ids = [new_thing_id() for _ in range(3)]
    for i, thing_id in enumerate(ids):
        await create(client, thing_id, {"attributes": {"n": i}})
    missing = new_thing_id()
    asked = [ids[2], missing, ids[0], ids[1]]
    r = await client.get("/api/2/things", params={"ids": ",".join(asked)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert [t["thingId"] for t in body] == [ids[2], ids[0], ids[1]]
    assert body[0] == {"thingId": ids[2], "policyId": ids[2], "attributes": {"n": 2}}


async def test_get_things_by_ids_with_fields(client: httpx.AsyncClient) -> None:
    ids = [new_thing_id() for _ in range(2)]
    for thing_id in ids:
        await create(
            client, thing_id, {"attributes": {"a": 1, "b": 2}, "features": {"f": {"properties": {"x": 1}}}}
        )
    r = await client.get(
        "/api/2/things", params={"ids": ",".join(ids), "fields": "thingId,attributes/b,_revision"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == [{"thingId": i, "attributes": {"b": 2}, "_revision": 1} for i in ids]


async def test_get_things_by_ids_all_missing_is_empty_list(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/2/things", params={"ids": f"{new_thing_id()},{new_thing_id()}"})
    assert r.status_code == 200
    assert r.json() == []


async def test_get_things_by_ids_omits_deleted(client: httpx.AsyncClient) -> None:
    a, b = new_thing_id(), new_thing_id()
    await create(client, a)
    await create(client, b)
    assert (await client.delete(url(a))).status_code == 204
    r = await client.get("/api/2/things", params={"ids": f"{a},{b}"})
    assert [t["thingId"] for t in r.json()] == [b]


async def test_get_things_with_invalid_id_is_400(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/2/things", params={"ids": f"{new_thing_id()},no-namespace-separator"})
    assert_error(r, 400, "things:id.invalid")


async def test_get_things_with_empty_ids_is_400(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/2/things", params={"ids": ""}), 400, "things:request.invalid")
    assert_error(await client.get("/api/2/things", params={"ids": " , "}), 400, "things:request.invalid")


async def test_get_things_without_ids_lists_things_sorted_by_id(client: httpx.AsyncClient) -> None:
    # Ids that sort first (empty namespace, then "!"), so that the listing's limit of 200
    # things cannot cut them off whatever else this session created.
    prefix = ":!" + secrets.token_hex(3)
    ids = sorted(f"{prefix}-{secrets.token_hex(4)}" for _ in range(3))
    for thing_id in reversed(ids):
        await create(client, thing_id, {"attributes": {"x": 1}})
    r = await client.get("/api/2/things")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    listed = [t["thingId"] for t in r.json()]
    assert 3 <= len(listed) <= 200
    assert len(set(listed)) == len(listed)
    mine = [i for i in listed if i.startswith(prefix + "-")]
    assert mine == ids
    assert r.json()[listed.index(ids[0])] == {"thingId": ids[0], "policyId": ids[0], "attributes": {"x": 1}}
    r = await client.get("/api/2/things", params={"fields": "thingId"})
    assert all(set(t) <= {"thingId"} for t in r.json())
    assert {"thingId": ids[0]} in r.json()


# ---- POST /api/2/things ----------------------------------------------------------------


async def test_post_creates_thing_with_generated_id_in_namespace(client: httpx.AsyncClient) -> None:
    body = {"thingId": "ignored.ns:ignored", "attributes": {"a": 1}}
    r = await client.post("/api/2/things", params={"namespace": "org.posted"}, json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    thing_id = created["thingId"]
    namespace, name = thing_id.split(":", 1)
    assert namespace == "org.posted"
    assert len(name) >= 32  # a UUID
    assert created == {"thingId": thing_id, "policyId": thing_id, "attributes": {"a": 1}}
    assert r.headers["etag"] == '"rev:1"'
    assert r.headers["location"].endswith(f"/api/2/things/{thing_id}")
    assert r.headers["location"].startswith("http://twinstore/")
    assert await thing(client, thing_id) == created
    assert await revision(client, thing_id) == 1


async def test_post_without_namespace_uses_default_namespace(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/2/things", json={})
    assert r.status_code == 201, r.text
    thing_id = r.json()["thingId"]
    assert thing_id.startswith("org.eclipse.ditto:")
    assert r.json() == {"thingId": thing_id, "policyId": thing_id}


async def test_post_without_body_creates_empty_thing(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/2/things", params={"namespace": "org.empty"})
    assert r.status_code == 201, r.text
    thing_id = r.json()["thingId"]
    assert thing_id.startswith("org.empty:")


async def test_post_generates_distinct_ids(client: httpx.AsyncClient) -> None:
    ids = set()
    for _ in range(3):
        r = await client.post("/api/2/things", params={"namespace": "org.many"}, json={})
        assert r.status_code == 201
        ids.add(r.json()["thingId"])
    assert len(ids) == 3


async def test_post_keeps_given_policy_id(client: httpx.AsyncClient) -> None:
    await make_policy(client, "org.pol:shared")
    r = await client.post(
        "/api/2/things", params={"namespace": "org.pol"}, json={"policyId": "org.pol:shared"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["policyId"] == "org.pol:shared"


@pytest.mark.parametrize("namespace", ["1abc", "org..acme", "org/acme", "org acme", "org-acme", ".org"])
async def test_post_with_invalid_namespace_is_400(client: httpx.AsyncClient, namespace: str) -> None:
    r = await client.post("/api/2/things", params={"namespace": namespace}, json={})
    assert_error(r, 400, "things:id.invalid")


@pytest.mark.parametrize("body", [b"[]", b"1", b'"thing"', b"null"])
async def test_post_with_non_object_body_is_400(client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post("/api/2/things", content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, "things:thing.invalid")


async def test_post_with_invalid_thing_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/2/things", json={"attributes": [1, 2]})
    assert_error(r, 400, "json.invalid")


async def test_post_with_response_required_false_is_202(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/2/things", params={"namespace": "org.quiet"}, json={}, headers={"response-required": "false"}
    )
    assert r.status_code == 202, r.text
    assert r.content == b""


# ---- GET /api/2/things/{thingId} -------------------------------------------------------


async def test_get_thing(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, COFFEE)
    r = await client.get(url(thing_id))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["etag"] == '"rev:1"'
    assert r.json() == {"thingId": thing_id, "policyId": thing_id, **COFFEE}


async def test_get_missing_thing_is_404(client: httpx.AsyncClient, thing_id: str) -> None:
    body = assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
    assert thing_id in body["message"]


# ---- PUT /api/2/things/{thingId} -------------------------------------------------------


async def test_put_creates_then_replaces(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json=COFFEE)
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"rev:1"'
    assert r.headers["location"].endswith(url(thing_id))
    assert r.json() == {"thingId": thing_id, "policyId": thing_id, **COFFEE}

    r = await client.put(url(thing_id), json={"attributes": {"only": True}})
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert r.headers["etag"] == '"rev:2"'
    assert "location" not in r.headers
    # Replaced entirely, policy kept.
    assert await thing(client, thing_id) == {
        "thingId": thing_id,
        "policyId": thing_id,
        "attributes": {"only": True},
    }


async def test_put_empty_thing_gets_default_policy(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={})
    assert r.status_code == 201
    assert r.json() == {"thingId": thing_id, "policyId": thing_id}


async def test_put_with_policy_id_and_same_thing_id(client: httpx.AsyncClient, thing_id: str) -> None:
    await make_policy(client, "org.test:my-policy")
    r = await client.put(url(thing_id), json={"thingId": thing_id, "policyId": "org.test:my-policy"})
    assert r.status_code == 201, r.text
    assert (await thing(client, thing_id))["policyId"] == "org.test:my-policy"
    await make_policy(client, "org.test:other-policy")
    r = await client.put(url(thing_id), json={"policyId": "org.test:other-policy"})
    assert r.status_code == 204
    assert (await thing(client, thing_id))["policyId"] == "org.test:other-policy"


async def test_put_with_different_thing_id_in_body_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={"thingId": "org.test:someone-else"})
    assert_error(r, 400, "things:id.notsettable")
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([1, 2], "json.invalid"),
        ("thing", "json.invalid"),
        ({"attributes": "not an object"}, "json.invalid"),
        ({"features": []}, "json.invalid"),
        ({"features": {"f": "not an object"}}, "json.invalid"),
        ({"features": {"f": {"properties": 1}}}, "json.invalid"),
        ({"features": {"f": {"definition": "a:b:c"}}}, "json.invalid"),
        ({"definition": "not a definition"}, "things:definition.identifier.invalid"),
        ({"policyId": 7}, "json.invalid"),
        ({"attributes": {"a/b": 1}}, "things:thing.invalid"),
    ],
)
async def test_put_invalid_thing_is_400(
    client: httpx.AsyncClient, thing_id: str, body: object, error: str
) -> None:
    r = await client.put(url(thing_id), json=body)
    assert_error(r, 400, error)
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")


async def test_put_with_invalid_policy_id_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={"policyId": "no-namespace"})
    assert_error(r, 400, "policies:id.invalid")


async def test_put_ignores_unknown_top_level_keys(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={"attributes": {"a": 1}, "_revision": 99, "foo": "bar"})
    assert r.status_code == 201, r.text
    assert await thing(client, thing_id) == {
        "thingId": thing_id,
        "policyId": thing_id,
        "attributes": {"a": 1},
    }
    assert await revision(client, thing_id) == 1


# ---- PATCH /api/2/things/{thingId} (merge patch) ---------------------------------------


async def test_merge_patch_thing_as_ditto_documents(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, COFFEE)
    patch = {
        "attributes": {"manufacturingYear": "2020"},
        "features": {"water-tank": {"properties": {"configuration": {"smartMode": None, "tempToHold": 50}}}},
    }
    r = await client.patch(url(thing_id), json=patch, headers=MERGE)
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert r.headers["etag"] == '"rev:2"'
    got = await thing(client, thing_id)
    assert got["attributes"] == {**COFFEE["attributes"], "manufacturingYear": "2020"}  # type: ignore[dict-item]
    assert got["features"]["water-tank"]["properties"]["configuration"] == {
        "brewingTemp": 87,
        "tempToHold": 50,
        "timeoutSeconds": 6000,
    }
    assert got["features"]["coffee-brewer"] == COFFEE["features"]["coffee-brewer"]  # type: ignore[index]
    assert got["definition"] == COFFEE["definition"]


async def test_merge_patch_null_removes_whole_subtrees(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, COFFEE)
    r = await client.patch(
        url(thing_id),
        json={"attributes": None, "definition": None, "features": {"water-tank": None}},
        headers=MERGE,
    )
    assert r.status_code == 204, r.text
    assert await thing(client, thing_id) == {
        "thingId": thing_id,
        "policyId": thing_id,
        "features": {"coffee-brewer": COFFEE["features"]["coffee-brewer"]},  # type: ignore[index]
    }


async def test_merge_patch_replaces_arrays_and_scalars(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"list": [1, 2, 3], "obj": {"a": 1}, "s": "x"}})
    r = await client.patch(
        url(thing_id), json={"attributes": {"list": [9], "obj": 5, "s": {"now": "object"}}}, headers=MERGE
    )
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["attributes"] == {"list": [9], "obj": 5, "s": {"now": "object"}}


@pytest.mark.parametrize("exists", [True, False])
async def test_merge_patch_of_thing_with_null_or_empty_object_is_400(
    client: httpx.AsyncClient, thing_id: str, exists: bool
) -> None:
    # Ditto's MergeIT: "things:merge.invalid" for null and {} at the thing's root.
    if exists:
        await create(client, thing_id, COFFEE)
    for value in (b"{}", b"null"):
        r = await client.patch(url(thing_id), content=value, headers=MERGE)
        assert_error(r, 400, "things:merge.invalid")
    if exists:
        assert await revision(client, thing_id) == 1
    else:
        assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")


async def test_merge_patch_empty_object_below_the_root_is_a_write(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, COFFEE)
    before = await thing(client, thing_id)
    r = await client.patch(url(thing_id, "/attributes"), json={}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert await thing(client, thing_id) == before
    assert await revision(client, thing_id) == 2


async def test_merge_patch_creates_missing_thing(client: httpx.AsyncClient, thing_id: str) -> None:
    # Ditto turns a merge of a whole thing that does not exist into a CreateThing.
    r = await client.patch(url(thing_id), json={"attributes": {"a": 1, "gone": None}}, headers=MERGE)
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"rev:1"'
    assert r.headers["location"].endswith(url(thing_id))
    expected = {"thingId": thing_id, "policyId": thing_id, "attributes": {"a": 1}}
    assert r.json() == expected
    assert await thing(client, thing_id) == expected


async def test_merge_patch_with_other_thing_id_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id), json={"thingId": "org.test:other"}, headers=MERGE)
    assert_error(r, 400, "things:id.notsettable")
    assert await revision(client, thing_id) == 1


async def test_merge_patch_cannot_remove_policy_id(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id), json={"policyId": None}, headers=MERGE)
    assert_error(r, 400, "things:policyId.notdeletable")
    r = await client.patch(url(thing_id), json={"thingId": None}, headers=MERGE)
    assert_error(r, 400, "things:id.notdeletable")
    assert (await thing(client, thing_id))["policyId"] == thing_id
    assert await revision(client, thing_id) == 1


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"null", b"{}"])
async def test_merge_patch_thing_with_non_object_is_400(
    client: httpx.AsyncClient, thing_id: str, body: bytes
) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id), content=body, headers=MERGE)
    assert_error(r, 400, "things:merge.invalid")
    assert await revision(client, thing_id) == 1


async def test_merge_patch_producing_invalid_thing_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.patch(url(thing_id), json={"attributes": 5}, headers=MERGE)
    assert_error(r, 400, "json.invalid")
    assert await revision(client, thing_id) == 1


# ---- PATCH /api/2/things/{thingId} (JSON patch) ----------------------------------------


async def test_json_patch_appends_and_removes_array_elements(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"tags": ["a", "b"]}})
    r = await client.patch(
        url(thing_id), json=[{"op": "add", "path": "/attributes/tags/-", "value": "c"}], headers=JSON_PATCH
    )
    assert r.status_code == 204, r.text
    assert r.headers["etag"] == '"rev:2"'
    assert (await thing(client, thing_id))["attributes"]["tags"] == ["a", "b", "c"]

    r = await client.patch(
        url(thing_id), json=[{"op": "remove", "path": "/attributes/tags/0"}], headers=JSON_PATCH
    )
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["attributes"]["tags"] == ["b", "c"]
    assert await revision(client, thing_id) == 3


async def test_json_patch_several_operations_are_one_revision(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(
        client, thing_id, {"attributes": {"a": 1, "b": 2}, "features": {"f": {"properties": {"x": 1}}}}
    )
    ops = [
        {"op": "test", "path": "/attributes/a", "value": 1},
        {"op": "replace", "path": "/attributes/a", "value": 10},
        {"op": "remove", "path": "/attributes/b"},
        {"op": "add", "path": "/features/f/properties/y", "value": {"deep": True}},
        {"op": "copy", "from": "/attributes/a", "path": "/attributes/c"},
        {"op": "move", "from": "/features/f/properties/x", "path": "/attributes/x"},
    ]
    r = await client.patch(url(thing_id), json=ops, headers=JSON_PATCH)
    assert r.status_code == 204, r.text
    got = await thing(client, thing_id)
    assert got["attributes"] == {"a": 10, "c": 10, "x": 1}
    assert got["features"] == {"f": {"properties": {"y": {"deep": True}}}}
    assert await revision(client, thing_id) == 2


async def test_json_patch_failing_test_op_is_400_and_changes_nothing(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    ops = [
        {"op": "replace", "path": "/attributes/a", "value": 2},
        {"op": "test", "path": "/attributes/a", "value": 1},
    ]
    r = await client.patch(url(thing_id), json=ops, headers=JSON_PATCH)
    assert_error(r, 400, "things:patch.invalid")
    assert (await thing(client, thing_id))["attributes"] == {"a": 1}
    assert await revision(client, thing_id) == 1


@pytest.mark.parametrize(
    ("ops", "error"),
    [
        ({"op": "add", "path": "/attributes/a", "value": 1}, "things:patch.invalid"),  # not an array
        ([1, 2], "things:patch.invalid"),
        ([{"op": "frobnicate", "path": "/attributes/a"}], "things:patch.invalid"),
        ([{"op": "add", "value": 1}], "things:patch.invalid"),
        ([{"op": "add", "path": "attributes/a", "value": 1}], "things:patch.invalid"),
        ([{"op": "remove", "path": "/attributes/missing"}], "things:patch.invalid"),
        ([{"op": "replace", "path": "/attributes/list/9", "value": 1}], "things:patch.invalid"),
        ([{"op": "move", "from": "/nowhere", "path": "/attributes/b"}], "things:patch.invalid"),
        ([{"op": "replace", "path": "", "value": [1]}], "json.invalid"),
        ([{"op": "add", "path": "/thingId", "value": "org.test:stolen"}], "things:id.notsettable"),
    ],
)
async def test_json_patch_invalid_is_400(
    client: httpx.AsyncClient, thing_id: str, ops: object, error: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1, "list": [1]}})
    r = await client.patch(url(thing_id), json=ops, headers=JSON_PATCH)
    assert_error(r, 400, error)
    assert await revision(client, thing_id) == 1


async def test_json_patch_on_missing_thing_is_404(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.patch(
        url(thing_id), json=[{"op": "add", "path": "/attributes", "value": {}}], headers=JSON_PATCH
    )
    assert_error(r, 404, "things:thing.notfound")


async def test_json_patch_cannot_remove_policy_id(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id), json=[{"op": "remove", "path": "/policyId"}], headers=JSON_PATCH)
    assert_error(r, 400, "things:policyId.notdeletable")
    assert (await thing(client, thing_id))["policyId"] == thing_id


# ---- DELETE /api/2/things/{thingId} ----------------------------------------------------


async def test_delete_thing_then_recreate_continues_revisions(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    assert (await client.put(url(thing_id, "/attributes/b"), json=2)).status_code == 201
    r = await client.delete(url(thing_id))
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
    assert_error(await client.get(url(thing_id, "/attributes")), 404, "things:thing.notfound")
    assert_error(await client.delete(url(thing_id)), 404, "things:thing.notfound")
    assert_error(await client.put(url(thing_id, "/attributes/c"), json=1), 404, "things:thing.notfound")

    # As in Ditto, the policy outlives the thing: recreating without naming it is refused,
    # naming it works.
    r = await client.put(url(thing_id), json={"attributes": {"new": True}})
    assert_error(r, 400, "things:thing.notcreatable")
    r = await client.put(url(thing_id), json={"policyId": thing_id, "attributes": {"new": True}})
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"rev:4"'
    assert r.json() == {"thingId": thing_id, "policyId": thing_id, "attributes": {"new": True}}
    assert await revision(client, thing_id) == 4
    r = await client.get(url(thing_id), params={"fields": "_created,_modified"})
    created = datetime.fromisoformat(r.json()["_created"].replace("Z", "+00:00"))
    modified = datetime.fromisoformat(r.json()["_modified"].replace("Z", "+00:00"))
    assert created == modified  # the new thing's creation, not the first one's


async def test_delete_missing_thing_is_404(client: httpx.AsyncClient, thing_id: str) -> None:
    assert_error(await client.delete(url(thing_id)), 404, "things:thing.notfound")


# ---- methods and routes ----------------------------------------------------------------


async def test_unsupported_methods_are_405(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    assert_error(await client.post(url(thing_id), json={}), 405, "gateway:method.notallowed")
    assert_error(await client.delete("/api/2/things"), 405, "gateway:method.notallowed")
    assert_error(await client.put("/api/2/things", json={}), 405, "gateway:method.notallowed")
    assert_error(await client.delete(url(thing_id, "/policyId")), 405, "gateway:method.notallowed")
    assert await revision(client, thing_id) == 1


async def test_merge_drops_unknown_top_level_keys(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    patch = {"foo": 1, "_policy": {"entries": {}}, "attributes": {"b": 2}}
    r = await client.patch(url(thing_id), json=patch, headers=MERGE)
    assert r.status_code == 204, r.text
    assert await thing(client, thing_id) == {
        "thingId": thing_id,
        "policyId": thing_id,
        "attributes": {"a": 1, "b": 2},
    }
