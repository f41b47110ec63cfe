"""Sparkplug B: BIRTH/DATA/DEATH sequences with aliases (payloads encoded with the schema),
seq and bdSeq, rebirth requests, commands; through Mosquitto and NATS, and the host alone."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
from nats.aio.client import Client as NATS

from adapters.sparkplug.codec import DataType, metric, value_of
from adapters.sparkplug.host import SparkplugHost, payload
from adapters.sparkplug.sparkplug_b_pb2 import Payload
from tests.adapters.conftest import MqttPeer, mqtt_host_port
from tests.adapters.test_mqtt import adapter_config, rows_on_stream, running
from twinstore.bus.ingest import IngestSubjects, Update
from twinstore.bus.relay import ensure_events_stream
from twinstore.bus.subjects import Subjects
from twinstore.runtime import Runtime
from twinstore.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
STATUS = "/features/connectivity/properties/status"
T0 = 1_700_000_000_000


def nbirth(seq: int, bd_seq: int) -> bytes:
    return payload(
        seq,
        [
            metric("bdSeq", DataType.Int64, bd_seq),
            metric("Node Control/Rebirth", DataType.Boolean, False, alias=1),
            metric("Temperature", DataType.Float, 20.5, alias=2),
            metric("Motor/Speed", DataType.Int32, -5, alias=3),
        ],
        T0,
    )


def test_the_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """adapters/sparkplug/sparkplug_b_pb2.py is what protoc makes of sparkplug_b.proto."""
    here = ROOT / "adapters" / "sparkplug"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{here}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(here / "sparkplug_b.proto"),
        ],
        check=True,
    )
    for name in ("sparkplug_b_pb2.py", "sparkplug_b_pb2.pyi"):
        assert (tmp_path / name).read_text() == (here / name).read_text(), f"{name} is stale: regenerate it"


def test_values_of_every_kind_round_trip() -> None:
    cases = [
        (DataType.Int8, -1),
        (DataType.Int16, -300),
        (DataType.Int32, -70000),
        (DataType.Int64, -(2**40)),
        (DataType.UInt8, 255),
        (DataType.UInt32, 2**32 - 1),
        (DataType.UInt64, 2**64 - 1),
        (DataType.Float, 1.25),
        (DataType.Double, 0.1),
        (DataType.Boolean, True),
        (DataType.String, "on"),
        (DataType.Text, "t"),
        (DataType.UUID, "0f8fad5b-d9cb-469f-a165-70867728950e"),
    ]
    for datatype, value in cases:
        wire = Payload.Metric.FromString(metric("m", datatype, value).SerializeToString())
        assert value_of(wire) == value, datatype
    assert value_of(metric("d", DataType.DateTime, T0)) == "2023-11-14T22:13:20.000Z"
    assert value_of(metric("n", DataType.Int32, None)) is None
    arr = Payload.Metric(name="a", datatype=DataType.Int16Array, bytes_value=b"\x01\x00\xff\xff")
    assert value_of(arr) == [1, -1]


def test_host_aliases_seq_bdseq_and_deaths() -> None:
    host = SparkplugHost("org.acme")
    node = "org.acme:g.e"
    dev = "org.acme:g.e.d1"
    born = host.handle("spBv1.0/g/NBIRTH/e", nbirth(0, 7), 0)
    assert born.updates == [
        Update(node, STATUS, "online", T0),
        Update(node, "/features/metrics/properties/Temperature", 20.5, T0),
        Update(node, "/features/Motor/properties/Speed", -5, T0),
    ]
    dbirth = payload(1, [metric("Pump/Flow", DataType.Double, 1.5, alias=10)], T0 + 1)
    assert host.handle("spBv1.0/g/DBIRTH/e/d1", dbirth, 0).updates == [
        Update(dev, STATUS, "online", T0 + 1),
        Update(dev, "/features/Pump/properties/Flow", 1.5, T0 + 1),
    ]
    # DATA by alias only, without datatype: both come from the BIRTH
    ndata = Payload(timestamp=T0 + 2, seq=2)
    ndata.metrics.add(alias=3, int_value=(-6) & 0xFFFFFFFF, timestamp=T0 + 3)
    assert host.handle("spBv1.0/g/NDATA/e", ndata.SerializeToString(), 0).updates == [
        Update(node, "/features/Motor/properties/Speed", -6, T0 + 3)
    ]
    ddata = Payload(timestamp=T0 + 4, seq=3)
    ddata.metrics.add(alias=10, double_value=2.5)
    assert host.handle("spBv1.0/g/DDATA/e/d1", ddata.SerializeToString(), 0).updates == [
        Update(dev, "/features/Pump/properties/Flow", 2.5, T0 + 4)
    ]
    # a seq gap is counted and asks for a rebirth
    gap = host.handle("spBv1.0/g/NDATA/e", payload(9, [metric(None, None, 21.0, alias=2)], T0), 0)
    assert host.seq_gaps == 1 and [t for t, _ in gap.publish] == ["spBv1.0/g/NCMD/e"]
    rebirth = Payload.FromString(gap.publish[0][1])
    assert [(m.name, m.boolean_value) for m in rebirth.metrics] == [("Node Control/Rebirth", True)]
    # a DEATH with the bdSeq of an older session is stale; the current one takes node and devices
    assert (
        host.handle("spBv1.0/g/NDEATH/e", payload(None, [metric("bdSeq", DataType.Int64, 6)], T0), 0).updates
        == []
    )
    death = host.handle("spBv1.0/g/NDEATH/e", payload(None, [metric("bdSeq", DataType.Int64, 7)], T0 + 9), 0)
    assert death.updates == [Update(node, STATUS, "offline", T0 + 9), Update(dev, STATUS, "offline", T0 + 9)]
    # DATA of a node that is not born: dropped, rebirth asked
    late = host.handle("spBv1.0/g/NDATA/e", payload(0, [metric(None, None, 1.0, alias=2)]), 0)
    assert late.updates == [] and host.dropped == 1


def test_commands_use_the_birth_datatype_and_alias() -> None:
    host = SparkplugHost("org.acme")
    host.handle("spBv1.0/g/NBIRTH/e", nbirth(0, 1), 0)
    host.handle("spBv1.0/g/DBIRTH/e/d1", payload(1, [metric("Pump/Flow", DataType.Float, 1.5, alias=10)]), 0)
    topic, body = host.command("org.acme:g.e", "Motor", "/Speed", 1200) or ("", b"")
    assert topic == "spBv1.0/g/NCMD/e"
    [m] = Payload.FromString(body).metrics
    assert (m.name, m.alias, m.datatype, value_of(m)) == ("Motor/Speed", 3, DataType.Int32, 1200)
    topic, body = host.command("org.acme:g.e.d1", "Pump", "/Flow", 2) or ("", b"")
    assert topic == "spBv1.0/g/DCMD/e/d1"
    assert Payload.FromString(body).metrics[0].float_value == 2.0
    assert host.command("org.acme:unknown", "Pump", "/Flow", 2) is None


async def test_birth_data_death_through_mosquitto_and_a_desired_value_as_dcmd(
    ingest: tuple[NATS, IngestSubjects], prefix: str, nats_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    nc, subjects = ingest
    events = Subjects(prefix, 4)
    js = nc.jetstream()
    await ensure_events_stream(js, events, 600)
    group = prefix
    config = adapter_config(
        prefix, nats_url, mqtt_url, tmp_path, sparkplug={"namespace": "plant", "groups": [group]}
    )
    try:
        async with running(config):
            with MqttPeer(mqtt_url) as edge:
                edge.subscribe(f"spBv1.0/{group}/+/e1/#")
                # DATA before any BIRTH: dropped, and the node is asked to rebirth
                edge.publish(f"spBv1.0/{group}/NDATA/e1", payload(0, [metric(None, None, 1.0, alias=2)]))
                topic, body = await next_command(edge)
                assert topic == f"spBv1.0/{group}/NCMD/e1"
                assert Payload.FromString(body).metrics[0].name == "Node Control/Rebirth"
                edge.publish(f"spBv1.0/{group}/NBIRTH/e1", nbirth(0, 3))
                edge.publish(
                    f"spBv1.0/{group}/DBIRTH/e1/pump",
                    payload(1, [metric("Valve/Open", DataType.Boolean, False, alias=20)], T0),
                )
                ddata = Payload(timestamp=T0 + 5, seq=2)
                ddata.metrics.add(alias=20, boolean_value=True)
                edge.publish(f"spBv1.0/{group}/DDATA/e1/pump", ddata.SerializeToString())
                edge.publish(f"spBv1.0/{group}/DDEATH/e1/pump", payload(3, [], T0 + 6))
                edge.publish(
                    f"spBv1.0/{group}/NDEATH/e1", payload(None, [metric("bdSeq", DataType.Int64, 3)], T0 + 7)
                )
                rows = await rows_on_stream(nc, subjects, 8)
                node, pump = f"plant:{group}.e1", f"plant:{group}.e1.pump"
                assert [r for r in rows if r.thing_id == node] == [  # one thing's rows keep their order
                    Update(node, STATUS, "online", T0),
                    Update(node, "/features/metrics/properties/Temperature", 20.5, T0),
                    Update(node, "/features/Motor/properties/Speed", -5, T0),
                    Update(node, STATUS, "offline", T0 + 7),
                ]
                assert [r for r in rows if r.thing_id == pump] == [
                    Update(pump, STATUS, "online", T0),
                    Update(pump, "/features/Valve/properties/Open", False, T0),
                    Update(pump, "/features/Valve/properties/Open", True, T0 + 5),
                    Update(pump, STATUS, "offline", T0 + 6),
                ]
                # born again; a desired value of the device goes out as DCMD with its alias
                edge.publish(f"spBv1.0/{group}/NBIRTH/e1", nbirth(0, 4))
                edge.publish(
                    f"spBv1.0/{group}/DBIRTH/e1/pump",
                    payload(1, [metric("Valve/Open", DataType.Boolean, False, alias=20)], T0),
                )
                await rows_on_stream(nc, subjects, 13)
                await wait_for_consumer(nc, events, f"adapter-mqtt-{prefix}")
                envelope = {
                    "topic": f"plant/{group}.e1.pump/things/twin/events/merged",
                    "path": "/features/Valve/desiredProperties",
                    "value": {"Open": True},
                    "revision": 3,
                }
                await js.publish(events.event_subject(pump), json.dumps(envelope).encode())
                topic, body = await next_command(edge)
                assert topic == f"spBv1.0/{group}/DCMD/e1/pump"
                [m] = Payload.FromString(body).metrics
                assert (m.name, m.alias, m.datatype, m.boolean_value) == (
                    "Valve/Open",
                    20,
                    DataType.Boolean,
                    True,
                )
    finally:
        await js.delete_stream(events.events_stream)


async def next_command(peer: MqttPeer) -> tuple[str, bytes]:
    """The next NCMD/DCMD the peer sees (its own BIRTH/DATA come back too: skipped)."""
    while True:
        topic, body = await peer.next()
        if "/NCMD/" in topic or "/DCMD/" in topic:
            return topic, body


async def wait_for_consumer(nc: NATS, events: Subjects, name: str) -> None:
    js = nc.jetstream()
    deadline = time.monotonic() + 10
    while True:
        try:
            await js.consumer_info(events.events_stream, name)
            return
        except Exception:
            assert time.monotonic() < deadline, f"consumer {name} was not created"
            await asyncio.sleep(0.05)


async def test_the_sparkplug_device_example_becomes_a_twin(
    client: httpx.AsyncClient,
    runtime: Runtime,
    settings: Settings,
    mqtt_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    """examples/sparkplug_device.py through Mosquitto and the adapter: its node's twin (created
    without features) gets connectivity and the Pump metrics."""
    group = prefix
    thing_id = f"plant:{group}.edge-1"
    assert (await client.put(f"/api/2/things/{thing_id}", json={"features": {}})).status_code == 201
    config = {
        "nats_url": settings.nats_url,
        "nats_prefix": settings.nats_prefix,
        "partitions": settings.partitions,
        "source": "ditto-user",  # writes as nginx:ditto (tests/conftest.py INGEST_SOURCES)
        "spool_dir": str(tmp_path / "spool"),
        "mqtt": {"url": mqtt_url, "client_id": f"adapter-ex-{prefix}", "session_expiry": 5},
        "sparkplug": {"namespace": "plant", "groups": [group]},
    }
    host, port = mqtt_host_port(mqtt_url)
    async with running(config):
        done = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                str(ROOT / "examples" / "sparkplug_device.py"),
                "--mqtt-host",
                host,
                "--mqtt-port",
                str(port),
                "--group",
                group,
                "--node",
                "edge-1",
                "--count",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 15
        while True:
            r = await client.get(f"/api/2/things/{thing_id}/features")
            features = r.json() if r.status_code == 200 else {}
            if "Pump" in features and "connectivity" in features:
                break
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.05)
    assert features["connectivity"]["properties"]["status"] == "online"
    assert set(features["Pump"]["properties"]) == {"Flow", "Pressure"}
