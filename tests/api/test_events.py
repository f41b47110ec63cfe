"""Every write through the API is published to NATS JetStream as a Ditto Protocol event."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.api
import orjson
import pytest_asyncio
from nats.aio.client import Client as NATS

from tests.api.helpers import JSON_PATCH, MERGE, create, url
from twinstore.runtime import Runtime
from twinstore.settings import Settings


@pytest_asyncio.fixture(loop_scope="session")
async def nc(settings: Settings) -> AsyncIterator[NATS]:
    conn = await nats.connect(settings.nats_url)
    try:
        yield conn
    finally:
        await conn.close()


async def events_of(
    nc: NATS, runtime: Runtime, thing_id: str, count: int, timeout: float = 10.0
) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The first ``count`` envelopes (with NATS headers) of ``thing_id`` in the events stream."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        runtime.subjects.event_subject(thing_id),
        stream=runtime.subjects.events_stream,
        config=nats.js.api.ConsumerConfig(
            deliver_policy=nats.js.api.DeliverPolicy.ALL, ack_policy=nats.js.api.AckPolicy.NONE
        ),
    )
    found: list[tuple[dict[str, Any], dict[str, str]]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(batch=256, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                if len(found) >= count:
                    break
                continue
            for msg in msgs:
                headers = dict(msg.headers or {})
                if headers.get("Nats-Msg-Id", "").startswith(f"thing:{thing_id}:"):
                    found.append((orjson.loads(msg.data), headers))
    finally:
        await sub.unsubscribe()
    return found


def topic(thing_id: str, action: str) -> str:
    namespace, name = thing_id.split(":", 1)
    return f"{namespace}/{name}/things/twin/events/{action}"


async def test_writes_are_published_as_ditto_events(
    client: httpx.AsyncClient, runtime: Runtime, nc: NATS, thing_id: str
) -> None:
    cid = "events-test-correlation"
    h = {"correlation-id": cid}
    assert (await client.put(url(thing_id), json={"attributes": {"a": 1}}, headers=h)).status_code == 201
    assert (await client.put(url(thing_id, "/attributes/a"), json=2, headers=h)).status_code == 204
    assert (await client.put(url(thing_id, "/features/f"), json={}, headers=h)).status_code == 201
    r = await client.patch(
        url(thing_id, "/features/f/properties"), json={"x": 1, "y": None}, headers={**h, **MERGE}
    )
    assert r.status_code == 204
    r = await client.patch(
        url(thing_id),
        json=[{"op": "add", "path": "/attributes/list", "value": [1]}],
        headers={**h, **JSON_PATCH},
    )
    assert r.status_code == 204
    assert (await client.delete(url(thing_id, "/attributes/a"), headers=h)).status_code == 204
    assert (await client.delete(url(thing_id), headers=h)).status_code == 204

    expected = [
        ("created", "/", {"thingId": thing_id, "policyId": thing_id, "attributes": {"a": 1}}),
        ("modified", "/attributes/a", 2),
        ("created", "/features/f", {}),
        ("merged", "/features/f/properties", {"x": 1, "y": None}),
        ("created", "/attributes/list", [1]),
        ("deleted", "/attributes/a", None),
        ("deleted", "/", None),
    ]
    events = await events_of(nc, runtime, thing_id, len(expected))
    assert len(events) == len(expected), events
    for revision, ((envelope, headers), (action, path, value)) in enumerate(
        zip(events, expected, strict=True), 1
    ):
        assert headers["Nats-Msg-Id"] == f"thing:{thing_id}:{revision}"
        assert envelope["topic"] == topic(thing_id, action)
        assert envelope["path"] == path
        assert envelope["revision"] == revision
        assert envelope["headers"]["correlation-id"] == cid
        assert envelope["headers"]["ditto-originator"] == "nginx:ditto"
        assert isinstance(envelope["timestamp"], str) and envelope["timestamp"].endswith("Z")
        if action == "deleted":
            assert "value" not in envelope
        else:
            assert envelope["value"] == value


async def test_post_and_response_required_false_are_published(
    client: httpx.AsyncClient, runtime: Runtime, nc: NATS
) -> None:
    r = await client.post(
        "/api/2/things", params={"namespace": "org.published"}, json={"attributes": {"p": 1}}
    )
    assert r.status_code == 201
    thing_id = r.json()["thingId"]
    r = await client.put(url(thing_id, "/attributes/q"), json=2, params={"response-required": "false"})
    assert r.status_code == 202
    events = await events_of(nc, runtime, thing_id, 2)
    assert [(e["topic"], e["revision"]) for e, _ in events] == [
        (topic(thing_id, "created"), 1),
        (topic(thing_id, "created"), 2),
    ]
    assert events[0][0]["value"] == {"thingId": thing_id, "policyId": thing_id, "attributes": {"p": 1}}
    assert events[1][0]["path"] == "/attributes/q"


async def test_failed_writes_publish_nothing(
    client: httpx.AsyncClient, runtime: Runtime, nc: NATS, thing_id: str
) -> None:
    await create(client, thing_id)
    assert (await client.put(url(thing_id), json={}, headers={"if-match": '"rev:9"'})).status_code == 412
    assert (await client.put(url(thing_id, "/attributes"), json=1)).status_code == 400
    assert (await client.delete(url(thing_id, "/features"))).status_code == 404
    assert (await client.put(url(thing_id, "/attributes/ok"), json=1)).status_code == 201
    events = await events_of(nc, runtime, thing_id, 2, timeout=3.0)
    assert [e["revision"] for e, _ in events] == [1, 2]
    assert events[1][0]["path"] == "/attributes/ok"


async def test_thing_created_by_merge_patch_is_published_as_created(
    client: httpx.AsyncClient, runtime: Runtime, nc: NATS, thing_id: str
) -> None:
    r = await client.patch(url(thing_id), json={"attributes": {"a": 1, "b": None}}, headers=MERGE)
    assert r.status_code == 201, r.text
    [(envelope, headers)] = await events_of(nc, runtime, thing_id, 1, timeout=3.0)
    assert headers["Nats-Msg-Id"] == f"thing:{thing_id}:1"
    assert envelope["topic"] == topic(thing_id, "created")
    assert envelope["path"] == "/"
    assert envelope["value"] == {"thingId": thing_id, "policyId": thing_id, "attributes": {"a": 1}}
