"""Hostile or broken device input at the adapters, and messages NATS refuses for good (issue 15
items 6 and 14), through the machine's Mosquitto and NATS and a real OPC UA server: each bad
message or row is dropped, logged and counted, and a good one sent right after it lands. A
message NATS can never take leaves the spool instead of stalling everything behind it; errors
that may pass (no stream answering) are still retried."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.js.api
import pytest
from asyncua import ua
from nats.aio.client import Client as NATS

from adapters import limits, opcua
from adapters.base import ConfigError, Forwarder, forwarder_from_config
from adapters.mqtt import MqttAdapter
from adapters.sparkplug.host import DataType, metric, payload
from adapters.spool import Spool
from tests.adapters.conftest import MqttPeer, read_stream
from tests.adapters.test_mqtt import adapter_config, rows_on_stream, running
from tests.adapters.test_opcua import Plc, Received
from tests.conftest import bounded, cancel_and_wait, free_port
from twinstore.bus.ingest import IngestSubjects, Update, decode_telemetry, header_bytes, telemetry_messages

GOOD = Update("org.acme:good", "/features/f/properties/v", 1)


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        await asyncio.sleep(0.02)


# ---- the forwarder: messages NATS refuses for good ---------------------------------------------


async def spooled(directory: Path, subjects: IngestSubjects, payloads: list[bytes]) -> None:
    """A spool (as a previous run left it) holding telemetry messages with these payloads, in
    order, then one with the GOOD row."""
    spool = Spool(directory, 100_000_000)
    try:
        good = telemetry_messages(subjects, "hostile", 1 + len(payloads), [GOOD])
        bad = [
            msg.__class__(msg.subject, msg.headers, body)
            for seq, body in enumerate(payloads, 1)
            for msg in telemetry_messages(subjects, "hostile", seq, [GOOD])
        ]
        await spool.append(bad + good)
    finally:
        spool.close()


async def test_a_spooled_message_larger_than_max_payload_is_dropped_and_the_next_published(
    ingest: tuple[NATS, IngestSubjects], nats_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    headers = telemetry_messages(subjects, "hostile", 1, [GOOD])[0].headers
    # The payload alone fits, headers and payload do not: the server would close the connection.
    just_over = nc.max_payload - header_bytes(headers) + 1
    await spooled(tmp_path / "spool", subjects, [b"x" * 2 * nc.max_payload, b"y" * just_over])
    forwarder = Forwarder(nats_url, subjects, "hostile", tmp_path / "spool", 100_000_000, max_backoff=0.2)
    await forwarder.start()
    try:
        assert forwarder.pending == 3
        rows = await rows_on_stream(nc, subjects, 1, timeout=10)
        assert rows == [GOOD], "the message behind the oversized ones was not published"
        await until(lambda: forwarder.pending == 0, what="empty spool")
        assert forwarder.dropped_messages == 2 and forwarder.published == 1
    finally:
        await bounded(forwarder.stop(), 15, "stopping the forwarder")


async def test_a_message_larger_than_the_streams_maximum_is_dropped_and_the_next_published(
    ingest: tuple[NATS, IngestSubjects], nats_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    js = nc.jetstream()
    await js.update_stream(
        nats.js.api.StreamConfig(
            name=subjects.stream, subjects=subjects.all_subjects, duplicate_window=120.0, max_msg_size=4096
        )
    )
    await spooled(tmp_path / "spool", subjects, [b"z" * 10_000])
    forwarder = Forwarder(nats_url, subjects, "hostile", tmp_path / "spool", 100_000_000, max_backoff=0.2)
    await forwarder.start()
    try:
        assert await rows_on_stream(nc, subjects, 1, timeout=10) == [GOOD]
        await until(lambda: forwarder.pending == 0, what="empty spool")
        assert forwarder.dropped_messages == 1
    finally:
        await bounded(forwarder.stop(), 15, "stopping the forwarder")


async def test_no_stream_answering_is_retried_never_dropped(
    ingest: tuple[NATS, IngestSubjects], nats_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    js = nc.jetstream()
    await js.delete_stream(subjects.stream)
    forwarder = Forwarder(nats_url, subjects, "hostile", tmp_path / "spool", 100_000_000, max_backoff=0.2)
    await forwarder.start()
    try:
        await forwarder.send_updates([GOOD])
        await until(lambda: forwarder.connected, what="connection")
        await asyncio.sleep(1.0)  # an assertion of absence: several publish attempts fail meanwhile
        assert forwarder.pending == 1 and forwarder.dropped_messages == 0
        await js.add_stream(
            nats.js.api.StreamConfig(
                name=subjects.stream, subjects=subjects.all_subjects, duplicate_window=120.0
            )
        )
        assert await rows_on_stream(nc, subjects, 1, timeout=10) == [GOOD]
        assert forwarder.dropped_messages == 0
    finally:
        await bounded(forwarder.stop(), 15, "stopping the forwarder")


async def test_batches_are_split_below_max_payload_and_rows_that_cannot_be_sent_are_dropped(
    ingest: tuple[NATS, IngestSubjects], nats_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    config = {
        "nats_url": nats_url,
        "nats_prefix": subjects.prefix,
        "partitions": subjects.partitions,
        "source": "hostile",
        "spool_dir": str(tmp_path / "spool"),
        "max_message_bytes": 65_536,
        "max_row_bytes": 30_000,
    }
    forwarder = forwarder_from_config(config, "x")
    await forwarder.start()
    deep: Any = 1
    for _ in range(limits.MAX_JSON_DEPTH + 1):
        deep = {"a": deep}
    path = "/features/f/properties/"
    try:
        good = [Update("org.acme:big", f"{path}p{i}", "v" * 20_000) for i in range(20)]
        await forwarder.send_updates(
            [
                *good[:10],
                Update("org.acme:big", path + "huge", "h" * 40_000),
                Update("org.acme:big", path + "deep", deep),
                Update("org.acme:big", path + "nan", math.nan),
                Update("org.acme:big", path + "inf", [1.0, {"x": -math.inf}]),
                Update("org.acme:big", path + "surrogate", "\ud800"),
                *good[10:],
            ]
        )
        rows = await rows_on_stream(nc, subjects, 20, timeout=10)
        assert rows == good  # one thing: one partition, in order
        messages = await read_stream(nc, subjects.stream, 1)
        assert len(messages) > 1 and all(len(m.data) <= 65_536 for m in messages)
        assert forwarder.dropped_rows == {
            limits.TOO_LARGE: 1,
            limits.TOO_DEEP: 1,
            limits.NOT_FINITE: 2,
            limits.NOT_JSON: 1,
        }
        with pytest.raises(ValueError):  # a command envelope larger than a message may be
            await forwarder.send_command(
                {"topic": "org.acme/big/things/twin/commands/modify", "v": "x" * 70_000}
            )
    finally:
        await bounded(forwarder.stop(), 15, "stopping the forwarder")
    for bad in ({"max_message_bytes": 100}, {"max_row_bytes": 10_000_000}, {"max_json_depth": "deep"}):
        with pytest.raises(ConfigError):
            forwarder_from_config({**config, **bad}, "x")


# ---- MQTT and Sparkplug B ----------------------------------------------------------------------


def deep_json(levels: int) -> bytes:
    return b'{"v":' + b"[" * levels + b"]" * levels + b"}"


def many_metrics(count: int) -> bytes:
    return payload(
        0, [metric("bdSeq", DataType.Int64, 0), *(metric(f"m{i}", DataType.Int32, i) for i in range(count))]
    )


def counters(adapter: MqttAdapter) -> dict[str, Any]:
    assert adapter.sparkplug is not None
    return {
        "dropped": dict(adapter.dropped),
        "rows": dict(adapter.forwarder.dropped_rows),
        "sparkplug": adapter.sparkplug.dropped,
    }


NO_DROPS: dict[str, Any] = {"dropped": {}, "rows": {}, "sparkplug": 0}

# name: (messages (topic under the prefix or spBv1.0/<prefix>, payload), counters after them)
CASES: dict[str, tuple[list[tuple[str, bytes]], dict[str, Any]]] = {
    "huge payload": (
        [("dev/v", json.dumps({"v": "x" * limits.MAX_PAYLOAD_BYTES}).encode())],
        {**NO_DROPS, "dropped": {limits.TOO_LARGE: 1}},
    ),
    "JSON too deep to decode": (
        [("dev/v", deep_json(100_000))],
        {**NO_DROPS, "dropped": {limits.TOO_DEEP: 1}},
    ),
    "value too deep": (
        [("dev/v", deep_json(limits.MAX_JSON_DEPTH + 1))],
        {**NO_DROPS, "rows": {limits.TOO_DEEP: 1}},
    ),
    "garbage bytes": ([("dev/v", bytes(range(128, 256)))], {**NO_DROPS, "dropped": {limits.UNDECODABLE: 1}}),
    "Sparkplug garbage": ([("SP/NBIRTH/e1", b"\xff" * 64)], {**NO_DROPS, "sparkplug": 1}),
    "Sparkplug too many metrics": (
        [("SP/NBIRTH/e1", many_metrics(limits.MAX_SPARKPLUG_METRICS + 1))],
        {**NO_DROPS, "sparkplug": 1},
    ),
    "Sparkplug NaN and Infinity": (
        [
            (
                "SP/NBIRTH/e1",
                payload(
                    0,
                    [
                        metric("bdSeq", DataType.Int64, 0),
                        metric("nan", DataType.Float, math.nan),
                        metric("inf", DataType.Double, math.inf),
                    ],
                ),
            )
        ],
        {**NO_DROPS, "rows": {limits.NOT_FINITE: 2}},
    ),
    "Sparkplug DateTime beyond year 9999": (
        [
            (
                "SP/NBIRTH/e1",
                payload(0, [metric("bdSeq", DataType.Int64, 0), metric("t", DataType.DateTime, 2**62)]),
            )
        ],
        {**NO_DROPS, "sparkplug": 1},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_hostile_mqtt_message_is_dropped_and_counted_and_the_next_one_lands(
    case: str, ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    messages, expected = CASES[case]
    mapping = {"topic": f"{prefix}/{{thing}}/v", "thing": "org.acme:{thing}", "feature": "f", "property": "v"}
    mapping["value"] = "/v"
    sparkplug = {"namespace": "org.sp", "groups": [prefix]}
    config = adapter_config(prefix, nats_url, mqtt_url, tmp_path, mappings=[mapping], sparkplug=sparkplug)
    async with running(config) as adapter:
        with MqttPeer(mqtt_url) as device:
            for topic, body in messages:
                where = f"spBv1.0/{prefix}/{topic[3:]}" if topic.startswith("SP/") else f"{prefix}/{topic}"
                device.publish(where, body)
            device.publish(f"{prefix}/good/v", json.dumps({"v": 1}))
            await until(lambda: adapter.received == len(messages) + 1, what="messages received")
            good = Update("org.acme:good", "/features/f/properties/v", 1)
            # the rows kept of a Sparkplug BIRTH may reach the stream before the good one
            for _ in range(100):
                rows = await rows_on_stream(nc, subjects, 1)
                if good in rows:
                    break
                await asyncio.sleep(0.05)
        assert good in rows
        assert counters(adapter) == expected
    # what was kept of a dropped Sparkplug BIRTH: its other metrics and the node's status
    assert all(r.thing_id in ("org.acme:good", f"org.sp:{prefix}.e1") for r in rows)
    assert not [r for r in rows if r.path.endswith(("/nan", "/inf", "/t"))]


async def test_a_timestamp_no_calendar_holds_is_left_out_and_the_row_lands(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    mapping = {"topic": f"{prefix}/{{thing}}/v", "thing": "org.acme:{thing}", "feature": "f", "property": "v"}
    mapping |= {"value": "/v", "timestamp": "/ts"}
    config = adapter_config(prefix, nats_url, mqtt_url, tmp_path, mappings=[mapping])
    async with running(config) as adapter:
        with MqttPeer(mqtt_url) as device:
            device.publish(f"{prefix}/a/v", b'{"v": 1, "ts": 1e300}')  # was an OverflowError: adapter gone
            device.publish(f"{prefix}/b/v", json.dumps({"v": 2, "ts": "9999999-01-01"}))
            rows = await rows_on_stream(nc, subjects, 2)
        assert adapter.dropped == {}
    assert sorted(rows, key=lambda r: r.thing_id) == [
        Update("org.acme:a", "/features/f/properties/v", 1),
        Update("org.acme:b", "/features/f/properties/v", 2),
    ]


# ---- OPC UA ------------------------------------------------------------------------------------


async def test_a_huge_or_not_finite_opc_ua_value_is_dropped_and_the_next_change_lands(
    ingest: tuple[NATS, IngestSubjects], nats_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    plc = await Plc(free_port()).start()
    try:
        assert plc.server is not None
        blob = await plc.server.nodes.objects.add_variable(
            ua.NodeId("Blob", plc.ns), ua.QualifiedName("Blob", plc.ns), ua_bytes(b"small")
        )
        config = {
            "source": "hostile-plc",
            "nats_url": nats_url,
            "nats_prefix": subjects.prefix,
            "partitions": subjects.partitions,
            "spool_dir": str(tmp_path / "spool"),
            "max_row_bytes": 10_000,
            "opcua": {"endpoint": plc.url, "publishing_interval": 20},
            "nodes": [
                {
                    "node_id": f"ns={plc.ns};s=Pump1.Flow",
                    "thing_id": "org.acme:p",
                    "path": "/features/flow/properties/v",
                },
                {
                    "node_id": f"ns={plc.ns};s=Blob",
                    "thing_id": "org.acme:p",
                    "path": "/features/blob/properties/v",
                },
            ],
        }
        forwarder = forwarder_from_config(config, "opcua")
        adapter = opcua.OpcUaAdapter(opcua.parse_config(config), forwarder)
        await forwarder.start()
        task = asyncio.create_task(adapter.run())
        try:
            received = Received(nc, subjects)
            await received.wait_for(lambda r: r.path.startswith("/features/blob"))
            await received.wait_for(lambda r: r.value == 1.0)
            await blob.write_value(ua_bytes(b"\x00" * 1_000_000))  # a megabyte ByteString
            await plc.set("Flow", math.nan)
            await plc.set("Flow", 2.0)
            await blob.write_value(ua_bytes(b"ok"))
            await received.wait_for(lambda r: r.value == 2.0)
            await received.wait_for(lambda r: r.value == "b2s=")
            assert adapter.dropped == {limits.TOO_LARGE: 1}
            assert forwarder.dropped_rows == {limits.NOT_FINITE: 1}
            assert not [r for r in received.rows if isinstance(r.value, str) and len(r.value) > 100]
            assert not [r for r in received.rows if r.value is None]  # NaN is not sent as null
        finally:
            await cancel_and_wait(task, timeout=15)
            await bounded(forwarder.stop(), 15, "stopping the forwarder")
    finally:
        await plc.stop()


def ua_bytes(data: bytes) -> ua.Variant:
    return ua.Variant(data, ua.VariantType.ByteString)


def test_decoded_telemetry_of_split_messages_is_the_batch() -> None:
    subjects = IngestSubjects("t", 1)
    rows = [Update("org.acme:a", "/features/f/properties/v", "x" * (i * 37 % 500)) for i in range(300)]
    messages = telemetry_messages(subjects, "s", 1, rows, max_bytes=2000)
    assert all(len(m.payload) <= 2000 for m in messages)
    assert [u for m in messages for u in decode_telemetry(m.payload)] == rows
    assert [int(m.headers["Twinstore-Seq"]) for m in messages] == list(range(1, len(messages) + 1))
