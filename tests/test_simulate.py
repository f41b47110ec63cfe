"""``twinstore simulate``: the signals (SKAB replay, synthetic), finding a running twinstore's
NATS, and the whole plant as processes against a real ``twinstore serve``, the machine's NATS,
PostgreSQL and Mosquitto: twins get values over MQTT and over OPC UA (written as the two
adapters' sources), and a desired speed goes to the simulated PLC and comes back confirmed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import nats
import pytest

from tests.conftest import AUTH, ROOT, ServerProcess, free_port, require
from twinstore.bus.ingest import IngestSubjects
from twinstore.bus.subjects import Subjects
from twinstore.settings import Settings, load_settings
from twinstore.simulate import (
    SKAB_COLUMNS,
    Pump,
    SimulateError,
    SkabReplay,
    Synthetic,
    find_nats,
    plan,
    skab_files,
)

SKAB = ROOT.parent / "shared" / "datasets" / "skab"


# -- signals ----------------------------------------------------------------------------------


def test_skab_replay_goes_round_the_files_from_its_own_start() -> None:
    require(SKAB.is_dir(), f"no SKAB data set at {SKAB}")
    files = skab_files(SKAB)
    assert [f.parent.name for f in files[:2]] == ["valve1", "valve1"]
    assert files[-1].name == "anomaly-free.csv"
    header = files[0].read_text().splitlines()[0].split(";")
    assert tuple(header[1:9]) == SKAB_COLUMNS
    replay = SkabReplay(SKAB, files[:2], start=1)
    try:
        first = replay.next()
        assert first.scenario == f"skab:valve1/{files[1].name}"
        assert set(first.values) == set(SKAB_COLUMNS)
        rows = len(files[1].read_text().splitlines()) - 1
        samples = [first] + [replay.next() for _ in range(rows)]
        assert samples[rows].scenario == f"skab:valve1/{files[0].name}"  # the next file
        assert any(s.anomaly for s in samples[:rows]), "the SKAB file's anomaly labels are kept"
    finally:
        replay.close()


def test_synthetic_signals_have_anomaly_episodes_and_the_speed_scales_them() -> None:
    import random

    pump = Pump("pump-1", "plant:pump-1", Synthetic(random.Random(7), mean_interval=30.0))
    samples = [pump.step(1.0) for _ in range(600)]
    scenarios = [s.scenario for s, _ in samples]
    assert "normal" in scenarios and len(set(scenarios)) > 2
    for sample, values in samples:
        assert sample.anomaly == (sample.scenario != "normal")
        assert values == pytest.approx(sample.values)  # at the nominal speed
    pump.setpoint = 750.0
    for _ in range(30):  # the actual speed follows within seconds
        sample, values = pump.step(1.0)
    assert pump.speed == pytest.approx(750.0, abs=1)
    flow = "Volume Flow RateRMS"
    assert values[flow] == pytest.approx(sample.values[flow] * pump.speed / 1500)
    assert values["Voltage"] == sample.values["Voltage"]


# -- finding twinstore --------------------------------------------------------------------------


def _args(**overrides: Any) -> argparse.Namespace:
    from twinstore.cli import build_parser

    args = build_parser().parse_args(["simulate"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_the_embedded_nats_of_a_running_server_is_found_under_its_data_dir(
    tmp_path: Path, servers: tuple[str, str]
) -> None:
    nats_url = servers[1]
    # what twinstore.embedded leaves for a running nats-server: its pid and its ports file
    (tmp_path / "nats.pid").write_text("4242\n")
    (tmp_path / "nats-server_4242.ports").write_text(json.dumps({"nats": [nats_url]}))
    assert find_nats(tmp_path) == nats_url
    settings = load_settings({}, data_dir=str(tmp_path))
    resolved = plan(settings, _args(dataset="synthetic"))
    assert resolved.nats_url == nats_url and resolved.dataset is None
    assert resolved.api_url == "http://127.0.0.1:8080"
    assert resolved.workdir == tmp_path / "simulate" / "plant"
    # a server that is gone (nothing listens on its port) is not found
    (tmp_path / "nats-server_4242.ports").write_text(
        json.dumps({"nats": [f"nats://127.0.0.1:{free_port()}"]})
    )
    assert find_nats(tmp_path) is None
    with pytest.raises(SimulateError, match="make run"):
        plan(settings, _args())


# -- the plant, end to end ----------------------------------------------------------------------


def _mqtt_url() -> str:
    url = os.environ.get("TWINSTORE_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 1883), timeout=1):
            return url
    except OSError:
        if os.environ.get("TWINSTORE_TEST_MQTT_URL"):
            pytest.fail(f"MQTT broker {url} is not reachable")
        require(False, f"no MQTT broker at {url}")
        raise


class Plant:
    """A twinstore server of its own (fresh database, own NATS prefix) and a simulator for it."""

    def __init__(self, settings: Settings, database_url: str, tmp_path: Path) -> None:
        self.namespace = f"sim{secrets.token_hex(3)}"
        self.settings = msgspec.structs.replace(
            settings, database_url=database_url, nats_prefix=f"s{secrets.token_hex(4)}"
        )
        # not development mode: the sources are configured, each writing as its own subject
        self.sources = {
            f"simulate-{self.namespace}-{kind}": [f"integration:simulate-{self.namespace}-{kind}"]
            for kind in ("mqtt", "opcua")
        }
        self.server = ServerProcess(self.settings, TWINSTORE_INGEST_SOURCES=json.dumps(self.sources))
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp_path / "simulate.log"

    def start(self, *args: str) -> None:
        env = {
            **os.environ,
            "TWINSTORE_NATS_URL": self.settings.nats_url or "",
            "TWINSTORE_NATS_PREFIX": self.settings.nats_prefix,
            "TWINSTORE_PARTITIONS": str(self.settings.partitions),
            "TWINSTORE_LOG_FORMAT": "text",
        }
        command = [
            sys.executable,
            "-m",
            "twinstore.cli",
            "simulate",
            "--api-url",
            self.server.url,
            "--user",
            ":".join(AUTH),
            "--namespace",
            self.namespace,
            "--data-dir",
            str(self.tmp_path / "data"),
            "--opcua-port",
            str(free_port()),
            "--status-interval",
            "0",
            *args,
        ]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (as Ctrl-C would); the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"simulate did not stop on SIGTERM:\n{self.output()[-3000:]}") from None
        return self.proc.returncode

    def thing(self, name: str) -> dict[str, Any]:
        r = httpx.get(f"{self.server.url}/api/2/things/{self.namespace}:{name}", auth=AUTH, timeout=5)
        return dict(r.json()) if r.status_code == 200 else {}

    def wait(self, what: str, check: Any, timeout: float = 40.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"simulate exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            result = check()
            if result:
                return result
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout} s\n{self.output()[-3000:]}")


def _prop(thing: dict[str, Any], feature: str, name: str) -> Any:
    return ((thing.get("features") or {}).get(feature) or {}).get("properties", {}).get(name)


@pytest.fixture
def plant(settings: Settings, scratch_database: str, tmp_path: Path) -> Iterator[Plant]:
    plant = Plant(settings, scratch_database, tmp_path)
    plant.server.start()
    try:
        yield plant
    finally:
        if plant.proc is not None and plant.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                plant.stop()  # SIGTERM: the simulator stops its adapters
        plant.server.stop()

        async def drop_streams() -> None:
            nc = await nats.connect(plant.settings.nats_url)
            js = nc.jetstream()
            ingest = IngestSubjects(plant.settings.nats_prefix, plant.settings.partitions)
            for stream in (
                Subjects(plant.settings.nats_prefix).events_stream,
                ingest.stream,
                ingest.errors_stream,
            ):
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
            await nc.close()

        asyncio.run(drop_streams())


async def _originators(database_url: str, thing_id: str) -> set[str]:
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch(
            "SELECT DISTINCT originator FROM journal WHERE entity = 'thing' AND id = $1", thing_id
        )
    finally:
        await con.close()
    return {r["originator"] for r in rows}


def _retained(mqtt_url: str, topic: str) -> list[str]:
    """Topics under ``topic`` with a retained message on the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    found: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"check-{secrets.token_hex(4)}")
    client.on_message = lambda _c, _u, msg: found.append(msg.topic) if msg.retain and msg.payload else None
    parts = urlsplit(mqtt_url)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        # The broker sends the retained messages after the SUBACK and handles a connection's
        # packets in order: once a later publish is acknowledged, every retained one has come.
        client.publish(f"probe/{secrets.token_hex(4)}", b"", qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return found


def _consumer_exists(nats_url: str, stream: str, name: str) -> bool:
    async def check() -> bool:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().consumer_info(stream, name)
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    return asyncio.run(check())


@pytest.mark.slow
def test_simulated_plant_feeds_twins_over_mqtt_and_opcua_and_takes_a_desired_speed(
    plant: Plant, scratch_database: str
) -> None:
    mqtt_url = _mqtt_url()
    plant.start("--things", "2", "--rate", "4", "--mqtt-url", mqtt_url)
    ns = plant.namespace

    def fed(name: str) -> Any:
        thing = plant.thing(name)
        return (
            thing
            if _prop(thing, "pump", "flowRate") is not None
            and _prop(thing, "vibration", "accelerometer1RMS") is not None
            and _prop(thing, "simulation", "scenario") is not None
            else None
        )

    for name in ("pump-1", "pump-2"):
        thing = plant.wait(f"{name} fed over OPC UA and MQTT", lambda name=name: fed(name))
        assert thing["policyId"] == f"{ns}:simulation"
        assert _prop(thing, "pump", "speed") == 1500.0
        for feature, prop in (("pump", "current"), ("pump", "pressure"), ("temperature", "motor")):
            assert isinstance(_prop(thing, feature, prop), float)
        assert isinstance(_prop(thing, "simulation", "scenario"), str)
    assert "simulating 2 pump(s) at 4 Hz" in plant.output()

    # the values keep changing (4 samples/s)
    r = httpx.get(f"{plant.server.url}/api/2/things/{ns}:pump-1?fields=_revision", auth=AUTH)
    revision = r.json()["_revision"]
    plant.wait(
        "more revisions",
        lambda: (
            httpx.get(f"{plant.server.url}/api/2/things/{ns}:pump-1?fields=_revision", auth=AUTH).json()[
                "_revision"
            ]
            >= revision + 20
        ),
        timeout=15,
    )

    # each path wrote as its own source (the policy lets each write only its features)
    originators = asyncio.run(_originators(scratch_database, f"{ns}:pump-1"))
    assert {f"integration:simulate-{ns}-mqtt", f"integration:simulate-{ns}-opcua"} <= originators

    # desired speed -> OPC UA write to the PLC -> confirmed in properties; the flow follows
    events = Subjects(plant.settings.nats_prefix).events_stream
    plant.wait(
        "the OPC UA adapter's desired-values consumer",
        lambda: _consumer_exists(plant.settings.nats_url or "", events, f"adapter-simulate-{ns}-opcua"),
        timeout=20,
    )
    url = f"{plant.server.url}/api/2/things/{ns}:pump-2/features/pump"
    r = httpx.put(f"{url}/desiredProperties/speed", json=900, auth=AUTH)
    assert r.status_code in (201, 204), r.text
    started = time.monotonic()
    plant.wait(
        "speed 900 confirmed", lambda: httpx.get(f"{url}/properties/speed", auth=AUTH).json() == 900.0, 10
    )
    assert time.monotonic() - started < 5
    # out of the PLC's range: it accepts its maximum, and the twin shows that
    r = httpx.put(f"{url}/desiredProperties/speed", json=99999, auth=AUTH)
    assert r.status_code == 204, r.text
    plant.wait("speed clamped", lambda: httpx.get(f"{url}/properties/speed", auth=AUTH).json() == 3000.0, 10)
    assert httpx.get(f"{url}/desiredProperties/speed", auth=AUTH).json() == 99999

    assert plant.stop() == 0
    assert _retained(mqtt_url, f"twinstore-sim/{ns}/#") == [], (
        "the ground truth's retained messages are cleared"
    )
    data = plant.tmp_path / "data" / "simulate" / ns
    assert (data / "opcua.yaml").is_file() and (data / "mqtt.yaml").is_file()
    assert not list(data.glob("*.pid")), "the adapters were stopped"


@pytest.mark.slow
def test_without_an_mqtt_broker_only_the_opcua_path_runs_and_a_killed_simulator_leaves_no_adapter(
    plant: Plant,
) -> None:
    plant.start("--things", "1", "--rate", "4", "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}")
    thing = plant.wait(
        "pump-1 fed over OPC UA",
        lambda: (
            plant.thing("pump-1") if _prop(plant.thing("pump-1"), "pump", "flowRate") is not None else None
        ),
    )
    assert _prop(thing, "vibration", "accelerometer1RMS") is None
    assert "only the PLC (OPC UA) path runs" in plant.output()
    assert not (plant.tmp_path / "data" / "simulate" / plant.namespace / "mqtt.yaml").exists()
    # kill -9: the adapter gets SIGTERM from the kernel (parent-death signal) and stops
    pid = int((plant.tmp_path / "data" / "simulate" / plant.namespace / "opcua-adapter.pid").read_text())
    assert plant.proc is not None
    plant.proc.kill()
    plant.proc.wait(10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and b"zombie" not in _status(pid):
        assert time.monotonic() < deadline, "the OPC UA adapter outlived the killed simulator"
        time.sleep(0.1)


def _status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return b"zombie"
