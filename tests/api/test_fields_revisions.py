"""``fields=`` selection (incl. parentheses and ``_revision``/``_created``/``_modified``) and revisions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.api.helpers import JSON_PATCH, MERGE, assert_error, create, make_policy, revision, thing, url

THING = {
    "definition": "a:b:1",
    "attributes": {
        "model": "x1",
        "location": "Berlin",
        "address": {"postal": {"city": "Berlin", "street": "Main", "zip": "10115"}, "country": "DE"},
        "coffeemaker": {"serialno": "42", "other": 1},
    },
    "features": {
        "lamp": {
            "definition": ["a:lamp:1"],
            "properties": {"on": True, "level": 3},
            "desiredProperties": {"on": False},
        },
        "tank": {"properties": {"water": 1}},
    },
}


def ts(text: str) -> datetime:
    assert text.endswith("Z") or "+" in text, text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("thingId", lambda t: {"thingId": t}),
        ("thingId,policyId", lambda t: {"thingId": t, "policyId": t}),
        ("definition", lambda t: {"definition": "a:b:1"}),
        ("attributes/model", lambda t: {"attributes": {"model": "x1"}}),
        (
            "attributes/model,attributes/location",
            lambda t: {"attributes": {"model": "x1", "location": "Berlin"}},
        ),
        ("attributes(model,location)", lambda t: {"attributes": {"model": "x1", "location": "Berlin"}}),
        ("attributes(coffeemaker/serialno)", lambda t: {"attributes": {"coffeemaker": {"serialno": "42"}}}),
        (
            "attributes/address/postal(city,street)",
            lambda t: {"attributes": {"address": {"postal": {"city": "Berlin", "street": "Main"}}}},
        ),
        (
            "thingId,attributes(model,address(country,postal(zip)))",
            lambda t: {
                "thingId": t,
                "attributes": {"model": "x1", "address": {"country": "DE", "postal": {"zip": "10115"}}},
            },
        ),
        (
            "features/lamp/properties(on),features/tank",
            lambda t: {
                "features": {"lamp": {"properties": {"on": True}}, "tank": {"properties": {"water": 1}}}
            },
        ),
        (
            "features(lamp/desiredProperties)",
            lambda t: {"features": {"lamp": {"desiredProperties": {"on": False}}}},
        ),
        ("attributes/nope,features/nope", lambda t: {}),
        ("thingId,_revision", lambda t: {"thingId": t, "_revision": 1}),
    ],
)
async def test_fields_on_thing(
    client: httpx.AsyncClient, thing_id: str, fields: str, expected: object
) -> None:
    await create(client, thing_id, THING)
    r = await client.get(url(thing_id), params={"fields": fields})
    assert r.status_code == 200, r.text
    assert r.json() == expected(thing_id)  # type: ignore[operator]
    assert r.headers["etag"] == '"rev:1"'


async def test_fields_meta_created_and_modified(client: httpx.AsyncClient, thing_id: str) -> None:
    before = datetime.now(UTC)
    await create(client, thing_id, THING)
    r = await client.get(url(thing_id), params={"fields": "_revision,_created,_modified"})
    body = r.json()
    assert set(body) == {"_revision", "_created", "_modified"}
    assert body["_revision"] == 1
    created, modified = ts(body["_created"]), ts(body["_modified"])
    assert created == modified
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)

    await asyncio.sleep(0.01)  # time itself: _modified must move past _created (ms resolution)
    assert (await client.put(url(thing_id, "/attributes/model"), json="x2")).status_code == 204
    body = (await client.get(url(thing_id), params={"fields": "_revision,_created,_modified"})).json()
    assert body["_revision"] == 2
    assert ts(body["_created"]) == created
    assert ts(body["_modified"]) > modified


async def test_meta_fields_are_not_in_the_default_view(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, THING)
    assert not any(key.startswith("_") for key in await thing(client, thing_id))


async def test_fields_namespace(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.get(url(thing_id), params={"fields": "_namespace,thingId"})
    assert r.json() == {"_namespace": thing_id.split(":")[0], "thingId": thing_id}


async def test_fields_on_sub_resources(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, THING)
    r = await client.get(url(thing_id, "/attributes"), params={"fields": "model,address/country"})
    assert r.status_code == 200
    assert r.json() == {"model": "x1", "address": {"country": "DE"}}
    r = await client.get(url(thing_id, "/features"), params={"fields": "lamp/properties/level"})
    assert r.json() == {"lamp": {"properties": {"level": 3}}}
    r = await client.get(url(thing_id, "/features/lamp/properties"), params={"fields": "on"})
    assert r.json() == {"on": True}


@pytest.mark.parametrize("fields", ["", "attributes(model", "attributes)model(", "a(b))"])
async def test_invalid_fields_are_400(client: httpx.AsyncClient, thing_id: str, fields: str) -> None:
    await create(client, thing_id, THING)
    assert_error(
        await client.get(url(thing_id), params={"fields": fields}), 400, "json.fieldselector.invalid"
    )


# ---- revisions -------------------------------------------------------------------------


async def test_every_successful_write_raises_the_revision_by_one(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await make_policy(client, "org.test:p")
    await make_policy(client, "org.test:q")
    writes = [
        ("PUT", "", {"attributes": {"a": 1}}, None),
        ("PUT", "/policyId", "org.test:p", None),
        ("PATCH", "/policyId", "org.test:q", MERGE),
        ("PUT", "/definition", "a:b:1", None),
        ("PATCH", "/definition", "a:b:2", MERGE),
        ("DELETE", "/definition", None, None),
        ("PUT", "/attributes", {"b": 2}, None),
        ("PATCH", "/attributes", {"c": 3}, MERGE),
        ("PUT", "/attributes/d/e", 4, None),
        ("PATCH", "/attributes/d", {"f": 5}, MERGE),
        ("DELETE", "/attributes/d/e", None, None),
        ("PUT", "/features", {"f": {}}, None),
        ("PATCH", "/features", {"g": {}}, MERGE),
        ("PUT", "/features/f", {"properties": {}}, None),
        ("PATCH", "/features/f", {"desiredProperties": {}}, MERGE),
        ("PUT", "/features/f/definition", ["a:b:1"], None),
        ("DELETE", "/features/f/definition", None, None),
        ("PUT", "/features/f/properties", {"p": 1}, None),
        ("PATCH", "/features/f/properties", {"q": 2}, MERGE),
        ("PUT", "/features/f/properties/r/s", 3, None),
        ("PATCH", "/features/f/properties/r", {"t": 4}, MERGE),
        ("DELETE", "/features/f/properties/r", None, None),
        ("PUT", "/features/f/desiredProperties", {"p": 1}, None),
        ("PATCH", "/features/f/desiredProperties", {"q": 2}, MERGE),
        ("PUT", "/features/f/desiredProperties/x", 1, None),
        ("PATCH", "/features/f/desiredProperties/x", 2, MERGE),
        ("DELETE", "/features/f/desiredProperties/x", None, None),
        ("DELETE", "/features/f/desiredProperties", None, None),
        ("DELETE", "/features/f/properties", None, None),
        ("DELETE", "/features/g", None, None),
        ("PATCH", "", {"attributes": {"z": 1}}, MERGE),
        ("PATCH", "", [{"op": "add", "path": "/attributes/y", "value": 1}], JSON_PATCH),
        ("PATCH", "/attributes", [{"op": "remove", "path": "/y"}], JSON_PATCH),
        ("DELETE", "/features", None, None),
        ("DELETE", "/attributes", None, None),
        ("PUT", "", {}, None),
        ("DELETE", "", None, None),
        ("PUT", "", {"policyId": "org.test:q"}, None),  # the policy outlives the thing
    ]
    for n, (method, path, body, headers) in enumerate(writes, start=1):
        kwargs: dict[str, object] = {}
        if body is not None:
            kwargs["json"] = body
        if headers is not None:
            kwargs["headers"] = headers
        r = await client.request(method, url(thing_id, path), **kwargs)  # type: ignore[arg-type]
        assert r.status_code in (201, 204), (n, method, path, r.status_code, r.text)
        if path == "" and method != "DELETE":
            assert r.headers["etag"] == f'"rev:{n}"', (n, method, path)
        if method == "DELETE" and path == "":
            continue
        assert await revision(client, thing_id) == n, (n, method, path)


async def test_failed_writes_do_not_raise_the_revision(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}, "features": {"f": {"properties": {"p": 1}}}})
    # (method, path, body, headers, (status, Ditto error code))
    failures = [
        ("PUT", "", {"thingId": "org.test:other"}, None, (400, "things:id.notsettable")),
        ("PUT", "", [1], None, (400, "json.invalid")),
        ("PUT", "/attributes", 1, None, (400, "json.invalid")),
        ("PUT", "/definition", "nope", None, (400, "things:definition.identifier.invalid")),
        ("PUT", "/policyId", "nope", None, (400, "policies:id.invalid")),
        ("PUT", "/features/missing/properties/x", 1, None, (404, "things:feature.notfound")),
        ("DELETE", "/attributes/missing", None, None, (404, "things:attribute.notfound")),
        ("DELETE", "/features/missing", None, None, (404, "things:feature.notfound")),
        ("DELETE", "/features/f/properties/missing", None, None, (404, "things:feature.property.notfound")),
        ("DELETE", "/definition", None, None, (404, "things:definition.notfound")),
        (
            "PATCH",
            "",
            [{"op": "test", "path": "/attributes/a", "value": 2}],
            JSON_PATCH,
            (400, "things:patch.invalid"),
        ),
        ("PATCH", "", {"attributes": 5}, MERGE, (400, "json.invalid")),
        (
            "PATCH",
            "/attributes",
            {"a": 2},
            {"content-type": "application/json"},
            (415, "mediatype.unsupported"),
        ),
        ("PUT", "/attributes/a", 2, {"if-match": '"rev:99"'}, (412, "things:precondition.failed")),
        ("PUT", "", {}, {"if-none-match": "*"}, (412, "things:precondition.failed")),
    ]
    for method, path, body, headers, (status, error) in failures:
        kwargs: dict[str, object] = {"json": body} if body is not None else {}
        if headers is not None:
            kwargs["headers"] = headers
        r = await client.request(method, url(thing_id, path), **kwargs)  # type: ignore[arg-type]
        assert_error(r, status, error)
        assert await revision(client, thing_id) == 1, (method, path)
    assert (await thing(client, thing_id))["attributes"] == {"a": 1}


async def test_concurrent_writes_get_distinct_consecutive_revisions(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id)
    responses = await asyncio.gather(
        *(client.put(url(thing_id, f"/attributes/k{i}"), json=i) for i in range(20))
    )
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
    assert await revision(client, thing_id) == 21
    assert (await client.get(url(thing_id, "/attributes"))).json() == {f"k{i}": i for i in range(20)}
