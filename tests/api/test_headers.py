"""Ditto headers: ``response-required`` (202) and ``correlation-id``, as headers and as query parameters."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.api.helpers import JSON_PATCH, MERGE, assert_error, create, revision, thing, url


@pytest.mark.parametrize("how", ["header", "query"])
async def test_response_required_false_is_202_without_body(
    client: httpx.AsyncClient, thing_id: str, how: str
) -> None:
    def opts(extra: dict[str, str] | None = None) -> dict[str, object]:
        if how == "header":
            return {"headers": {"response-required": "false", **(extra or {})}}
        return {"params": {"response-required": "false"}, "headers": extra or {}}

    r = await client.put(url(thing_id), json={"attributes": {"a": 1}}, **opts())  # type: ignore[arg-type]
    assert r.status_code == 202, r.text
    assert r.content == b""
    assert "location" not in r.headers
    assert await thing(client, thing_id) == {
        "thingId": thing_id,
        "policyId": thing_id,
        "attributes": {"a": 1},
    }

    for r in [
        await client.put(url(thing_id), json={"attributes": {"a": 2}}, **opts()),  # type: ignore[arg-type]
        await client.put(url(thing_id, "/attributes/b"), json=1, **opts()),  # type: ignore[arg-type]
        await client.patch(url(thing_id, "/attributes"), json={"c": 1}, **opts(MERGE)),  # type: ignore[arg-type]
        await client.patch(  # type: ignore[arg-type]
            url(thing_id), json=[{"op": "add", "path": "/attributes/d", "value": 1}], **opts(JSON_PATCH)
        ),
        await client.delete(url(thing_id, "/attributes/b"), **opts()),  # type: ignore[arg-type]
    ]:
        assert r.status_code == 202, r.text
        assert r.content == b""
    assert (await client.get(url(thing_id, "/attributes"))).json() == {"a": 2, "c": 1, "d": 1}
    assert await revision(client, thing_id) == 6
    r = await client.delete(url(thing_id), **opts())  # type: ignore[arg-type]
    assert r.status_code == 202
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")


async def test_response_required_true_is_the_default(client: httpx.AsyncClient, thing_id: str) -> None:
    r = await client.put(url(thing_id), json={}, headers={"response-required": "true"})
    assert r.status_code == 201
    r = await client.put(url(thing_id), json={}, params={"response-required": "true"})
    assert r.status_code == 204


async def test_response_required_false_still_reports_errors(client: httpx.AsyncClient, thing_id: str) -> None:
    # Ditto validates the command before answering 202; invalid input is still a 4xx.
    r = await client.put(
        url(thing_id),
        content=b"{",
        headers={"response-required": "false", "content-type": "application/json"},
    )
    assert_error(r, 400, "json.invalid")


async def test_invalid_response_required_is_400(client: httpx.AsyncClient, thing_id: str) -> None:
    assert_error(
        await client.put(url(thing_id), json={}, headers={"response-required": "maybe"}),
        400,
        "header.invalid",
    )
    assert_error(await client.get(url(thing_id)), 404, "things:thing.notfound")


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_correlation_id_header_is_echoed(client: httpx.AsyncClient, thing_id: str, method: str) -> None:
    await create(client, thing_id, {"attributes": {"a": 1}})
    cid = f"my-correlation-{uuid.uuid4()}"
    kwargs: dict[str, object] = {"headers": {"correlation-id": cid}}
    if method == "PUT":
        kwargs["json"] = 2
    if method == "PATCH":
        kwargs["json"] = 3
        kwargs["headers"] = {"correlation-id": cid, **MERGE}
    r = await client.request(method, url(thing_id, "/attributes/a"), **kwargs)  # type: ignore[arg-type]
    assert r.status_code < 300, r.text
    assert r.headers["correlation-id"] == cid


async def test_correlation_id_query_parameter_is_echoed(client: httpx.AsyncClient, thing_id: str) -> None:
    cid = f"q-{uuid.uuid4()}"
    r = await client.put(url(thing_id), json={}, params={"correlation-id": cid})
    assert r.status_code == 201
    assert r.headers["correlation-id"] == cid
    r = await client.get("/api/2/things", params={"ids": thing_id, "correlation-id": cid})
    assert r.headers["correlation-id"] == cid
    r = await client.post("/api/2/things", json={}, params={"correlation-id": cid})
    assert r.headers["correlation-id"] == cid


async def test_correlation_id_is_generated_when_absent(client: httpx.AsyncClient, thing_id: str) -> None:
    r1 = await client.put(url(thing_id), json={})
    r2 = await client.get(url(thing_id))
    ids = [r1.headers.get("correlation-id"), r2.headers.get("correlation-id")]
    assert all(ids), ids
    assert ids[0] != ids[1]


async def test_correlation_id_is_echoed_on_errors(client: httpx.AsyncClient, thing_id: str) -> None:
    cid = f"err-{uuid.uuid4()}"
    r = await client.get(url(thing_id), headers={"correlation-id": cid})
    assert_error(r, 404, "things:thing.notfound")
    assert r.headers["correlation-id"] == cid
    r = await client.put(
        url(thing_id), content=b"{", headers={"correlation-id": cid, "content-type": "application/json"}
    )
    assert_error(r, 400, "json.invalid")
    assert r.headers["correlation-id"] == cid
    r = await client.get(url(thing_id), params={"correlation-id": cid})
    assert r.headers["correlation-id"] == cid


async def test_correlation_id_is_echoed_on_202_and_304(client: httpx.AsyncClient, thing_id: str) -> None:
    cid = f"c-{uuid.uuid4()}"
    r = await client.put(
        url(thing_id), json={}, headers={"correlation-id": cid, "response-required": "false"}
    )
    assert r.status_code == 202
    assert r.headers["correlation-id"] == cid
    r = await client.get(url(thing_id), headers={"correlation-id": cid, "if-none-match": "*"})
    assert r.status_code == 304
    assert r.headers["correlation-id"] == cid


async def test_correlation_id_with_control_characters_is_400(
    client: httpx.AsyncClient, thing_id: str
) -> None:
    # A NUL cannot be stored in the journal: refused up front, never a 5xx or a failed batch.
    await create(client, thing_id)
    r = await client.put(url(thing_id, "/attributes/a") + "?correlation-id=a%00b", json=1)
    assert_error(r, 400, "header.invalid")
    assert "correlation-id" not in r.headers
    r = await client.put(url(thing_id, "/attributes/a") + "?correlation-id=line%0Abreak", json=1)
    assert_error(r, 400, "header.invalid")
    assert await revision(client, thing_id) == 1


async def test_long_correlation_id_is_echoed(client: httpx.AsyncClient, thing_id: str) -> None:
    cid = "x" * 2000
    r = await client.put(url(thing_id), json={}, headers={"correlation-id": cid})
    assert r.status_code == 201
    assert r.headers["correlation-id"] == cid
