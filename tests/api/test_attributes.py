"""``/policyId``, ``/definition``, ``/attributes`` and ``/attributes/{path}`` of a thing."""

from __future__ import annotations

import httpx
import pytest

from tests.api.helpers import JSON, MERGE, assert_error, body, create, make_policy, revision, thing, url

# ---- /policyId -------------------------------------------------------------------------


async def test_get_policy_id(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.get(url(thing_id, "/policyId"))
    assert r.status_code == 200
    assert r.json() == thing_id
    assert r.headers["etag"].startswith('"hash:')


async def test_put_policy_id(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    await make_policy(client, "org.test:new-policy")
    r = await client.put(url(thing_id, "/policyId"), json="org.test:new-policy")
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert r.headers["etag"].startswith('"hash:')
    assert (await client.get(url(thing_id, "/policyId"))).json() == "org.test:new-policy"
    assert (await thing(client, thing_id))["policyId"] == "org.test:new-policy"
    assert await revision(client, thing_id) == 2


@pytest.mark.parametrize("body", ["no-namespace", "bad ns:x", "ns:with/slash"])
async def test_put_invalid_policy_id_is_400(client: httpx.AsyncClient, thing_id: str, body: str) -> None:
    await create(client, thing_id)
    assert_error(await client.put(url(thing_id, "/policyId"), json=body), 400, "policies:id.invalid")
    assert await revision(client, thing_id) == 1


@pytest.mark.parametrize("value", [1, None, {"policyId": "a:b"}, ["a:b"]])
async def test_put_policy_id_that_is_not_a_string_is_400(
    client: httpx.AsyncClient, thing_id: str, value: object
) -> None:
    await create(client, thing_id)
    assert_error(
        await client.put(url(thing_id, "/policyId"), content=body(value), headers=JSON), 400, "json.invalid"
    )
    assert (await thing(client, thing_id))["policyId"] == thing_id


async def test_patch_policy_id(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    await make_policy(client, "org.test:patched-policy")
    r = await client.patch(url(thing_id, "/policyId"), json="org.test:patched-policy", headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await thing(client, thing_id))["policyId"] == "org.test:patched-policy"
    assert await revision(client, thing_id) == 2


async def test_patch_policy_id_with_null_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id, "/policyId"), content=b"null", headers=MERGE)
    assert_error(r, 400, "things:policyId.notdeletable")
    assert (await thing(client, thing_id))["policyId"] == thing_id
    assert await revision(client, thing_id) == 1


async def test_policy_id_of_missing_thing_is_404(client: httpx.AsyncClient, thing_id: str) -> None:
    assert_error(await client.get(url(thing_id, "/policyId")), 404, "things:thing.notfound")
    assert_error(await client.put(url(thing_id, "/policyId"), json="a:b"), 404, "things:thing.notfound")


# ---- /definition -----------------------------------------------------------------------


async def test_definition_lifecycle(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    assert_error(await client.get(url(thing_id, "/definition")), 404, "things:definition.notfound")
    assert_error(await client.delete(url(thing_id, "/definition")), 404, "things:definition.notfound")

    r = await client.put(url(thing_id, "/definition"), json="com.acme:coffeebrewer:0.1.0")
    assert r.status_code == 201, r.text
    assert r.json() == "com.acme:coffeebrewer:0.1.0"
    assert r.headers["location"].endswith(url(thing_id, "/definition"))
    assert r.headers["etag"].startswith('"hash:')
    r = await client.get(url(thing_id, "/definition"))
    assert r.status_code == 200
    assert r.json() == "com.acme:coffeebrewer:0.1.0"

    r = await client.put(url(thing_id, "/definition"), json="https://example.com/models/brewer.tm.jsonld")
    assert r.status_code == 204, r.text
    assert (
        await client.get(url(thing_id, "/definition"))
    ).json() == "https://example.com/models/brewer.tm.jsonld"

    r = await client.patch(url(thing_id, "/definition"), json="com.acme:brewer:2.0.0", headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/definition"))).json() == "com.acme:brewer:2.0.0"

    r = await client.delete(url(thing_id, "/definition"))
    assert r.status_code == 204, r.text
    assert_error(await client.get(url(thing_id, "/definition")), 404, "things:definition.notfound")
    assert "definition" not in await thing(client, thing_id)
    assert await revision(client, thing_id) == 5


async def test_patch_definition_with_null_removes_it(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"definition": "a:b:1"})
    r = await client.patch(url(thing_id, "/definition"), content=b"null", headers=MERGE)
    assert r.status_code == 204, r.text
    assert_error(await client.get(url(thing_id, "/definition")), 404, "things:definition.notfound")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        *(
            (d, "things:definition.identifier.invalid")
            for d in ("not-a-definition", "a:b", "a:b:c:d", "a:b:c d")
        ),
        (3, "json.invalid"),  # not a string at all
        (["a:b:c"], "json.invalid"),
    ],
)
async def test_put_invalid_definition_is_400(
    client: httpx.AsyncClient, thing_id: str, body: object, error: str
) -> None:
    await create(client, thing_id)
    assert_error(await client.put(url(thing_id, "/definition"), json=body), 400, error)
    assert await revision(client, thing_id) == 1


async def test_invalid_definition_identifier_error_code(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/definition"), json="not-a-definition")
    assert_error(r, 400, "things:definition.identifier.invalid")
    r = await client.patch(url(thing_id), json={"definition": "not-a-definition"}, headers=MERGE)
    assert_error(r, 400, "things:definition.identifier.invalid")


# ---- /attributes -----------------------------------------------------------------------


async def test_attributes_lifecycle(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    assert_error(await client.get(url(thing_id, "/attributes")), 404, "things:attributes.notfound")
    assert_error(await client.delete(url(thing_id, "/attributes")), 404, "things:attributes.notfound")

    r = await client.put(url(thing_id, "/attributes"), json={"a": 1, "nested": {"b": [1, 2]}})
    assert r.status_code == 201, r.text
    assert r.json() == {"a": 1, "nested": {"b": [1, 2]}}
    assert r.headers["location"].endswith(url(thing_id, "/attributes"))
    etag = r.headers["etag"]
    assert etag.startswith('"hash:')

    r = await client.get(url(thing_id, "/attributes"))
    assert r.status_code == 200
    assert r.json() == {"a": 1, "nested": {"b": [1, 2]}}
    assert r.headers["etag"] == etag

    r = await client.put(url(thing_id, "/attributes"), json={"c": "replaced"})
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"c": "replaced"}

    r = await client.patch(url(thing_id, "/attributes"), json={"c": None, "d": {"e": True}}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"d": {"e": True}}

    r = await client.delete(url(thing_id, "/attributes"))
    assert r.status_code == 204
    assert_error(await client.get(url(thing_id, "/attributes")), 404, "things:attributes.notfound")
    assert await revision(client, thing_id) == 5


async def test_put_empty_attributes(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/attributes"), json={})
    assert r.status_code == 201
    assert (await client.get(url(thing_id, "/attributes"))).json() == {}


@pytest.mark.parametrize("value", [3.14, "text", [1], None, True])
async def test_put_attributes_not_an_object_is_400(
    client: httpx.AsyncClient, thing_id: str, value: object
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    assert_error(
        await client.put(url(thing_id, "/attributes"), content=body(value), headers=JSON), 400, "json.invalid"
    )
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"a": 1}
    assert await revision(client, thing_id) == 1


async def test_merge_attributes_with_non_object_is_json_invalid(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.patch(url(thing_id, "/attributes"), json=3.14, headers=MERGE)
    assert_error(r, 400, "json.invalid")
    r = await client.patch(url(thing_id), json={"attributes": 3.14}, headers=MERGE)
    assert_error(r, 400, "json.invalid")
    assert await revision(client, thing_id) == 1


async def test_patch_attributes_with_null_removes_them(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.patch(url(thing_id, "/attributes"), content=b"null", headers=MERGE)
    assert r.status_code == 204, r.text
    assert_error(await client.get(url(thing_id, "/attributes")), 404, "things:attributes.notfound")


async def test_patch_attributes_that_do_not_exist_creates_them(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id, "/attributes"), json={"a": {"b": 1}}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"a": {"b": 1}}


async def test_attributes_of_missing_thing_are_404(client: httpx.AsyncClient, thing_id: str) -> None:
    for r in [
        await client.get(url(thing_id, "/attributes")),
        await client.put(url(thing_id, "/attributes"), json={}),
        await client.patch(url(thing_id, "/attributes"), json={"a": 1}, headers=MERGE),
        await client.delete(url(thing_id, "/attributes")),
        await client.get(url(thing_id, "/attributes/a")),
        await client.put(url(thing_id, "/attributes/a"), json=1),
        await client.patch(url(thing_id, "/attributes/a"), json=1, headers=MERGE),
        await client.delete(url(thing_id, "/attributes/a")),
    ]:
        assert_error(r, 404, "things:thing.notfound")


# ---- /attributes/{path} ----------------------------------------------------------------


async def test_attribute_deep_path_lifecycle(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/attributes/location/building/floor"), json=3)
    assert r.status_code == 201, r.text
    assert r.json() == 3
    assert r.headers["location"].endswith(url(thing_id, "/attributes/location/building/floor"))
    assert r.headers["etag"].startswith('"hash:')
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"location": {"building": {"floor": 3}}}
    r = await client.get(url(thing_id, "/attributes/location"))
    assert r.status_code == 200
    assert r.json() == {"building": {"floor": 3}}
    r = await client.get(url(thing_id, "/attributes/location/building/floor"))
    assert r.json() == 3

    r = await client.put(url(thing_id, "/attributes/location/building/floor"), json={"n": 4})
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/attributes/location/building/floor/n"))).json() == 4

    r = await client.patch(
        url(thing_id, "/attributes/location/building"), json={"floor": None, "room": "4.01"}, headers=MERGE
    )
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/attributes/location"))).json() == {"building": {"room": "4.01"}}

    r = await client.delete(url(thing_id, "/attributes/location/building/room"))
    assert r.status_code == 204
    assert (await client.get(url(thing_id, "/attributes/location"))).json() == {"building": {}}
    assert await revision(client, thing_id) == 5


async def test_missing_attribute_is_404(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": {"b": 1}, "s": "text"}})
    for path in ["/attributes/x", "/attributes/a/c", "/attributes/a/b/c", "/attributes/s/x"]:
        body = assert_error(await client.get(url(thing_id, path)), 404, "things:attribute.notfound")
        assert thing_id in body["message"]
        assert_error(await client.delete(url(thing_id, path)), 404, "things:attribute.notfound")
    assert await revision(client, thing_id) == 1


async def test_attribute_of_thing_without_attributes_is_attributes_notfound(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    # As Ditto's RetrieveAttributeStrategy: the first missing level is reported.
    await create(client, thing_id)
    assert_error(await client.get(url(thing_id, "/attributes/a/b")), 404, "things:attributes.notfound")


async def test_put_attribute_values_of_every_json_type(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    values: list[object] = [
        1,
        -2.5,
        "text",
        "",
        True,
        False,
        None,
        [1, "a", None, {"x": 1}],
        {},
        {"o": {"p": []}},
    ]
    for i, value in enumerate(values):
        r = await client.put(url(thing_id, f"/attributes/v{i}"), content=body(value), headers=JSON)
        assert r.status_code == 201, (value, r.text)
        r = await client.get(url(thing_id, f"/attributes/v{i}"))
        assert r.status_code == 200, (value, r.text)
        assert r.json() == value
    assert await revision(client, thing_id) == 1 + len(values)


async def test_put_attribute_through_a_scalar_replaces_it_with_an_object(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.put(url(thing_id, "/attributes/a/b"), json=2)
    assert r.status_code == 201, r.text
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"a": {"b": 2}}


async def test_patch_attribute_that_does_not_exist_creates_it(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id, "/attributes/new/deep"), json={"x": 1, "y": None}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"new": {"deep": {"x": 1}}}


async def test_patch_attribute_with_null_deletes_it(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1, "b": 2}})
    r = await client.patch(url(thing_id, "/attributes/a"), content=b"null", headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"b": 2}


async def test_attribute_with_url_encoded_key(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/attributes/with%20space"), json="v")
    assert r.status_code == 201, r.text
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"with space": "v"}
    assert (await client.get(url(thing_id, "/attributes/with%20space"))).json() == "v"


async def test_attribute_key_with_slash_in_body_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    assert_error(
        await client.put(url(thing_id, "/attributes/a"), json={"b/c": 1}), 400, "things:thing.invalid"
    )
    assert_error(await client.put(url(thing_id, "/attributes/a"), json={"": 1}), 400, "things:thing.invalid")
    assert await revision(client, thing_id) == 1
