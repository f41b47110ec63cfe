"""History of a re-created id, and the oracles of issue 15 item 5, against a real server.

History: a thing's *life* (its revisions from a creation up to the deletion that ends it) is
judged by the policy that life had last (twinstore.service.HistoryAccess); a caller reads an
earlier life only if that policy lets them, and only while that policy is still the one it was
when the life ended. Checked over ``at-historical-revision`` / ``-timestamp``, SSE history and
the WebSocket's persisted-event streaming.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from datetime import datetime
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.api.helpers import assert_error, full_access, url
from tests.api.test_history_ws import drain, failure
from tests.conftest import ServerProcess, new_thing_id
from tests.security.conftest import USERS
from twinstore.runtime import Runtime
from twinstore.settings import Settings

SSE = {"accept": "text/event-stream"}
NOT_FOUND = "things:thing.notfound"
HISTORY_NOT_FOUND = "things:thing.history.notfound"
SECRET = "A-secret-" + secrets.token_hex(4)


def ws_headers(user: str) -> dict[str, str]:
    name, password = USERS[user]
    return {"authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


def ws_url(live: dict[str, Any]) -> str:
    return str(live["ditto"].base_url).replace("http://", "ws://").rstrip("/") + "/ws/2"


async def sse_history(
    client: httpx.AsyncClient, thing_id: str, params: dict[str, str]
) -> list[dict[str, Any]]:
    """Every event of an SSE history stream (``revision``: its id, ``data``) until the server ends it."""

    async def read() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with client.stream("GET", url(thing_id), params=params, headers=SSE) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("id:"):
                    got.append({"revision": int(line.removeprefix("id:").strip())})
                elif line.startswith("data:"):
                    got[-1]["data"] = json.loads(line.removeprefix("data:").strip())
        return got

    return await asyncio.wait_for(read(), 20)


async def sse_error(client: httpx.AsyncClient, thing_id: str, params: dict[str, str]) -> httpx.Response:
    return await asyncio.wait_for(client.get(url(thing_id), params=params, headers=SSE), 20)


async def at_revision(client: httpx.AsyncClient, thing_id: str, revision: int) -> httpx.Response:
    return await client.get(url(thing_id), headers={"at-historical-revision": str(revision)})


async def policy(client: httpx.AsyncClient, policy_id: str, *subjects: str) -> None:
    r = await client.put(f"/api/2/policies/{policy_id}", json=full_access(*subjects))
    assert r.status_code == 201, r.text


async def first_life(ditto: httpx.AsyncClient, thing_id: str, policy_id: str | None = None) -> datetime:
    """ditto's thing: revisions 1 and 2 hold the secret, 3 deletes it; the time of revision 2."""
    body: dict[str, Any] = {"attributes": {"secret": SECRET}}
    if policy_id is not None:
        body["policyId"] = policy_id
    r = await ditto.put(url(thing_id), json=body)
    assert r.status_code == 201, r.text
    assert (await ditto.put(url(thing_id, "/attributes/more"), json=SECRET)).status_code == 201
    r = await at_revision(ditto, thing_id, 2)
    assert r.status_code == 200, r.text
    when = datetime.fromisoformat(r.headers["at-historical-timestamp"])
    assert (await ditto.delete(url(thing_id))).status_code == 204
    return when


async def test_a_recreated_id_does_not_open_the_earlier_life(live: dict[str, Any]) -> None:
    ditto, other, eve = live["ditto"], live["other"], live["eve"]
    thing_id = new_thing_id()
    when = await first_life(ditto, thing_id)  # revisions 1..3, under ditto's implicit policy
    policy_id = new_thing_id("org.other")
    await policy(other, policy_id, "nginx:other")
    r = await other.put(url(thing_id), json={"policyId": policy_id, "attributes": {"mine": 1}})
    assert r.status_code == 201, r.text  # revision 4
    assert (await other.put(url(thing_id, "/attributes/mine"), json=2)).status_code == 204  # 5

    # HTTP: the newcomer reads its own life only; the earlier one is outside its history
    for revision in (1, 2, 3):
        assert_error(await at_revision(other, thing_id, revision), 404, HISTORY_NOT_FOUND)
    r = await at_revision(other, thing_id, 4)
    assert r.status_code == 200 and r.json()["attributes"] == {"mine": 1}, r.text
    stamp = {"at-historical-timestamp": when.isoformat()}
    assert_error(await other.get(url(thing_id), headers=stamp), 404, HISTORY_NOT_FOUND)
    # the earlier life's owner still reads it (its policy is unchanged), not the newcomer's
    r = await at_revision(ditto, thing_id, 2)
    assert r.status_code == 200 and r.json()["attributes"]["more"] == SECRET
    assert (await ditto.get(url(thing_id), headers=stamp)).json()["attributes"]["secret"] == SECRET
    assert_error(await at_revision(ditto, thing_id, 4), 404, HISTORY_NOT_FOUND)
    # someone who may read no life at all: as for a thing that never existed
    assert_error(await at_revision(eve, thing_id, 1), 404, NOT_FOUND)
    assert_error(await at_revision(eve, thing_id, 4), 404, NOT_FOUND)
    assert_error(await eve.get(url(thing_id), headers=stamp), 404, NOT_FOUND)

    # SSE history streams, from the start and crossing the deletion
    for params in ({"from-historical-revision": "0"}, {"from-historical-revision": "2"}):
        got = await sse_history(other, thing_id, params)
        assert [e["revision"] for e in got] == [4, 5], got
        assert SECRET not in json.dumps(got)
    timed = await sse_history(other, thing_id, {"from-historical-timestamp": "2000-01-01T00:00:00Z"})
    assert [e["revision"] for e in timed] == [4, 5] and SECRET not in json.dumps(timed)
    mine = await sse_history(ditto, thing_id, {"from-historical-revision": "0"})
    assert [e["revision"] for e in mine] == [1, 2]
    assert_error(await sse_error(eve, thing_id, {"from-historical-revision": "0"}), 404, NOT_FOUND)

    # WebSocket persisted events
    async with connect(ws_url(live), additional_headers=ws_headers("other")) as ws:
        got = await drain(ws, thing_id)
        assert [i["revision"] for i in got] == [4, 5] and SECRET not in json.dumps(got)
        got = await drain(ws, thing_id, {"fromHistoricalRevision": 1, "toHistoricalRevision": 4})
        assert [i["revision"] for i in got] == [4]
    async with connect(ws_url(live), additional_headers=ws_headers("ditto")) as ws:
        assert [i["revision"] for i in await drain(ws, thing_id)] == [1, 2]
    async with connect(ws_url(live), additional_headers=ws_headers("eve")) as ws:
        assert (await failure(ws, thing_id))["error"] == NOT_FOUND

    # Within one life the policy it has last judges every revision (decision): ditto moves its
    # new thing to a policy that lets eve read, and eve reads the revisions before the move too.
    moved = new_thing_id()
    r = await ditto.put(url(moved), json={"attributes": {"early": 1}})
    assert r.status_code == 201
    shared = new_thing_id("org.shared")
    await policy(ditto, shared, "nginx:ditto", "nginx:eve")
    assert (await ditto.put(url(moved, "/policyId"), json=shared)).status_code == 204
    r = await at_revision(eve, moved, 1)
    assert r.status_code == 200 and r.json()["attributes"] == {"early": 1}
    assert_error(await at_revision(other, moved, 1), 404, NOT_FOUND)


async def test_a_recreated_policy_does_not_open_an_ended_life(live: dict[str, Any]) -> None:
    """ditto's thing under ditto's policy P is deleted, then P; other creates P (anyone may create
    a policy that does not exist). P's new life never governed the thing: nobody reads it through P."""
    ditto, other = live["ditto"], live["other"]
    policy_id = new_thing_id("org.p")
    await policy(ditto, policy_id, "nginx:ditto")
    thing_id = new_thing_id()
    when = await first_life(ditto, thing_id, policy_id)
    assert (await at_revision(ditto, thing_id, 1)).status_code == 200  # the owner reads it, deleted
    assert (await ditto.delete(f"/api/2/policies/{policy_id}")).status_code == 204
    await policy(other, policy_id, "nginx:other")

    for client in (other, ditto):
        assert_error(await at_revision(client, thing_id, 1), 404, NOT_FOUND)
        stamp = {"at-historical-timestamp": when.isoformat()}
        assert_error(await client.get(url(thing_id), headers=stamp), 404, NOT_FOUND)
        assert_error(await sse_error(client, thing_id, {"from-historical-revision": "0"}), 404, NOT_FOUND)
    async with connect(ws_url(live), additional_headers=ws_headers("other")) as ws:
        assert (await failure(ws, thing_id))["error"] == NOT_FOUND

    # the newcomer re-creates the thing under its P: its own life only
    r = await other.put(url(thing_id), json={"policyId": policy_id, "attributes": {"mine": 1}})
    assert r.status_code == 201, r.text  # revision 4
    assert_error(await at_revision(other, thing_id, 1), 404, HISTORY_NOT_FOUND)
    got = await sse_history(other, thing_id, {"from-historical-revision": "0"})
    assert [e["revision"] for e in got] == [4] and SECRET not in json.dumps(got)
    async with connect(ws_url(live), additional_headers=ws_headers("other")) as ws:
        got = await drain(ws, thing_id)
        assert [i["revision"] for i in got] == [4] and SECRET not in json.dumps(got)


# ---- oracles (issue 15 item 5) -------------------------------------------------------------


async def check(client: httpx.AsyncClient, checks: dict[str, tuple[str, str, list[str]]]) -> dict[str, bool]:
    body = {k: {"resource": r, "entityId": e, "hasPermissions": p} for k, (r, e, p) in checks.items()}
    r = await client.post("/api/2/checkPermissions", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, bool] = r.json()
    return answer


async def test_check_permissions_tells_nothing_about_unseen_entities(live: dict[str, Any]) -> None:
    ditto, eve = live["ditto"], live["eve"]
    hidden = new_thing_id()
    assert (await ditto.put(url(hidden), json={"attributes": {"a": 1}})).status_code == 201
    missing = new_thing_id()
    checks = {
        "thing": ("thing:/", hidden, []),
        "missing-thing": ("thing:/", missing, []),
        "policy": ("policy:/", hidden, []),  # the thing's implicit policy has the thing's id
        "missing-policy": ("policy:/", missing, []),
        "message": ("message:/", hidden, []),
    }
    # eve holds no permission on ditto's thing: exactly the answers of missing entities
    assert await check(eve, checks) == dict.fromkeys(checks, False)
    answers = await check(ditto, checks)
    assert answers == {
        "thing": True,
        "missing-thing": False,
        "policy": True,
        "missing-policy": False,
        "message": True,
    }
    # a caller with some permission on the entity still gets real answers
    shared = new_thing_id()
    doc = full_access("nginx:ditto")
    doc["entries"]["eve"] = {
        "subjects": {"nginx:eve": {"type": "test"}},
        "resources": {"thing:/attributes/public": {"grant": ["READ"], "revoke": []}},
    }
    assert (
        await ditto.put(url(shared), json={"_policy": doc, "attributes": {"public": 1}})
    ).status_code == 201
    assert await check(
        eve,
        {
            "any": ("thing:/", shared, []),
            "read-all": ("thing:/", shared, ["READ"]),
            "read-public": ("thing:/attributes/public", shared, ["READ"]),
        },
    ) == {"any": True, "read-all": False, "read-public": True}


DETECTOR = {"algorithm": "mahalanobis", "parameters": {"warmup": 20, "k": 1}, "properties": ["t"]}


async def test_an_anomaly_rule_does_not_reserve_its_definition(live: dict[str, Any]) -> None:
    ditto, eve = live["ditto"], live["eve"]
    definition = f"org.acme:pump-{secrets.token_hex(4)}:1.0.0"
    rule = f"/api/2/anomaly/definitions/{definition}"
    thing_id = new_thing_id()
    body = {"features": {"f": {"definition": [definition], "properties": {"t": 1.0}}}}
    assert (await ditto.put(url(thing_id), json=body)).status_code == 201

    r = await eve.put(rule, json=DETECTOR)  # eve is first, and may write no feature of it
    assert r.status_code == 201 and r.headers["twinstore-attached"] == "0", r.text
    assert_error(await ditto.get(rule), 404, "things:anomaly.rule.notfound")
    mine = {**DETECTOR, "parameters": {"warmup": 30, "k": 2}}
    r = await ditto.put(rule, json=mine)
    assert r.status_code == 201 and r.headers["twinstore-attached"] == "1", r.text
    assert (await ditto.put(rule, json=mine)).status_code == 204  # the owner's rule, replaced
    got = (await ditto.get(rule)).json()
    assert got["detector"]["parameters"]["warmup"] == 30 and got["attached"] == 1
    got = (await eve.get(rule)).json()
    assert got["detector"]["parameters"]["warmup"] == 20 and got["attached"] == 0
    for client in (ditto, eve):
        items = (await client.get("/api/2/anomaly/definitions")).json()["items"]
        assert [i["definition"] for i in items].count(definition) == 1
    assert (await ditto.get(url(thing_id, "/features/f/anomaly/detector"))).json()["parameters"]["k"] == 2
    # each deletes only its own
    assert (await eve.delete(rule)).status_code == 204
    assert_error(await eve.get(rule), 404, "things:anomaly.rule.notfound")
    assert (await ditto.get(rule)).status_code == 200
    assert (await ditto.get(url(thing_id, "/features/f/anomaly/detector"))).status_code == 200
    assert (await ditto.delete(rule)).status_code == 204
    assert (await ditto.get(url(thing_id, "/features/f/anomaly/detector"))).status_code == 404


async def test_a_message_stream_of_an_unseen_thing_is_404_at_once(live: dict[str, Any]) -> None:
    ditto, eve = live["ditto"], live["eve"]
    hidden = new_thing_id()
    assert (await ditto.put(url(hidden), json={"features": {"f": {}}})).status_code == 201
    missing = new_thing_id()
    for thing_id in (hidden, missing):
        for path in ("/inbox/messages", "/outbox/messages/ask", "/features/f/outbox/messages"):
            r = await asyncio.wait_for(eve.get(url(thing_id, path), headers=SSE), 10)
            assert_error(r, 404, NOT_FOUND)

    # the owner gets its stream
    async def opened() -> httpx.Response:
        async with ditto.stream("GET", url(hidden, "/inbox/messages"), headers=SSE) as r:
            return r

    r = await asyncio.wait_for(opened(), 10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")


async def test_a_policy_in_use_is_not_deleted_unless_allowed(
    live: dict[str, Any], settings: Settings, runtime: Runtime
) -> None:
    ditto, eve = live["ditto"], live["eve"]
    # default (policy_delete_in_use = "refuse"): 409 while a thing uses it, 204 once none does
    policy_id = new_thing_id("org.p")
    await policy(ditto, policy_id, "nginx:ditto")
    thing_id = new_thing_id()
    assert (await ditto.put(url(thing_id), json={"policyId": policy_id})).status_code == 201
    assert_error(await ditto.delete(f"/api/2/policies/{policy_id}"), 409, "policies:policy.notdeletable")
    assert (await ditto.get(url(thing_id))).status_code == 200
    # someone who may not delete it learns nothing about its use
    assert_error(await eve.delete(f"/api/2/policies/{policy_id}"), 404, "policies:policy.notfound")
    assert (await ditto.delete(url(thing_id))).status_code == 204
    assert (await ditto.delete(f"/api/2/policies/{policy_id}")).status_code == 204

    # "allow" (Ditto's behaviour): deleted, and whoever creates the id next gets the thing
    server = ServerProcess(settings, TWINSTORE_POLICY_DELETE_IN_USE="allow")
    await asyncio.to_thread(server.start)
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, auth=USERS["ditto"], timeout=30) as owner,
            httpx.AsyncClient(base_url=server.url, auth=USERS["eve"], timeout=30) as newcomer,
        ):
            policy_id = new_thing_id("org.p")
            await policy(owner, policy_id, "nginx:ditto")
            thing_id = new_thing_id()
            assert (await owner.put(url(thing_id), json={"policyId": policy_id})).status_code == 201
            assert (await owner.delete(f"/api/2/policies/{policy_id}")).status_code == 204
            assert_error(await owner.get(url(thing_id)), 404, NOT_FOUND)
            await policy(newcomer, policy_id, "nginx:eve")
            assert (await newcomer.get(url(thing_id))).status_code == 200
    finally:
        await asyncio.to_thread(server.stop)
