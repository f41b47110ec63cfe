"""The anomaly REST resources under a feature: detector put/get/delete, permissions, validation."""

from __future__ import annotations

from typing import Any

import httpx
from litestar import Litestar

from tests.api.helpers import assert_error, full_access
from tests.conftest import new_thing_id

DETECTOR = {"algorithm": "mahalanobis", "parameters": {"warmup": 20, "k": 1}, "properties": ["t"]}


def detector_url(thing_id: str, feature: str = "f") -> str:
    return f"/api/2/things/{thing_id}/features/{feature}/anomaly/detector"


async def make_thing(client: httpx.AsyncClient, thing_id: str, body: dict[str, Any] | None = None) -> None:
    r = await client.put(
        f"/api/2/things/{thing_id}", json=body or {"features": {"f": {"properties": {"t": 1}}}}
    )
    assert r.status_code == 201, r.text


async def test_detector_put_get_delete(client: httpx.AsyncClient, thing_id: str) -> None:
    await make_thing(client, thing_id)
    assert_error(await client.get(detector_url(thing_id)), 404, "things:anomaly.detector.notfound")
    assert_error(
        await client.get(f"/api/2/things/{thing_id}/features/f/anomaly"), 404, "things:anomaly.notfound"
    )
    r = await client.put(detector_url(thing_id), json=DETECTOR)
    assert r.status_code == 201, r.text
    shown = {**DETECTOR, "feedback": True}  # false-alarm labels teach the detector unless false
    assert r.json() == shown and r.headers["location"].endswith(detector_url(thing_id))
    r = await client.get(detector_url(thing_id))
    assert r.status_code == 200 and r.json() == shown
    replaced = {"algorithm": "half-space-trees", "parameters": {"seed": 3}, "feedback": False}
    r = await client.put(detector_url(thing_id), json=replaced)
    assert r.status_code == 204, r.text
    assert (await client.get(detector_url(thing_id))).json() == replaced
    r = await client.get(f"/api/2/things/{thing_id}/features/f/anomaly/anomalies")
    assert r.status_code == 200 and r.json() == {"items": [], "cursor": None}
    assert (await client.delete(detector_url(thing_id))).status_code == 204
    assert_error(await client.get(detector_url(thing_id)), 404, "things:anomaly.detector.notfound")
    assert_error(await client.delete(detector_url(thing_id)), 404, "things:anomaly.detector.notfound")


async def test_detector_validation(client: httpx.AsyncClient, thing_id: str) -> None:
    await make_thing(client, thing_id)
    for bad in (
        {"algorithm": "magic"},
        {"algorithm": "mahalanobis", "parameters": {"colour": 1}},
        {"algorithm": "mahalanobis", "parameters": {"warmup": -3}},
        {"algorithm": "mahalanobis", "parameters": {"q": "high"}},
        {"algorithm": "mahalanobis", "properties": []},
        {"algorithm": "mahalanobis", "extra": 1},
        {"algorithm": "mahalanobis", "feedback": "yes"},
        ["mahalanobis"],
    ):
        body = assert_error(
            await client.put(detector_url(thing_id), json=bad), 400, "things:anomaly.detector.invalid"
        )
        assert body["error"] == "things:anomaly.detector.invalid", body
    assert_error(
        await client.put(detector_url(thing_id), content=b"{", headers={"content-type": "application/json"}),
        400,
        "json.invalid",
    )
    # A feature that does not exist, a thing that does not exist.
    assert_error(
        await client.put(detector_url(thing_id, "nope"), json=DETECTOR), 404, "things:feature.notfound"
    )
    assert_error(await client.put(detector_url(new_thing_id()), json=DETECTOR), 404, "things:thing.notfound")
    r = await client.get(f"/api/2/things/{thing_id}/features/f/anomaly/anomalies", params={"size": "0"})
    assert_error(r, 400, "things:request.invalid")
    r = await client.get(
        f"/api/2/things/{thing_id}/features/f/anomaly/anomalies", params={"from": "yesterday"}
    )
    assert_error(r, 400, "things:request.invalid")
    r = await client.get(f"/api/2/things/{thing_id}/features/f/anomaly/anomalies", params={"cursor": "zz"})
    assert_error(r, 400, "things:request.invalid")
    r = await client.put(f"/api/2/things/{thing_id}/features/f/anomaly/anomalies/3/label", json="maybe")
    assert_error(r, 400, "things:anomaly.label.invalid")
    r = await client.put(f"/api/2/things/{thing_id}/features/f/anomaly/anomalies/3/label", json="confirmed")
    assert_error(r, 404, "things:anomaly.notfound")


async def test_permissions(client: httpx.AsyncClient, app: Litestar) -> None:
    """READ on the feature to get, WRITE to put or delete; unreadable looks absent (404)."""
    policy_id = new_thing_id("org.policy")
    policy = full_access("nginx:ditto")
    policy["entries"]["other"] = {
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/": {"grant": ["READ"], "revoke": []},
            "thing:/features/secret": {"grant": [], "revoke": ["READ"]},
        },
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=policy)).status_code == 201
    shared, private = new_thing_id(), new_thing_id()
    features = {"f": {"properties": {"t": 1}}, "secret": {"properties": {"t": 2}}}
    await make_thing(client, shared, {"policyId": policy_id, "features": features})
    await make_thing(client, private)
    for thing_id, feature in ((shared, "f"), (shared, "secret"), (private, "f")):
        assert (await client.put(detector_url(thing_id, feature), json=DETECTOR)).status_code == 201
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://twinstore", auth=("other", "secret")
    ) as other:
        r = await other.get(detector_url(shared))
        assert r.status_code == 200 and r.json() == {**DETECTOR, "feedback": True}
        assert_error(
            await other.put(detector_url(shared), json=DETECTOR), 403, "things:feature.notmodifiable"
        )
        assert_error(await other.delete(detector_url(shared)), 403, "things:feature.notmodifiable")
        r = await other.put(f"/api/2/things/{shared}/features/f/anomaly/anomalies/1/label", json="confirmed")
        assert_error(r, 403, "things:feature.notmodifiable")
        assert_error(await other.get(detector_url(shared, "secret")), 404, "things:feature.notfound")
        assert_error(
            await other.get(f"/api/2/things/{shared}/features/secret/anomaly/anomalies"),
            404,
            "things:feature.notfound",
        )
        assert_error(await other.get(detector_url(private)), 404, "things:thing.notfound")
        assert_error(await other.delete(detector_url(private)), 404, "things:thing.notfound")
    assert (await client.get(detector_url(shared))).status_code == 200  # still there


async def test_routes_are_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/api/2/openapi/openapi.json")).json()["paths"]
    base = "/api/2/things/{thingId}/features/{featureId}/anomaly"
    assert set(paths[base + "/detector"]) >= {"put", "get", "delete"}
    assert "get" in paths[base] and "get" in paths[base + "/anomalies"]
    assert "put" in paths[base + "/anomalies/{revision}/label"]
