"""Errors in Ditto's body, media types, size limits, thing ids, routes, authentication; never a 5xx."""

from __future__ import annotations

import httpx
import pytest

from tests.api.helpers import JSON_PATCH, MERGE, assert_error, create, revision, thing, url
from tests.conftest import new_thing_id
from twinstore.settings import Settings

JSON = {"content-type": "application/json"}


# ---- malformed JSON --------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"{'a': 1}",
        b'{"a": 1,}',
        b"NaN",
        b"[1, 2",
        b'{"a": tru}',
        b"\xff\xfe",
        b'"unterminated',
        b"1e400",
    ],
)
async def test_malformed_json_is_400_json_invalid(
    client: httpx.AsyncClient, thing_id: str, body: bytes
) -> None:
    await create(client, thing_id)
    for method, path, headers in [
        ("PUT", "", JSON),
        ("PUT", "/attributes/a", JSON),
        ("PATCH", "/attributes", MERGE),
        ("PATCH", "", JSON_PATCH),
    ]:
        r = await client.request(method, url(thing_id, path), content=body, headers=headers)
        assert_error(r, 400, "json.invalid")
    r = await client.post("/api/2/things", content=body, headers=JSON)
    assert_error(r, 400, "json.invalid")
    assert await revision(client, thing_id) == 1


async def test_empty_body_on_put_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    assert_error(
        await client.put(url(thing_id, "/attributes/a"), content=b"", headers=JSON), 400, "json.invalid"
    )
    assert await revision(client, thing_id) == 1


async def test_deeply_nested_json_is_a_client_error(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    body = b'{"a":' * 5000 + b"1" + b"}" * 5000
    r = await client.put(url(thing_id, "/attributes/deep"), content=body, headers=JSON)
    assert_error(r, 400, "json.invalid")


async def test_nul_characters_are_rejected_not_a_5xx(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/attributes/a"), content=b'"nul\\u0000here"', headers=JSON)
    assert_error(r, 400, "json.invalid")
    r = await client.put(url(thing_id, "/attributes/a"), content=b'{"k\\u0000": 1}', headers=JSON)
    assert_error(r, 400, "json.invalid")
    r = await client.patch(url(thing_id), content=b'{"attributes": {"x": "\\u0000"}}', headers=MERGE)
    assert_error(r, 400, "json.invalid")
    # The service is still fine and the thing unchanged.
    assert await revision(client, thing_id) == 1
    assert (await client.put(url(thing_id, "/attributes/a"), json="ok")).status_code == 201


async def test_big_numbers_round_trip(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    for value in [2**53 + 1, -(2**63), 2**64 - 1, 1.5e300, 1e-300]:
        r = await client.put(url(thing_id, "/attributes/n"), json=value)
        assert r.status_code in (201, 204), (value, r.text)
        assert (await client.get(url(thing_id, "/attributes/n"))).json() == value
    r = await client.put(
        url(thing_id, "/attributes/n"), content=b"123456789012345678901234567890", headers=JSON
    )
    assert r.status_code < 500, r.text


# ---- media types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/merge-patch+json", None]
)
async def test_put_with_wrong_content_type_is_415(
    client: httpx.AsyncClient, thing_id: str, content_type: str | None
) -> None:
    await create(client, thing_id)
    headers = {"content-type": content_type} if content_type else {}
    r = await client.put(url(thing_id), content=b'{"attributes": {}}', headers=headers)
    assert_error(r, 415, "mediatype.unsupported")
    r = await client.put(url(thing_id, "/attributes/a"), content=b"1", headers=headers)
    assert_error(r, 415, "mediatype.unsupported")
    assert await revision(client, thing_id) == 1


async def test_post_with_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/2/things", content=b"{}", headers={"content-type": "text/plain"})
    assert_error(r, 415, "mediatype.unsupported")


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
async def test_patch_with_wrong_content_type_is_415(
    client: httpx.AsyncClient, thing_id: str, content_type: str | None
) -> None:
    await create(client, thing_id)
    headers = {"content-type": content_type} if content_type else {}
    r = await client.patch(url(thing_id), content=b'{"attributes": {"a": 1}}', headers=headers)
    assert_error(r, 415, "mediatype.unsupported")
    r = await client.patch(url(thing_id, "/attributes"), content=b'{"a": 1}', headers=headers)
    assert_error(r, 415, "mediatype.unsupported")
    assert await revision(client, thing_id) == 1


async def test_content_type_parameters_and_case_are_accepted(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    r = await client.put(
        url(thing_id), content=b"{}", headers={"content-type": "Application/JSON; charset=utf-8"}
    )
    assert r.status_code == 201, r.text
    r = await client.patch(
        url(thing_id),
        content=b'{"attributes": {"a": 1}}',
        headers={"content-type": "application/merge-patch+json; charset=UTF-8"},
    )
    assert r.status_code == 204, r.text


# ---- sizes -----------------------------------------------------------------------------


async def test_body_over_the_configured_limit_is_413(
    client: httpx.AsyncClient, thing_id: str, settings: Settings
) -> None:
    assert settings.max_body_bytes == 262_144
    await create(client, thing_id)
    big = b'{"x": "' + b"a" * settings.max_body_bytes + b'"}'
    for method, path, headers in [
        ("PUT", "", JSON),
        ("PUT", "/attributes", JSON),
        ("PATCH", "/attributes", MERGE),
    ]:
        r = await client.request(method, url(thing_id, path), content=big, headers=headers)
        assert_error(r, 413, "things:thing.tooLarge")
    r = await client.post("/api/2/things", content=big, headers=JSON)
    assert_error(r, 413, "things:thing.tooLarge")
    assert await revision(client, thing_id) == 1


async def test_thing_over_the_size_limit_is_413(
    client: httpx.AsyncClient, thing_id: str, settings: Settings
) -> None:
    await create(client, thing_id)
    value = "a" * (settings.max_thing_bytes + 10)
    assert len(value) + 100 < settings.max_body_bytes  # the request itself is allowed
    r = await client.put(url(thing_id, "/attributes/big"), json=value)
    assert_error(r, 413, "things:thing.tooLarge")
    # Growing a thing step by step hits the same limit.
    half = "b" * (settings.max_thing_bytes // 2 + 10)
    assert (await client.put(url(thing_id, "/attributes/one"), json=half)).status_code == 201
    assert_error(await client.put(url(thing_id, "/attributes/two"), json=half), 413, "things:thing.tooLarge")
    assert await revision(client, thing_id) == 2


# ---- thing ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id",
    [
        "no-namespace-separator",
        "1ns:name",
        "ns..x:name",
        "ns-x:name",
        "ns:",
        "ns:" + "n" * 300,
        "ns:a%01b",
        "ns x:name",
    ],
)
async def test_invalid_thing_id_is_400(client: httpx.AsyncClient, bad_id: str) -> None:
    for method, path, kwargs in [
        ("GET", "", {}),
        ("PUT", "", {"json": {}}),
        ("PATCH", "", {"json": {"attributes": {}}, "headers": MERGE}),
        ("DELETE", "", {}),
        ("GET", "/attributes", {}),
        ("PUT", "/attributes/a", {"json": 1}),
        ("DELETE", "/features/f", {}),
    ]:
        r = await client.request(method, f"/api/2/things/{bad_id}{path}", **kwargs)  # type: ignore[arg-type]
        assert_error(r, 400, "things:id.invalid")


async def test_thing_id_with_empty_namespace_is_valid(client: httpx.AsyncClient) -> None:
    thing_id = ":" + new_thing_id().split(":")[1]
    r = await client.put(url(thing_id), json={})
    assert r.status_code == 201, r.text
    assert r.json()["thingId"] == thing_id


async def test_thing_id_with_unusual_but_allowed_characters(client: httpx.AsyncClient) -> None:
    thing_id = "org.test_x.A1:" + new_thing_id().split(":")[1] + "-a_b.c:d~e"
    r = await client.put(url(thing_id), json={"attributes": {"a": 1}})
    assert r.status_code == 201, r.text
    assert await thing(client, thing_id) == {
        "thingId": thing_id,
        "policyId": thing_id,
        "attributes": {"a": 1},
    }


# ---- routes and methods ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/2/thingz",
        "/api/1/things",
        "/api/2/things/org.test:x/unknown",
        "/api/2/things/org.test:x/attributesx",
        "/nothing/here",
    ],
)
async def test_unknown_route_is_404(client: httpx.AsyncClient, path: str) -> None:
    assert_error(await client.get(path), 404, "gateway:routing.notfound")


async def test_method_not_allowed_is_405_in_ditto_format(client: httpx.AsyncClient, thing_id: str) -> None:
    assert_error(await client.post(url(thing_id, "/attributes"), json={}), 405, "gateway:method.notallowed")
    assert_error(await client.patch("/api/2/things", json={}), 405, "gateway:method.notallowed")


# ---- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [None, ("ditto", "wrong"), ("nobody", "ditto"), ("", "")],
)
async def test_missing_or_wrong_credentials_are_401(
    client: httpx.AsyncClient, thing_id: str, auth: tuple[str, str] | None
) -> None:
    await create(client, thing_id)
    for method, path, kwargs in [
        ("GET", url(thing_id), {}),
        ("PUT", url(thing_id), {"json": {}}),
        ("PATCH", url(thing_id), {"json": {"attributes": {}}, "headers": MERGE}),
        ("DELETE", url(thing_id), {}),
        ("GET", "/api/2/things", {"params": {"ids": thing_id}}),
        ("POST", "/api/2/things", {"json": {}}),
        ("GET", url(thing_id, "/features/f/properties/x"), {}),
    ]:
        headers = dict(kwargs.pop("headers", {}))  # type: ignore[call-overload]
        if auth is None:
            r = await _without_auth(client, method, path, headers, kwargs)
        else:
            r = await client.request(method, path, auth=auth, headers=headers, **kwargs)  # type: ignore[arg-type]
        assert_error(r, 401, "gateway:authentication.failed")
        assert r.headers["www-authenticate"].lower().startswith("basic")
    assert await revision(client, thing_id) == 1


async def _without_auth(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], kwargs: dict[str, object]
) -> httpx.Response:
    """A request with no Authorization header at all (the client's default auth bypassed)."""
    request = client.build_request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
    request.headers.pop("authorization", None)
    return await client.send(request, auth=None)


@pytest.mark.parametrize("header", ["Bearer abc", "Basic not-base64!", "Basic " + "ZGl0dG8=", "Digest x"])
async def test_malformed_authorization_header_is_401(
    client: httpx.AsyncClient, thing_id: str, header: str
) -> None:
    request = client.build_request("GET", url(thing_id))
    request.headers["authorization"] = header
    r = await client.send(request, auth=None)
    assert_error(r, 401, "gateway:authentication.failed")
    assert "www-authenticate" in r.headers


async def test_authentication_is_checked_before_validation(client: httpx.AsyncClient) -> None:
    request = client.build_request("PUT", "/api/2/things/not-valid", content=b"{", headers=JSON)
    request.headers.pop("authorization", None)
    assert_error(await client.send(request, auth=None), 401, "gateway:authentication.failed")


async def test_other_user_is_authenticated(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={}, auth=("other", "secret"))
    assert r.status_code == 201, r.text


# ---- never a 5xx -----------------------------------------------------------------------


async def test_odd_requests_never_cause_a_5xx(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(
        client,
        thing_id,
        {"attributes": {"list": [1, 2], "s": "x"}, "features": {"f": {"properties": {"p": 1}}}},
    )
    # (method, path, request arguments, the status of a success or (status, Ditto error code))
    requests: list[tuple[str, str, dict[str, object], int | tuple[int, str]]] = [
        ("GET", url(thing_id, "/attributes//a"), {}, (400, "json.pointer.invalid")),
        ("PUT", url(thing_id, "/attributes//a"), {"json": 1}, (400, "json.pointer.invalid")),
        ("GET", url(thing_id, "/attributes/list/0"), {}, (404, "things:attribute.notfound")),
        ("PUT", url(thing_id, "/attributes/list/0"), {"json": 1}, 201),
        ("DELETE", url(thing_id, "/attributes/list/0"), {}, 204),
        ("PATCH", url(thing_id, "/attributes/s/x"), {"json": 1, "headers": MERGE}, 204),
        ("GET", url(thing_id, "/features/%2F"), {}, 200),
        ("PUT", url(thing_id, "/features/a%2Fb"), {"json": {}}, (404, "gateway:routing.notfound")),
        ("PUT", url(thing_id, "/features/f/properties/%00"), {"json": 1}, (400, "json.key.invalid")),
        ("PUT", url(thing_id, "/features/f/desiredProperties/%7F"), {"json": 1}, (400, "json.key.invalid")),
        ("GET", url(thing_id), {"params": {"fields": "((("}}, (400, "json.fieldselector.invalid")),
        ("GET", url(thing_id), {"params": {"fields": ",,,"}}, 200),
        ("GET", url(thing_id), {"params": {"fields": "/"}}, 200),
        ("GET", "/api/2/things", {"params": {"ids": "," * 50}}, (400, "things:request.invalid")),
        ("GET", "/api/2/things", {"params": {"ids": ",".join(new_thing_id() for _ in range(500))}}, 200),
        ("GET", url(thing_id), {"headers": {"if-match": ""}}, (412, "things:precondition.failed")),
        ("GET", url(thing_id), {"headers": {"if-none-match": ","}}, 200),
        (
            "PUT",
            url(thing_id),
            {"json": {}, "headers": {"if-match": 'W/"rev:1"'}},
            (412, "things:precondition.failed"),
        ),
        (
            "PATCH",
            url(thing_id),
            {
                "json": [{"op": "add", "path": "/features/f/properties/p/-", "value": 1}],
                "headers": JSON_PATCH,
            },
            (400, "things:patch.invalid"),
        ),
        (
            "PATCH",
            url(thing_id),
            {"json": [{"op": "add", "path": "/features/f/definition", "value": 1}], "headers": JSON_PATCH},
            (400, "json.invalid"),
        ),
        (
            "PATCH",
            url(thing_id, "/attributes/list"),
            {"json": [{"op": "add", "path": "/-", "value": 3}], "headers": JSON_PATCH},
            204,
        ),
        (
            "PATCH",
            url(thing_id, "/attributes/missing"),
            {"json": [{"op": "add", "path": "/x", "value": 3}], "headers": JSON_PATCH},
            (404, "things:attribute.notfound"),
        ),
        (
            "PATCH",
            url(thing_id),
            {
                "json": [{"op": "remove", "path": "/attributes"}, {"op": "remove", "path": "/features"}],
                "headers": JSON_PATCH,
            },
            204,
        ),
        ("PUT", url(thing_id), {"json": {"attributes": {"a" * 1000: 1}}}, 204),
        ("PUT", url(thing_id), {"content": b'{"a": 1, "a": 2}', "headers": JSON}, 204),
        ("PUT", url(thing_id, "/policyId"), {"json": ":x"}, (404, "policies:policy.notfound")),
        ("GET", url(thing_id, "/features/f/properties/p/q/r/s"), {}, (404, "things:feature.notfound")),
        ("DELETE", url(thing_id, "/features/f/definition"), {}, (404, "things:feature.notfound")),
    ]
    for method, path, kwargs, expected in requests:
        r = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
        assert r.status_code < 500, (method, path, kwargs, r.status_code, r.text)
        if isinstance(expected, int):
            assert r.status_code == expected, (method, path, kwargs, r.status_code, r.text)
        else:
            assert_error(r, *expected)
    # The thing is still readable.
    assert (await client.get(url(thing_id))).status_code == 200


async def test_empty_pointer_key_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(f"/api/2/things/{thing_id}", json={"attributes": {"a": {"b": 1}}})
    assert r.status_code == 201
    r = await client.get(f"/api/2/things/{thing_id}/attributes//a")
    assert r.status_code == 400
    assert r.json()["error"] == "json.pointer.invalid"
    r = await client.put(f"/api/2/things/{thing_id}/attributes/a//b", json=2)
    assert r.status_code == 400
    r = await client.get(f"/api/2/things/{thing_id}/attributes/a/b")
    assert r.json() == 1  # nothing was written


async def test_json_patch_cannot_remove_thing_id(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(f"/api/2/things/{thing_id}", json={"attributes": {"a": 1}})
    assert r.status_code == 201
    r = await client.patch(
        f"/api/2/things/{thing_id}",
        content=b'[{"op": "remove", "path": "/thingId"}]',
        headers={"content-type": "application/json-patch+json"},
    )
    assert r.status_code == 400
    assert r.json()["error"] == "things:id.notdeletable"
    r = await client.get(f"/api/2/things/{thing_id}", params={"fields": "_revision"})
    assert r.json() == {"_revision": 1}
