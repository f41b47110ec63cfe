"""``/features`` and every resource below a feature."""

from __future__ import annotations

import httpx
import pytest

from tests.api.helpers import JSON, MERGE, assert_error, body, create, revision, thing, url

LAMP = {
    "definition": ["com.acme:lamp:1.0.0"],
    "properties": {"on": True, "color": {"r": 255, "g": 0, "b": 0}},
}


# ---- /features -------------------------------------------------------------------------


async def test_features_lifecycle(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    assert_error(await client.get(url(thing_id, "/features")), 404, "things:features.notfound")
    assert_error(await client.delete(url(thing_id, "/features")), 404, "things:features.notfound")

    r = await client.put(url(thing_id, "/features"), json={"lamp": LAMP})
    assert r.status_code == 201, r.text
    assert r.json() == {"lamp": LAMP}
    assert r.headers["location"].endswith(url(thing_id, "/features"))
    assert r.headers["etag"].startswith('"hash:')
    r = await client.get(url(thing_id, "/features"))
    assert r.status_code == 200
    assert r.json() == {"lamp": LAMP}

    r = await client.put(url(thing_id, "/features"), json={"other": {}})
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/features"))).json() == {"other": {}}

    r = await client.patch(url(thing_id, "/features"), json={"other": None, "lamp": LAMP}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/features"))).json() == {"lamp": LAMP}

    r = await client.delete(url(thing_id, "/features"))
    assert r.status_code == 204
    assert_error(await client.get(url(thing_id, "/features")), 404, "things:features.notfound")
    assert await revision(client, thing_id) == 5


async def test_put_empty_features(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/features"), json={})
    assert r.status_code == 201
    assert (await client.get(url(thing_id, "/features"))).json() == {}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([], "json.invalid"),
        (3.14, "json.invalid"),
        ({"f": 1}, "json.invalid"),
        ({"f": {"properties": []}}, "json.invalid"),
        ({"f": {"desiredProperties": "x"}}, "json.invalid"),
        ({"f": {"definition": "a:b:c"}}, "json.invalid"),  # a definition is a list
        ({"f": {"definition": ["not valid"]}}, "things:definition.identifier.invalid"),
    ],
)
async def test_put_invalid_features_is_400(
    client: httpx.AsyncClient, thing_id: str, body: object, error: str
) -> None:
    await create(client, thing_id, {"features": {"keep": {}}})
    assert_error(await client.put(url(thing_id, "/features"), json=body), 400, error)
    assert (await client.get(url(thing_id, "/features"))).json() == {"keep": {}}
    assert await revision(client, thing_id) == 1


async def test_merge_features_with_non_object_is_json_invalid(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"features": {"lamp": LAMP}})
    assert_error(
        await client.patch(url(thing_id, "/features"), json=3.14, headers=MERGE), 400, "json.invalid"
    )
    assert_error(
        await client.patch(url(thing_id, "/features/lamp"), json=3.14, headers=MERGE), 400, "json.invalid"
    )
    assert_error(
        await client.patch(url(thing_id, "/features/lamp/properties"), json=3.14, headers=MERGE),
        400,
        "json.invalid",
    )
    assert_error(
        await client.patch(url(thing_id, "/features/lamp/definition"), json=3.14, headers=MERGE),
        400,
        "json.invalid",
    )
    assert await revision(client, thing_id) == 1


# ---- /features/{featureId} -------------------------------------------------------------


async def test_feature_lifecycle(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    assert_error(await client.get(url(thing_id, "/features/lamp")), 404, "things:feature.notfound")
    assert_error(await client.delete(url(thing_id, "/features/lamp")), 404, "things:feature.notfound")

    r = await client.put(url(thing_id, "/features/lamp"), json=LAMP)
    assert r.status_code == 201, r.text
    assert r.json() == LAMP
    assert r.headers["location"].endswith(url(thing_id, "/features/lamp"))
    r = await client.get(url(thing_id, "/features/lamp"))
    assert r.status_code == 200
    assert r.json() == LAMP
    assert r.headers["etag"].startswith('"hash:')

    r = await client.put(url(thing_id, "/features/lamp"), json={"properties": {"on": False}})
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == {"properties": {"on": False}}

    r = await client.patch(
        url(thing_id, "/features/lamp"),
        json={"definition": ["com.acme:lamp:2.0.0"], "properties": {"on": None, "dim": 50}},
        headers=MERGE,
    )
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == {
        "definition": ["com.acme:lamp:2.0.0"],
        "properties": {"dim": 50},
    }

    r = await client.delete(url(thing_id, "/features/lamp"))
    assert r.status_code == 204
    assert_error(await client.get(url(thing_id, "/features/lamp")), 404, "things:feature.notfound")
    assert (await client.get(url(thing_id, "/features"))).json() == {}
    assert await revision(client, thing_id) == 5


async def test_put_empty_feature(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/features/empty"), json={})
    assert r.status_code == 201
    assert r.json() == {}
    assert (await thing(client, thing_id))["features"] == {"empty": {}}


async def test_put_feature_drops_nothing_it_knows(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    feature = {**LAMP, "desiredProperties": {"on": False}}
    assert (await client.put(url(thing_id, "/features/lamp"), json=feature)).status_code == 201
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == feature


async def test_patch_feature_that_does_not_exist_creates_it(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.patch(url(thing_id, "/features/new"), json={"properties": {"a": 1}}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/features/new"))).json() == {"properties": {"a": 1}}


async def test_patch_feature_with_null_deletes_it(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"features": {"lamp": LAMP, "other": {}}})
    r = await client.patch(url(thing_id, "/features/lamp"), content=b"null", headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/features"))).json() == {"other": {}}


@pytest.mark.parametrize("body", [1, "x", [1], {"properties": 1}, {"definition": "a:b:c"}])
async def test_put_invalid_feature_is_400(client: httpx.AsyncClient, thing_id: str, body: object) -> None:
    await create(client, thing_id)
    assert_error(await client.put(url(thing_id, "/features/lamp"), json=body), 400, "json.invalid")
    assert await revision(client, thing_id) == 1


# ---- /features/{featureId}/definition --------------------------------------------------


async def test_feature_definition_lifecycle(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"features": {"lamp": {}}})
    path = "/features/lamp/definition"
    assert_error(await client.get(url(thing_id, path)), 404, "things:feature.definition.notfound")
    assert_error(await client.delete(url(thing_id, path)), 404, "things:feature.definition.notfound")

    r = await client.put(url(thing_id, path), json=["com.acme:lamp:1.0.0", "https://example.com/lamp.jsonld"])
    assert r.status_code == 201, r.text
    assert r.json() == ["com.acme:lamp:1.0.0", "https://example.com/lamp.jsonld"]
    assert r.headers["location"].endswith(url(thing_id, path))
    r = await client.get(url(thing_id, path))
    assert r.json() == ["com.acme:lamp:1.0.0", "https://example.com/lamp.jsonld"]
    assert r.headers["etag"].startswith('"hash:')

    r = await client.put(url(thing_id, path), json=["com.acme:lamp:2.0.0"])
    assert r.status_code == 204, r.text
    r = await client.patch(url(thing_id, path), json=["com.acme:lamp:3.0.0"], headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, path))).json() == ["com.acme:lamp:3.0.0"]

    r = await client.delete(url(thing_id, path))
    assert r.status_code == 204
    assert_error(await client.get(url(thing_id, path)), 404, "things:feature.definition.notfound")
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == {}
    assert await revision(client, thing_id) == 5


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("com.acme:lamp:1.0.0", "json.invalid"),  # a definition is a list
        (["nope"], "things:definition.identifier.invalid"),
        ([1], "json.invalid"),
        ([["a:b:c"]], "json.invalid"),
        ({"a": "b:c:d"}, "json.invalid"),
    ],
)
async def test_put_invalid_feature_definition_is_400(
    client: httpx.AsyncClient, thing_id: str, body: object, error: str
) -> None:
    await create(client, thing_id, {"features": {"lamp": {}}})
    assert_error(await client.put(url(thing_id, "/features/lamp/definition"), json=body), 400, error)
    assert await revision(client, thing_id) == 1


async def test_invalid_feature_definition_identifier_error_code(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"features": {"lamp": {}}})
    r = await client.put(url(thing_id, "/features/lamp/definition"), json=["nope"])
    assert_error(r, 400, "things:definition.identifier.invalid")


async def test_feature_definition_of_missing_feature_is_404(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    path = "/features/lamp/definition"
    assert_error(await client.get(url(thing_id, path)), 404, "things:feature.notfound")
    assert_error(await client.put(url(thing_id, path), json=["a:b:c"]), 404, "things:feature.notfound")
    assert_error(await client.delete(url(thing_id, path)), 404, "things:feature.notfound")
    assert await revision(client, thing_id) == 1


# ---- /features/{featureId}/properties and desiredProperties ----------------------------


@pytest.mark.parametrize(
    ("kind", "plural_error", "singular_error"),
    [
        ("properties", "things:feature.properties.notfound", "things:feature.property.notfound"),
        (
            "desiredProperties",
            "things:feature.desiredProperties.notfound",
            "things:feature.desiredProperty.notfound",
        ),
    ],
)
async def test_properties_lifecycle(
    client: httpx.AsyncClient, thing_id: str, kind: str, plural_error: str, singular_error: str
) -> None:
    await create(client, thing_id, {"features": {"lamp": {}}})
    base = f"/features/lamp/{kind}"
    assert_error(await client.get(url(thing_id, base)), 404, plural_error)
    assert_error(await client.delete(url(thing_id, base)), 404, plural_error)
    # Ditto reports the first missing level: here the properties themselves.
    assert_error(await client.get(url(thing_id, base + "/on")), 404, plural_error)

    r = await client.put(url(thing_id, base), json={"on": True})
    assert r.status_code == 201, r.text
    assert r.json() == {"on": True}
    assert r.headers["location"].endswith(url(thing_id, base))
    r = await client.get(url(thing_id, base))
    assert r.status_code == 200
    assert r.json() == {"on": True}
    assert r.headers["etag"].startswith('"hash:')

    r = await client.put(url(thing_id, base), json={"on": False, "level": 1})
    assert r.status_code == 204, r.text
    r = await client.patch(url(thing_id, base), json={"on": None, "color": {"r": 1}}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, base))).json() == {"level": 1, "color": {"r": 1}}

    # Deep paths.
    r = await client.put(url(thing_id, base + "/color/g"), json=2)
    assert r.status_code == 201, r.text
    assert r.json() == 2
    assert r.headers["location"].endswith(url(thing_id, base + "/color/g"))
    r = await client.put(url(thing_id, base + "/color/g"), json=3)
    assert r.status_code == 204, r.text
    r = await client.get(url(thing_id, base + "/color"))
    assert r.json() == {"r": 1, "g": 3}
    r = await client.get(url(thing_id, base + "/color/g"))
    assert r.status_code == 200
    assert r.json() == 3
    assert r.headers["etag"].startswith('"hash:')
    r = await client.patch(url(thing_id, base + "/color"), json={"r": None, "b": 4}, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, base + "/color"))).json() == {"g": 3, "b": 4}
    r = await client.patch(url(thing_id, base + "/brand/new"), json="yes", headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, base + "/brand"))).json() == {"new": "yes"}

    r = await client.delete(url(thing_id, base + "/color/g"))
    assert r.status_code == 204
    assert_error(await client.get(url(thing_id, base + "/color/g")), 404, singular_error)
    assert_error(await client.delete(url(thing_id, base + "/color/g")), 404, singular_error)
    assert_error(await client.get(url(thing_id, base + "/level/deeper")), 404, singular_error)

    r = await client.delete(url(thing_id, base))
    assert r.status_code == 204
    assert_error(await client.get(url(thing_id, base)), 404, plural_error)
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == {}
    assert await revision(client, thing_id) == 10


@pytest.mark.parametrize("kind", ["properties", "desiredProperties"])
async def test_properties_of_missing_feature_are_404(
    client: httpx.AsyncClient, thing_id: str, kind: str
) -> None:
    await create(client, thing_id, {"features": {"other": {}}})
    base = f"/features/lamp/{kind}"
    for r in [
        await client.get(url(thing_id, base)),
        await client.put(url(thing_id, base), json={}),
        await client.delete(url(thing_id, base)),
        await client.get(url(thing_id, base + "/a/b")),
        await client.put(url(thing_id, base + "/a/b"), json=1),
        await client.delete(url(thing_id, base + "/a/b")),
    ]:
        assert_error(r, 404, "things:feature.notfound")
    assert await revision(client, thing_id) == 1


@pytest.mark.parametrize("kind", ["properties", "desiredProperties"])
async def test_a_merge_creates_a_missing_feature(client: httpx.AsyncClient, thing_id: str, kind: str) -> None:
    """As Ditto's MergeThing (``{path: value}`` merged into the whole thing), unlike a PUT."""
    await create(client, thing_id, {"features": {"other": {}}})
    r = await client.patch(url(thing_id, f"/features/lamp/{kind}/a/b"), json=1, headers=MERGE)
    assert r.status_code == 204, r.text
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == {kind: {"a": {"b": 1}}}


@pytest.mark.parametrize("kind", ["properties", "desiredProperties"])
@pytest.mark.parametrize("value", [1, "x", [1], None])
async def test_put_properties_not_an_object_is_400(
    client: httpx.AsyncClient, thing_id: str, kind: str, value: object
) -> None:
    await create(client, thing_id, {"features": {"lamp": {kind: {"a": 1}}}})
    r = await client.put(url(thing_id, f"/features/lamp/{kind}"), content=body(value), headers=JSON)
    assert_error(r, 400, "json.invalid")
    assert (await client.get(url(thing_id, f"/features/lamp/{kind}"))).json() == {"a": 1}
    assert await revision(client, thing_id) == 1


async def test_properties_and_desired_properties_are_independent(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"features": {"lamp": {"properties": {"on": False}}}})
    r = await client.put(url(thing_id, "/features/lamp/desiredProperties/on"), json=True)
    assert r.status_code == 201, r.text
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == {
        "properties": {"on": False},
        "desiredProperties": {"on": True},
    }
    assert (await client.delete(url(thing_id, "/features/lamp/desiredProperties"))).status_code == 204
    assert (await client.get(url(thing_id, "/features/lamp"))).json() == {"properties": {"on": False}}


async def test_feature_sub_resource_that_is_not_a_thing_resource_is_rejected(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"features": {"lamp": {}}})
    assert_error(await client.get(url(thing_id, "/features/lamp/unknown")), 404, "gateway:routing.notfound")
    r = await client.put(url(thing_id, "/features/lamp/unknown"), json=1)
    assert_error(r, 404, "gateway:routing.notfound")
    assert await revision(client, thing_id) == 1
