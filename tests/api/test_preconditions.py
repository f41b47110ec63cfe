"""ETag, If-Match and If-None-Match (incl. ``*``) on things and sub-resources, as Ditto does them."""

from __future__ import annotations

import httpx
import pytest

from tests.api.helpers import MERGE, assert_error, create, revision, thing, url


def assert_not_modified(r: httpx.Response, etag: str) -> None:
    assert r.status_code == 304, r.text
    assert r.content == b""
    assert r.headers["etag"] == etag


# ---- things ----------------------------------------------------------------------------


async def test_write_with_matching_if_match(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.put(url(thing_id), json={"attributes": {"a": 2}}, headers={"if-match": '"rev:1"'})
    assert r.status_code == 204, r.text
    assert r.headers["etag"] == '"rev:2"'


async def test_write_with_stale_if_match_is_412(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    assert (await client.put(url(thing_id, "/attributes/a"), json=2)).status_code == 204
    for method, path, body, headers in [
        ("PUT", "", {"attributes": {"a": 3}}, {}),
        ("PATCH", "", {"attributes": {"a": 3}}, MERGE),
        ("DELETE", "", None, {}),
        ("PUT", "/attributes/a", 3, {}),
        ("DELETE", "/attributes/a", None, {}),
    ]:
        kwargs: dict[str, object] = {"headers": {**headers, "if-match": '"rev:1"'}}
        if body is not None:
            kwargs["json"] = body
        r = await client.request(method, url(thing_id, path), **kwargs)  # type: ignore[arg-type]
        body_ = assert_error(r, 412, "things:precondition.failed")
        assert "if-match" in body_["message"].lower()
    assert await revision(client, thing_id) == 2
    assert (await thing(client, thing_id))["attributes"] == {"a": 2}


async def test_412_carries_the_current_etag(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.put(url(thing_id), json={}, headers={"if-match": '"rev:7"'})
    assert_error(r, 412, "things:precondition.failed")
    assert r.headers["etag"] == '"rev:1"'


async def test_if_match_list_matches_any(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id), json={"attributes": {}}, headers={"if-match": '"rev:5", "rev:1"'})
    assert r.status_code == 204, r.text


async def test_if_match_on_absent_sub_resource_is_412(client: httpx.AsyncClient, thing_id: str) -> None:
    # RFC 9110: If-Match is false when the resource has no current representation.
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/attributes"), json={}, headers={"if-match": '"rev:1"'})
    assert_error(r, 412, "things:precondition.failed")
    assert "etag" not in r.headers


async def test_if_match_star_requires_existence(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={}, headers={"if-match": "*"})
    assert_error(r, 412, "things:precondition.failed")
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")
    await create(client, thing_id)
    r = await client.put(url(thing_id), json={"attributes": {"a": 1}}, headers={"if-match": "*"})
    assert r.status_code == 204, r.text


async def test_if_none_match_star_creates_only(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={"attributes": {"a": 1}}, headers={"if-none-match": "*"})
    assert r.status_code == 201, r.text
    r = await client.put(url(thing_id), json={"attributes": {"a": 2}}, headers={"if-none-match": "*"})
    body = assert_error(r, 412, "things:precondition.failed")
    assert "if-none-match" in body["message"].lower()
    assert (await thing(client, thing_id))["attributes"] == {"a": 1}
    assert await revision(client, thing_id) == 1


async def test_if_none_match_star_after_delete_creates_again(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id)
    assert (await client.delete(url(thing_id))).status_code == 204
    # The thing's policy outlives it: a new thing names it (as in Ditto).
    r = await client.put(url(thing_id), json={"policyId": thing_id}, headers={"if-none-match": "*"})
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"rev:3"'


async def test_write_with_if_none_match_of_current_etag_is_412(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id)
    r = await client.put(url(thing_id), json={}, headers={"if-none-match": '"rev:1"'})
    assert_error(r, 412, "things:precondition.failed")
    r = await client.put(url(thing_id), json={}, headers={"if-none-match": '"rev:9"'})
    assert r.status_code == 204, r.text


async def test_get_with_matching_if_none_match_is_304(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.get(url(thing_id), headers={"if-none-match": '"rev:1"'})
    assert_not_modified(r, '"rev:1"')
    r = await client.get(url(thing_id), headers={"if-none-match": "*"})
    assert_not_modified(r, '"rev:1"')
    r = await client.get(url(thing_id), headers={"if-none-match": '"rev:0", "rev:1"'})
    assert_not_modified(r, '"rev:1"')
    r = await client.get(url(thing_id), headers={"if-none-match": '"rev:2"'})
    assert r.status_code == 200
    assert r.json()["attributes"] == {"a": 1}


async def test_get_with_etag_from_previous_response(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    etag = (await client.get(url(thing_id))).headers["etag"]
    assert_not_modified(await client.get(url(thing_id), headers={"if-none-match": etag}), etag)
    assert (await client.put(url(thing_id, "/attributes"), json={"a": 1})).status_code == 201
    r = await client.get(url(thing_id), headers={"if-none-match": etag})
    assert r.status_code == 200
    assert r.headers["etag"] == '"rev:2"'


async def test_get_with_if_match(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.get(url(thing_id), headers={"if-match": '"rev:1"'})
    assert r.status_code == 200
    r = await client.get(url(thing_id), headers={"if-match": "*"})
    assert r.status_code == 200
    assert_error(
        await client.get(url(thing_id), headers={"if-match": '"rev:2"'}), 412, "things:precondition.failed"
    )


async def test_get_missing_thing_with_preconditions(client: httpx.AsyncClient, thing_id: str) -> None:
    assert_error(
        await client.get(url(thing_id), headers={"if-none-match": "*"}), 404, "things:thing.notfound"
    )
    r = await client.get(url(thing_id), headers={"if-match": "*"})
    assert r.status_code in (404, 412), r.text


async def test_preconditions_as_query_parameters(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    r = await client.get(url(thing_id), params={"if-none-match": '"rev:1"'})
    assert_not_modified(r, '"rev:1"')
    r = await client.put(url(thing_id), json={}, params={"if-match": '"rev:0"'})
    assert_error(r, 412, "things:precondition.failed")


@pytest.mark.parametrize("value", ["rev:1", "not quoted", '"unterminated'])
async def test_malformed_precondition_header_is_400(
    client: httpx.AsyncClient, thing_id: str, value: str
) -> None:
    await create(client, thing_id)
    assert_error(await client.put(url(thing_id), json={}, headers={"if-match": value}), 400, "header.invalid")
    assert_error(await client.get(url(thing_id), headers={"if-none-match": value}), 400, "header.invalid")
    assert await revision(client, thing_id) == 1


# ---- sub-resources ---------------------------------------------------------------------


async def test_sub_resource_etags_are_hashes_of_their_value(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": {"x": 1}, "b": {"x": 1}}})
    tag_a = (await client.get(url(thing_id, "/attributes/a"))).headers["etag"]
    tag_b = (await client.get(url(thing_id, "/attributes/b"))).headers["etag"]
    assert tag_a.startswith('"hash:') and tag_a.endswith('"')
    assert tag_a == tag_b  # same JSON, same tag
    r = await client.put(url(thing_id, "/attributes/a"), json={"x": 2})
    assert r.status_code == 204
    new_tag = r.headers["etag"]
    assert new_tag != tag_a
    assert (await client.get(url(thing_id, "/attributes/a"))).headers["etag"] == new_tag
    # Another attribute's tag is untouched by the change.
    assert (await client.get(url(thing_id, "/attributes/b"))).headers["etag"] == tag_b


async def test_sub_resource_if_match_with_hash(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"features": {"f": {"properties": {"p": 1}}}})
    path = url(thing_id, "/features/f/properties/p")
    tag = (await client.get(path)).headers["etag"]
    r = await client.put(path, json=2, headers={"if-match": tag})
    assert r.status_code == 204, r.text
    r = await client.put(path, json=3, headers={"if-match": tag})
    assert_error(r, 412, "things:precondition.failed")
    assert (await client.get(path)).json() == 2
    assert await revision(client, thing_id) == 2


async def test_sub_resource_if_none_match_on_get_is_304(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    tag = (await client.get(url(thing_id, "/attributes"))).headers["etag"]
    assert_not_modified(await client.get(url(thing_id, "/attributes"), headers={"if-none-match": tag}), tag)
    assert_not_modified(await client.get(url(thing_id, "/attributes"), headers={"if-none-match": "*"}), tag)
    r = await client.get(url(thing_id, "/attributes"), headers={"if-none-match": '"hash:0000"'})
    assert r.status_code == 200
    assert r.json() == {"a": 1}


async def test_sub_resource_if_none_match_star_creates_only(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id)
    path = url(thing_id, "/attributes/once")
    r = await client.put(path, json=1, headers={"if-none-match": "*"})
    assert r.status_code == 201, r.text
    assert_error(
        await client.put(path, json=2, headers={"if-none-match": "*"}), 412, "things:precondition.failed"
    )
    assert (await client.get(path)).json() == 1


async def test_sub_resource_if_match_star_requires_existence(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {}})
    path = url(thing_id, "/attributes/only-if-there")
    assert_error(await client.put(path, json=1, headers={"if-match": "*"}), 412, "things:precondition.failed")
    assert_error(await client.get(path), 404, "things:attribute.notfound")
    assert (await client.put(path, json=1)).status_code == 201
    assert (await client.put(path, json=2, headers={"if-match": "*"})).status_code == 204


async def test_sub_resource_accepts_thing_revision_in_if_match(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    r = await client.put(url(thing_id, "/attributes/a"), json=2, headers={"if-match": '"rev:1"'})
    assert r.status_code == 204, r.text
    r = await client.put(url(thing_id, "/attributes/a"), json=3, headers={"if-match": '"rev:1"'})
    assert_error(r, 412, "things:precondition.failed")


async def test_delete_with_preconditions(client: httpx.AsyncClient, thing_id: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    tag = (await client.get(url(thing_id, "/attributes/a"))).headers["etag"]
    assert_error(
        await client.delete(url(thing_id, "/attributes/a"), headers={"if-match": '"hash:0"'}),
        412,
        "things:precondition.failed",
    )
    assert (await client.delete(url(thing_id, "/attributes/a"), headers={"if-match": tag})).status_code == 204
    assert_error(
        await client.delete(url(thing_id), headers={"if-match": '"rev:1"'}), 412, "things:precondition.failed"
    )
    assert (await client.delete(url(thing_id), headers={"if-match": '"rev:2"'})).status_code == 204


async def test_sub_resource_if_none_match_with_current_hash_on_write_is_412(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    tag = (await client.get(url(thing_id, "/attributes/a"))).headers["etag"]
    r = await client.put(url(thing_id, "/attributes/a"), json=2, headers={"if-none-match": tag})
    assert_error(r, 412, "things:precondition.failed")
    assert r.headers["etag"] == tag
    r = await client.put(url(thing_id, "/attributes/a"), json=2, headers={"if-none-match": '"hash:other"'})
    assert r.status_code == 204, r.text


async def test_merge_patch_create_with_if_none_match_star(client: httpx.AsyncClient, thing_id: str) -> None:
    headers = {**MERGE, "if-none-match": "*"}
    r = await client.patch(url(thing_id), json={"attributes": {"a": 1}}, headers=headers)
    assert r.status_code == 201, r.text
    r = await client.patch(url(thing_id), json={"attributes": {"a": 2}}, headers=headers)
    assert_error(r, 412, "things:precondition.failed")
    assert (await thing(client, thing_id))["attributes"] == {"a": 1}


async def test_json_patch_response_etag_is_the_addressed_resource(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    await create(client, thing_id, {"attributes": {"a": {"list": [1]}}})
    r = await client.patch(
        url(thing_id, "/attributes"),
        json=[{"op": "add", "path": "/a/list/-", "value": 2}],
        headers={"content-type": "application/json-patch+json"},
    )
    assert r.status_code == 204, r.text
    got = await client.get(url(thing_id, "/attributes"))
    assert got.json() == {"a": {"list": [1, 2]}}
    assert r.headers["etag"] == got.headers["etag"]
