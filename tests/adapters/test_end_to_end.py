"""MQTT adapter + twinstore end to end (real Mosquitto, NATS, PostgreSQL): a value published by a
device is the twin's property within 1 s, and a desired property set through the HTTP API
reaches the device, whose confirmation updates ``properties``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from tests.adapters.conftest import MqttPeer
from tests.adapters.test_mqtt import running
from tests.adapters.test_sparkplug import wait_for_consumer
from tests.conftest import new_thing_id
from twinstore.runtime import Runtime
from twinstore.settings import Settings


async def test_device_value_reaches_the_twin_within_a_second_and_desired_values_reach_the_device(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    mqtt_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    thing_id = new_thing_id("org.mqtt")
    namespace, name = thing_id.split(":")
    r = await client.put(
        f"/api/2/things/{thing_id}", json={"features": {"valve": {"properties": {"open": False}}}}
    )
    assert r.status_code == 201
    config = {
        "nats_url": settings.nats_url,
        "nats_prefix": settings.nats_prefix,
        "partitions": settings.partitions,
        "source": "ditto-user",  # writes as nginx:ditto (tests/conftest.py INGEST_SOURCES)
        "spool_dir": str(tmp_path / "spool"),
        "mqtt": {"url": mqtt_url, "client_id": f"adapter-{prefix}", "session_expiry": 5},
        "mappings": [
            {
                "topic": f"{prefix}/{{namespace}}/{{thing}}/{{feature}}/{{property}}",
                "value": "/value",
                "timestamp": "/ts",
                "command_topic": f"{prefix}/{{namespace}}/{{thing}}/{{feature}}/{{property}}/set",
            }
        ],
    }
    property_url = f"/api/2/things/{thing_id}/features/valve/properties/flow"

    async def wait_for(url: str, expected: object, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            r = await client.get(url)
            if r.status_code == 200 and r.json() == expected:
                return time.monotonic() - start
            await asyncio.sleep(0.01)
        raise AssertionError(f"{url} did not become {expected!r} within {timeout} s (last: {r.text})")

    async with running(config):
        await wait_for_consumer(runtime.nc, runtime.subjects, "adapter-ditto-user")
        with MqttPeer(mqtt_url) as device:
            device.subscribe(f"{prefix}/{namespace}/{name}/+/+/set")
            await asyncio.to_thread(
                device.publish, f"{prefix}/{namespace}/{name}/valve/flow", json.dumps({"value": 3.5})
            )
            assert await wait_for(property_url, 3.5, 5) < 1.0
            # later values too, each within 1 s of its publish
            for value in (4.0, 4.5):
                await asyncio.to_thread(
                    device.publish, f"{prefix}/{namespace}/{name}/valve/flow", json.dumps({"value": value})
                )
                assert await wait_for(property_url, value, 5) < 1.0
            # desired (HTTP API) -> relay -> adapter -> MQTT command topic
            r = await client.put(f"/api/2/things/{thing_id}/features/valve/desiredProperties/open", json=True)
            assert r.status_code in (201, 204)
            topic, payload = await device.next(timeout=5)
            assert topic == f"{prefix}/{namespace}/{name}/valve/open/set"
            assert json.loads(payload) is True
            # the device confirms with a normal value: properties follow
            await asyncio.to_thread(
                device.publish, f"{prefix}/{namespace}/{name}/valve/open", json.dumps({"value": True})
            )
            await wait_for(f"/api/2/things/{thing_id}/features/valve/properties/open", True, 5)


async def test_a_device_value_for_a_feature_the_twin_lacks_creates_the_feature(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    mqtt_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    """Telemetry merges as Ditto's merge does: a thing created with ``{"features": {}}`` gets the
    feature of the first value an adapter sends for it (no 404 on the errors stream)."""
    thing_id = new_thing_id("org.mqtt")
    namespace, name = thing_id.split(":")
    assert (await client.put(f"/api/2/things/{thing_id}", json={"features": {}})).status_code == 201
    config = {
        "nats_url": settings.nats_url,
        "nats_prefix": settings.nats_prefix,
        "partitions": settings.partitions,
        "source": "ditto-user",
        "spool_dir": str(tmp_path / "spool"),
        "mqtt": {"url": mqtt_url, "client_id": f"adapter-new-{prefix}", "session_expiry": 5},
        "mappings": [
            {"topic": f"{prefix}/{{namespace}}/{{thing}}/{{feature}}/{{property}}", "value": "/value"}
        ],
    }
    async with running(config):
        await wait_for_consumer(runtime.nc, runtime.subjects, "adapter-ditto-user")
        with MqttPeer(mqtt_url) as device:
            await asyncio.to_thread(
                device.publish,
                f"{prefix}/{namespace}/{name}/connectivity/status",
                json.dumps({"value": "online"}),
            )
            deadline = time.monotonic() + 10
            while True:
                r = await client.get(f"/api/2/things/{thing_id}/features/connectivity")
                if r.status_code == 200:
                    assert r.json() == {"properties": {"status": "online"}}
                    break
                assert time.monotonic() < deadline, r.text
                await asyncio.sleep(0.05)
