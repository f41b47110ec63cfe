"""Detectors by feature definition: attached now and later, only where the rule's author may
write, replaced per feature, removed with the rule, invisible to other callers."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio
from litestar import Litestar

from tests.anomaly.test_worker import normal, until, write
from tests.api.helpers import assert_error, full_access
from tests.conftest import new_thing_id
from twinstore.runtime import Runtime

DETECTOR = {"algorithm": "mahalanobis", "parameters": {"warmup": 20, "k": 1}, "properties": ["t"]}


@pytest_asyncio.fixture(loop_scope="session")
async def other_client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://twinstore", auth=("other", "secret")
    ) as c:
        yield c


def detector_url(thing_id: str) -> str:
    return f"/api/2/things/{thing_id}/features/f/anomaly/detector"


async def thing(client: httpx.AsyncClient, definition: str | None, policy_id: str | None = None) -> str:
    thing_id = new_thing_id()
    feature: dict[str, Any] = {"properties": {"t": 20.0}}
    if definition is not None:
        feature["definition"] = [definition]
    body: dict[str, Any] = {"features": {"f": feature}}
    if policy_id is not None:
        body["policyId"] = policy_id
    r = await client.put(f"/api/2/things/{thing_id}", json=body)
    assert r.status_code == 201, r.text
    return thing_id


async def test_rule_attaches_where_the_author_may_write(
    client: httpx.AsyncClient, other_client: httpx.AsyncClient, runtime: Runtime
) -> None:
    definition = f"org.acme:pump-{secrets.token_hex(4)}:1.0.0"
    url = f"/api/2/anomaly/definitions/{definition}"
    before = await thing(client, definition)
    unrelated = await thing(client, "org.acme:valve:1.0.0")
    # readable by nginx:ditto but not writable: the rule must not attach there
    policy_id = new_thing_id("org.policy")
    policy = full_access("nginx:other")
    policy["entries"]["ditto"] = {
        "subjects": {"nginx:ditto": {"type": "test"}},
        "resources": {"thing:/": {"grant": ["READ"], "revoke": []}},
    }
    assert (await other_client.put(f"/api/2/policies/{policy_id}", json=policy)).status_code == 201
    r = await other_client.put(
        f"/api/2/things/{new_thing_id()}",
        json={"policyId": policy_id, "features": {"f": {"definition": [definition], "properties": {"t": 1}}}},
    )
    assert r.status_code == 201, r.text
    read_only = r.headers["location"].rsplit("/", 1)[-1]

    assert_error(await client.get(url), 404, "things:anomaly.rule.notfound")
    assert_error(await client.put(url, json={"algorithm": "magic"}), 400, "things:anomaly.detector.invalid")
    r = await client.put(url, json=DETECTOR)
    assert r.status_code == 201, r.text
    assert r.headers["twinstore-attached"] == "1"
    assert r.json()["definition"] == definition and r.json()["detector"]["algorithm"] == "mahalanobis"
    assert (await client.get(detector_url(before))).json()["properties"] == ["t"]
    assert (await client.get(detector_url(unrelated))).status_code == 404
    assert (await client.get(detector_url(read_only))).status_code == 404
    # another caller neither sees nor changes the rule
    assert_error(await other_client.get(url), 404, "things:anomaly.rule.notfound")
    assert_error(await other_client.delete(url), 404, "things:anomaly.rule.notfound")
    assert definition not in [
        i["definition"] for i in (await other_client.get("/api/2/anomaly/definitions")).json()["items"]
    ]
    assert definition in [
        i["definition"] for i in (await client.get("/api/2/anomaly/definitions")).json()["items"]
    ]

    # a thing that gets the definition later: the scoring worker attaches and scores it
    later = await thing(client, definition)

    async def attached() -> bool:
        return (await client.get(detector_url(later))).status_code == 200

    await until(attached)
    for i in range(25):
        await write(client, later, normal(i))

    async def scored() -> Any:
        r = await client.get(f"/api/2/things/{later}/features/f/anomaly")
        return r.status_code == 200 and r.json()["revision"] >= 20

    await until(scored)
    assert (await client.get(url)).json()["attached"] == 2
    # a feature's own detector replaces the rule's; deleting the rule leaves it
    own = {"algorithm": "one-class-svm"}
    assert (await client.put(detector_url(before), json=own)).status_code == 204
    assert (await client.delete(url)).status_code == 204
    assert (await client.get(detector_url(before))).json()["algorithm"] == "one-class-svm"
    assert (await client.get(detector_url(later))).status_code == 404
    assert_error(await client.get(url), 404, "things:anomaly.rule.notfound")
