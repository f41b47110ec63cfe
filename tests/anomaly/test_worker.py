"""The scoring worker end to end: HTTP writes in, score, anomaly listed, WS message and NATS out;
a restart in the middle neither skips nor repeats a revision."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import nats
import pytest_asyncio

from tests.api.helpers import full_access
from tests.api.test_messages import next_message, receive_messages, text, ws
from tests.api.test_ws import OTHER, serving
from tests.conftest import bounded, cancel_and_wait, new_thing_id
from twinstore.audit import Scope, verify_database
from twinstore.export import export_database, import_database
from twinstore.replay import replay_database
from twinstore.runtime import Runtime
from twinstore.settings import Settings

DETECTOR = {"algorithm": "mahalanobis", "parameters": {"warmup": 20, "k": 1, "alpha": 1.0, "release": 1}}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def base(settings: Settings, runtime: Runtime) -> AsyncIterator[str]:
    async with serving(settings, runtime) as url:
        yield url.replace("ws://", "http://")


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def normal(i: int) -> float:
    return 20.0 + (i % 5) * 0.1


async def write(client: httpx.AsyncClient, thing_id: str, value: float) -> None:
    r = await client.put(f"/api/2/things/{thing_id}/features/f/properties/t", json=value)
    assert r.status_code == 204, r.text


async def revision_of(client: httpx.AsyncClient, thing_id: str) -> int:
    r = await client.get(f"/api/2/things/{thing_id}", params={"fields": "_revision"})
    return int(r.json()["_revision"])


async def test_outlier_becomes_an_anomaly_everywhere(
    base: str, client: httpx.AsyncClient, settings: Settings, runtime: Runtime
) -> None:
    policy_id = new_thing_id("org.policy")
    policy = full_access("nginx:ditto")
    policy["entries"]["other"] = {  # may read the thing and messages, but not feature f
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/": {"grant": ["READ"], "revoke": []},
            "message:/": {"grant": ["READ"], "revoke": []},
            "thing:/features/f": {"grant": [], "revoke": ["READ"]},
            "message:/features/f": {"grant": [], "revoke": ["READ"]},
        },
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=policy)).status_code == 201
    thing_id = new_thing_id()
    body = {"policyId": policy_id, "features": {"f": {"properties": {"t": 20.0}}, "g": {}}}
    assert (await client.put(f"/api/2/things/{thing_id}", json=body)).status_code == 201
    r = await client.put(f"/api/2/things/{thing_id}/features/f/anomaly/detector", json=DETECTOR)
    assert r.status_code == 201, r.text
    nc = await nats.connect(settings.nats_url)
    published: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_anomaly(msg: Any) -> None:
        value = json.loads(msg.data)
        if value["thingId"] == thing_id:
            await published.put(value)

    await nc.subscribe(f"{settings.nats_prefix}.anomalies.>", cb=on_anomaly)
    try:
        async with ws(base) as owner, ws(base, OTHER) as other:
            await receive_messages(owner)
            await receive_messages(other)
            for i in range(30):
                await write(client, thing_id, normal(i))
            await write(client, thing_id, 1000.0)
            outlier = await revision_of(client, thing_id)
            got = await next_message(owner, thing_id, timeout=15)
            assert got["path"] == "/features/f/outbox/messages/anomaly"
            assert got["headers"]["subject"] == "anomaly" and got["headers"]["direction"] == "FROM"
            value = got["value"]
            assert (value["thingId"], value["featureId"], value["revision"]) == (thing_id, "f", outlier)
            assert value["score"] > value["threshold"] > 0 and set(value["properties"]) == {"t"}
            on_nats = await asyncio.wait_for(published.get(), 10)
            assert on_nats["revision"] == outlier and on_nats["featureId"] == "f"
            # The latest score and the listing (written with the checkpoint, within a second).
            url = f"/api/2/things/{thing_id}/features/f/anomaly"

            async def latest() -> Any:
                r = await client.get(url)
                return r.status_code == 200 and r.json()["revision"] == outlier and r.json()

            shown = await until(latest)
            assert shown["anomalous"] is True and shown["algorithm"] == "mahalanobis"
            assert shown["score"] == value["score"] and shown["threshold"] == value["threshold"]
            listed = (await client.get(url + "/anomalies")).json()
            assert [a["revision"] for a in listed["items"]] == [outlier] and listed["cursor"] is None
            assert listed["items"][0]["properties"] == value["properties"]
            r = await client.put(f"{url}/anomalies/{outlier}/label", json="confirmed")
            assert r.status_code == 204, r.text
            item = (await client.get(url + "/anomalies")).json()["items"][0]
            assert item["label"] == "confirmed" and item["labelledBy"] == "nginx:ditto"
            r = await client.get(url + "/anomalies", params={"to": "2000-01-01T00:00:00Z"})
            assert r.json()["items"] == []
            # nginx:other may read feature g's messages but not f's: the first it gets is g's.
            r = await client.post(
                f"/api/2/things/{thing_id}/features/g/outbox/messages/canary", params={"timeout": "0"}
            )
            assert r.status_code == 202
            seen = json.loads(await text(other, 10))
            assert seen["path"] == "/features/g/outbox/messages/canary"
            async with httpx.AsyncClient(base_url=base, auth=("other", "secret")) as other_http:
                assert (await other_http.get(url)).status_code == 404
    finally:
        await nc.close()


async def test_restart_scores_every_revision_once(client: httpx.AsyncClient, runtime: Runtime) -> None:
    thing_id = new_thing_id()
    body = {"features": {"f": {"properties": {"t": 20.0}}}}
    assert (await client.put(f"/api/2/things/{thing_id}", json=body)).status_code == 201
    r = await client.put(f"/api/2/things/{thing_id}/features/f/anomaly/detector", json=DETECTOR)
    assert r.status_code == 201
    assert runtime.anomaly is not None
    await runtime.anomaly.stop()
    workers = []
    try:
        written: list[int] = []
        for round_ in range(2):
            worker = runtime.anomaly_worker(trace=True)
            workers.append(worker)
            worker.start()
            for i in range(12):
                await write(client, thing_id, normal(i + round_))
                written.append(await revision_of(client, thing_id))

            def scored() -> list[int]:
                return [r for w in workers for t, _, r in w.stats.scored_revisions if t == thing_id]

            async def caught_up() -> bool:
                return bool(scored()) and scored()[-1] == written[-1]

            await until(caught_up)
            await worker.stop()
            if round_ == 0:  # written while no worker runs: scored by the next one
                for i in range(5):
                    await write(client, thing_id, normal(i))
                    written.append(await revision_of(client, thing_id))
        revisions = [r for r in scored() if r != 1]  # the creation may or may not be scored
        assert revisions == written, (revisions, written)
        async with runtime.pool.acquire() as con:  # type: ignore[union-attr]
            saved = await con.fetchval(
                "SELECT revision FROM anomaly_state WHERE thing_id = $1 AND feature_id = 'f'", thing_id
            )
        assert saved == written[-1]
    finally:
        for worker in workers:
            await bounded(worker.stop(), 20, "stopping an anomaly worker")
        runtime.anomaly = runtime.anomaly_worker()
        runtime.anomaly.start()


async def test_false_alarm_label_is_a_journal_event_and_teaches_the_detector(
    client: httpx.AsyncClient, runtime: Runtime, settings: Settings, scratch_database: str, tmp_path: Any
) -> None:
    # A namespace of its own: the export below is of this test's thing, policy and anomaly chain,
    # not of whatever other tests of the session left in the database (retention's cleaned-up
    # things, say), which an import of the whole database would verify too.
    namespace = f"org.label{secrets.token_hex(4)}"
    thing_id = new_thing_id(namespace)
    body = {"features": {"f": {"properties": {"t": 20.0}}}}
    assert (await client.put(f"/api/2/things/{thing_id}", json=body)).status_code == 201
    r = await client.put(f"/api/2/things/{thing_id}/features/f/anomaly/detector", json=DETECTOR)
    assert r.status_code == 201
    url = f"/api/2/things/{thing_id}/features/f/anomaly"
    for i in range(30):
        await write(client, thing_id, normal(i))
    await write(client, thing_id, 60.0)
    first = await revision_of(client, thing_id)

    async def listed() -> Any:
        items = (await client.get(url + "/anomalies")).json()["items"]
        return [a for a in items if a["revision"] == first]

    before = (await until(listed))[0]["score"]
    assert runtime.anomaly is not None
    taught = runtime.anomaly.stats.taught
    r = await client.put(
        f"{url}/anomalies/{first}/label", json="false-alarm", headers={"correlation-id": "lbl-1"}
    )
    assert r.status_code == 204, r.text
    # The label is a hash-chained journal event of the entity "anomaly".
    con = await asyncpg.connect(settings.database_url)
    try:
        row = await con.fetchrow(
            "SELECT revision, action, path, value::text AS value, originator, correlation_id FROM journal "
            "WHERE entity = 'anomaly' AND id = $1",
            f"{thing_id}/f",
        )
    finally:
        await con.close()
    assert row is not None and (row["revision"], row["action"]) == (1, "labelled")
    assert row["path"] == f"/anomalies/{first}/label" and json.loads(row["value"]) == {
        "label": "false-alarm",
        "revision": first,
    }
    assert (row["originator"], row["correlation_id"]) == ("nginx:ditto", "lbl-1")
    report = await verify_database(settings.database_url, Scope(entity="anomaly"), checkpoints="none")
    assert report.ok and report.events >= 1
    # replay has nothing to fold for it (no projection) and an export -> import keeps it
    replayed = await replay_database(settings.database_url)
    assert replayed.ok, replayed.differences
    out = tmp_path / "export.ndjson"
    with out.open("wb") as fh:
        exported = await export_database(settings.database_url, fh, Scope(namespace=namespace))
    lines = out.read_bytes().splitlines()
    assert exported.entities == 3  # the thing, its policy and its anomaly chain (the label)
    imported = await import_database(scratch_database, lines)
    assert imported.audit is not None and imported.audit.ok and imported.replay is not None
    assert imported.replay.ok
    con = await asyncpg.connect(scratch_database)
    try:
        assert (
            await con.fetchval(
                "SELECT count(*) FROM journal WHERE entity = 'anomaly' AND id = $1", f"{thing_id}/f"
            )
            == 1
        )
    finally:
        await con.close()
    # The worker learns the false alarm at its next checkpoint; the same value scores lower.

    async def learnt() -> bool:
        return runtime.anomaly is not None and runtime.anomaly.stats.taught > taught

    await until(learnt)
    await write(client, thing_id, 60.0)
    again = await revision_of(client, thing_id)

    async def latest() -> Any:
        got = (await client.get(url)).json()
        return got if got.get("revision") == again else None

    assert (await until(latest))["score"] < before / 2


async def sse_events(response: httpx.Response, out: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
    """Parse a text/event-stream response into (event name, data) pairs."""
    name, data = "", ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            await out.put((name, json.loads(data)))
            name, data = "", ""


async def test_anomaly_messages_over_sse(base: str, client: httpx.AsyncClient) -> None:
    policy_id = new_thing_id("org.policy")
    policy = full_access("nginx:ditto")
    policy["entries"]["other"] = {  # may read the thing and its messages, but not feature f's
        "subjects": {"nginx:other": {"type": "test"}},
        "resources": {
            "thing:/": {"grant": ["READ"], "revoke": []},
            "message:/": {"grant": ["READ"], "revoke": []},
            "message:/features/f": {"grant": [], "revoke": ["READ"]},
        },
    }
    assert (await client.put(f"/api/2/policies/{policy_id}", json=policy)).status_code == 201
    thing_id = new_thing_id()
    body = {"policyId": policy_id, "features": {"f": {"properties": {"t": 20.0}}, "g": {}}}
    assert (await client.put(f"/api/2/things/{thing_id}", json=body)).status_code == 201
    r = await client.put(f"/api/2/things/{thing_id}/features/f/anomaly/detector", json=DETECTOR)
    assert r.status_code == 201
    boxes = f"/api/2/things/{thing_id}/features"
    sse = {"Accept": "text/event-stream"}
    queues: list[asyncio.Queue[tuple[str, dict[str, Any]]]] = [asyncio.Queue() for _ in range(3)]
    mine, theirs_f, theirs_g = queues
    async with (
        httpx.AsyncClient(base_url=base, auth=("ditto", "ditto"), timeout=30) as owner,
        httpx.AsyncClient(base_url=base, auth=("other", "secret"), timeout=30) as other,
    ):
        assert (await owner.get(f"{boxes}/f/outbox/messages/anomaly")).status_code == 406  # only streamed
        async with (
            owner.stream("GET", f"{boxes}/f/outbox/messages/anomaly", headers=sse) as r1,
            other.stream("GET", f"{boxes}/f/outbox/messages", headers=sse) as r2,
            other.stream("GET", f"{boxes}/g/outbox/messages", headers=sse) as r3,
        ):
            assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
            assert r1.headers["content-type"].startswith("text/event-stream")
            readers = [
                asyncio.create_task(sse_events(r, q)) for r, q in zip((r1, r2, r3), queues, strict=True)
            ]
            try:
                for i in range(30):
                    await write(client, thing_id, normal(i))
                await write(client, thing_id, 1000.0)
                outlier = await revision_of(client, thing_id)
                name, envelope = await asyncio.wait_for(mine.get(), 15)
                assert name == "anomaly" and envelope["path"] == "/features/f/outbox/messages/anomaly"
                assert envelope["value"]["revision"] == outlier and envelope["value"]["thingId"] == thing_id
                # nginx:other may read feature g's messages but not f's: a canary sent after the
                # anomaly reaches its g stream, while its f stream got nothing
                r = await client.post(f"{boxes}/g/outbox/messages/canary", params={"timeout": "0"})
                assert r.status_code == 202
                assert (await asyncio.wait_for(theirs_g.get(), 10))[0] == "canary"
                # an assertion of absence (the canary above proved the g stream delivers)
                await asyncio.sleep(0.2)
                assert theirs_f.empty()
            finally:
                await cancel_and_wait(*readers)
