"""The MQTT adapter against the machine's Mosquitto and NATS: topics mapped to telemetry rows on
the ingest stream, batching, MQTT 3.1.1 and 5, and desired values published as commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from adapters.base import ConfigError, forwarder_from_config
from adapters.mqtt import MqttAdapter
from tests.adapters.conftest import MqttPeer, read_stream
from tests.conftest import bounded, cancel_and_wait
from twinstore.bus.ingest import SEQ_HEADER, SOURCE_HEADER, IngestSubjects, Update, decode_telemetry
from twinstore.bus.relay import ensure_events_stream
from twinstore.bus.subjects import Subjects


def adapter_config(prefix: str, nats_url: str, mqtt_url: str, tmp: Path, **extra: Any) -> dict[str, Any]:
    mqtt = {"url": mqtt_url, "client_id": f"adapter-{prefix}", "session_expiry": 5, **extra.pop("mqtt", {})}
    return {
        "nats_url": nats_url,
        "nats_prefix": prefix,
        "partitions": 4,
        "source": f"mqtt-{prefix}",
        "spool_dir": str(tmp / "spool"),
        "mqtt": mqtt,
        **extra,
    }


@contextlib.asynccontextmanager
async def running(config: dict[str, Any]) -> AsyncIterator[MqttAdapter]:
    forwarder = forwarder_from_config(config, "mqtt")
    adapter = MqttAdapter(config, forwarder)
    await forwarder.start()
    task = asyncio.create_task(adapter.run())
    try:
        await asyncio.wait_for(adapter.subscribed.wait(), 10)
        yield adapter
    finally:
        try:
            await cancel_and_wait(task, timeout=15)
        finally:
            await bounded(forwarder.stop(), 15, "stopping the forwarder")


async def rows_on_stream(
    nc: NATS, subjects: IngestSubjects, expect: int, timeout: float = 10
) -> list[Update]:
    deadline = time.monotonic() + timeout
    while True:
        messages = await read_stream(nc, subjects.stream, 0)
        rows = [u for m in messages for u in decode_telemetry(m.data)]
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_placeholder_topics_become_rows_with_value_timestamp_and_quality(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    mapping = {
        "topic": f"{prefix}/{{namespace}}/{{thing}}/{{feature}}/{{property}}",
        "value": "/value",
        "timestamp": "/ts",
        "quality": "/q",
    }
    config = adapter_config(prefix, nats_url, mqtt_url, tmp_path, mappings=[mapping])
    async with running(config) as adapter:
        with MqttPeer(mqtt_url) as device:
            device.publish(
                f"{prefix}/org.acme/pump-1/temp/value", json.dumps({"value": 21.5, "ts": 1700000000123})
            )
            device.publish(
                f"{prefix}/org.acme/pump-2/flow/rate",
                json.dumps({"value": 3, "ts": "2024-01-02T03:04:05Z", "q": "Good"}),
            )
            device.publish(
                f"{prefix}/org.acme/pump-1/temp/value", json.dumps({"other": 1})
            )  # no /value: no row
            device.publish(f"{prefix}/org.acme/pump-1/temp/value", json.dumps({"value": 22.0}))
            rows = await rows_on_stream(nc, subjects, 3)
        assert adapter.received == 4
    # rows of different things may travel on different partitions: compare per thing
    assert sorted(rows, key=lambda r: (r.thing_id, str(r.value))) == [
        Update("org.acme:pump-1", "/features/temp/properties/value", 21.5, 1700000000123, None),
        Update("org.acme:pump-1", "/features/temp/properties/value", 22.0, None, None),
        Update("org.acme:pump-2", "/features/flow/properties/rate", 3, 1704164645000, "Good"),
    ]
    messages = await read_stream(nc, subjects.stream, 1)
    for m in messages:
        assert m.headers is not None
        assert m.headers[SOURCE_HEADER] == f"mqtt-{prefix}"
        assert m.headers["Nats-Msg-Id"] == f"mqtt-{prefix}:{m.headers[SEQ_HEADER]}"
        assert {subjects.subject(u.thing_id) for u in decode_telemetry(m.data)} == {m.subject}


async def test_fixed_thing_with_fields_over_mqtt_3_1_1_and_plain_text_payloads(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    mappings = [
        {
            "topic": f"{prefix}/line1/pump7/telemetry",
            "thing": "org.acme:pump-7",
            "feature": "telemetry",
            "fields": {"temperature": "/temp", "pressure": "/p/value"},
            "timestamp": "/ts",
        },
        {
            "topic": f"{prefix}/state/{{thing}}/{{path+}}",
            "thing": "org.acme:{thing}",
            "feature": "state",
            "property": "{path}",
        },
    ]
    mqtt = {"protocol": "3.1.1", "clean_start": True}
    config = adapter_config(prefix, nats_url, mqtt_url, tmp_path, mappings=mappings, mqtt=mqtt)
    async with running(config):
        with MqttPeer(mqtt_url, protocol=4) as device:
            device.publish(
                f"{prefix}/line1/pump7/telemetry",
                json.dumps({"temp": 80.5, "p": {"value": 2.1}, "ts": 1700000000}),
            )
            device.publish(f"{prefix}/state/m1/mode/current", "running")
            device.publish(f"{prefix}/unmapped/topic", "x")
            rows = await rows_on_stream(nc, subjects, 3)
    assert sorted(rows, key=lambda r: r.path) == [
        Update("org.acme:m1", "/features/state/properties/mode/current", "running", None, None),
        Update("org.acme:pump-7", "/features/telemetry/properties/pressure", 2.1, 1700000000000, None),
        Update("org.acme:pump-7", "/features/telemetry/properties/temperature", 80.5, 1700000000000, None),
    ]


async def test_a_burst_is_batched_into_few_messages_and_keeps_order_per_thing(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    mapping = {"topic": f"{prefix}/{{thing}}/v", "thing": "org.acme:{thing}", "feature": "f", "property": "v"}
    config = adapter_config(prefix, nats_url, mqtt_url, tmp_path, mappings=[mapping])
    async with running(config):
        with MqttPeer(mqtt_url) as device:

            def burst() -> None:
                for i in range(2000):
                    device.client.publish(f"{prefix}/t{i % 10}/v", str(i), qos=1)
                device.publish(f"{prefix}/t0/v", "2000")

            await asyncio.to_thread(burst)
            rows = await rows_on_stream(nc, subjects, 2001, timeout=30)
    assert len(rows) == 2001
    messages = await read_stream(nc, subjects.stream, 1)
    assert len(messages) < 400  # batched: far fewer NATS messages than MQTT messages
    for t in range(10):
        values = [r.value for r in rows if r.thing_id == f"org.acme:t{t}"]
        assert values == sorted(values)


async def test_a_desired_change_is_published_on_the_command_topic_and_the_confirmation_lands(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    events = Subjects(prefix, 4)
    js = nc.jetstream()
    await ensure_events_stream(js, events, 600)
    mapping = {
        "topic": f"{prefix}/{{namespace}}/{{thing}}/{{feature}}/{{property}}",
        "value": "/value",
        "command_topic": f"{prefix}/{{namespace}}/{{thing}}/{{feature}}/{{property}}/set",
        "command_value": "/value",
    }
    config = adapter_config(prefix, nats_url, mqtt_url, tmp_path, mappings=[mapping])
    try:
        async with running(config):
            deadline = time.monotonic() + 10
            while True:  # the durable consumer starts with events published after its creation
                with contextlib.suppress(Exception):
                    await js.consumer_info(events.events_stream, f"adapter-mqtt-{prefix}")
                    break
                assert time.monotonic() < deadline, "the desired-changes consumer was not created"
                await asyncio.sleep(0.05)
            with MqttPeer(mqtt_url) as device:
                device.subscribe(f"{prefix}/+/+/+/+/set")
                envelope = {
                    "topic": "org.acme/valve-1/things/twin/events/modified",
                    "path": "/features/valve/desiredProperties/open",
                    "value": True,
                    "revision": 7,
                }
                other = {**envelope, "path": "/features/valve/properties/open"}  # not desired: nothing sent
                await js.publish(events.event_subject("org.acme:valve-1"), json.dumps(other).encode())
                await js.publish(events.event_subject("org.acme:valve-1"), json.dumps(envelope).encode())
                topic, payload = await device.next()
                assert topic == f"{prefix}/org.acme/valve-1/valve/open/set"
                assert json.loads(payload) == {"value": True}
                # the device confirms on its value topic: a normal row for properties
                device.publish(f"{prefix}/org.acme/valve-1/valve/open", json.dumps({"value": True}))
                rows = await rows_on_stream(nc, subjects, 1)
                assert rows == [Update("org.acme:valve-1", "/features/valve/properties/open", True)]
                with pytest.raises(TimeoutError):
                    await device.next(timeout=0.5)  # exactly one command
    finally:
        await js.delete_stream(events.events_stream)


def test_bad_configurations_are_refused_before_anything_starts(tmp_path: Path) -> None:
    base = {"spool_dir": str(tmp_path), "source": "m"}
    forwarder = forwarder_from_config(base, "mqtt")
    for bad in (
        {},  # nothing to do
        {"mappings": [{"topic": "a/{thing}/b{x}"}]},  # a placeholder must be a whole level
        {"mappings": [{"topic": "a/{path+}/b"}]},  # {x+} only last
        {"mappings": [{"topic": "a/{thing}", "feature": "{feature}"}]},  # no {feature} in the topic
        {"mappings": [{"topic": "a/{namespace}/{thing}/{feature}/{property}", "value": "value"}]},
        {"mappings": [{"topic": "a/#"}], "mqtt": {"protocol": 6}},
        {"sparkplug": {"groups": ["g"]}},  # no namespace
    ):
        with pytest.raises(ConfigError):
            MqttAdapter({**base, **bad}, forwarder)
    with pytest.raises(ConfigError):
        forwarder_from_config({"source": "a.b"}, "mqtt")
