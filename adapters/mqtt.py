"""MQTT adapter (paho-mqtt 2, MQTT 3.1.1 and 5): plant topics and Sparkplug B to twins, and
desired properties back to the devices.

Configuration (YAML or TOML; the keys every adapter shares are in :mod:`adapters.cli`)::

    mqtt:
      url: mqtt://broker:1883        # mqtts://broker:8883 for TLS
      client_id: twinstore-plant-1   # default twinstore-<source>; stable for a persistent session
      protocol: 5                    # or "3.1.1"
      username: adapter
      password: secret
      tls: {ca: ca.pem, cert: client.pem, key: client.key, insecure: false}
      keepalive: 30
      session_expiry: 3600           # MQTT 5; the session (and queued QoS 1 messages) outlives us
      receive_maximum: 1000          # MQTT 5; unacknowledged QoS 1 messages in flight to us
      ack_after_spool: true          # false: paho acks on receipt (a crash may lose a batch)
      clean_start: false
    batch_rows: 500                  # rows per send_updates, or
    batch_ms: 20                     # at most this long after the first message
    max_payload_bytes: 262144        # a larger MQTT payload is dropped undecoded
    mappings: [...]                  # see adapters.mapping
    sparkplug:                       # see adapters.sparkplug.host
      namespace: org.acme
      groups: ["+"]
      default_feature: metrics
      max_metrics: 10000             # a payload with more metrics is dropped

Delivery: paho runs its network loop in its own thread; :class:`_Inbox` is the one bridge to
asyncio (a bounded deque: when full, paho's thread waits, so TCP pushes back to the broker).
Subscriptions are QoS 1 with manual acknowledgement: a message is acknowledged to the broker
only after its rows are in the spool (fsynced), so neither a crash of the adapter nor an outage
of NATS loses it (with a persistent session the broker keeps what arrives meanwhile).

Hostile or broken devices: a message larger than ``max_payload_bytes``, one that cannot be
decoded (JSON nested too deeply for the decoder, bytes that are neither JSON nor UTF-8 text, a
Sparkplug payload that is no protobuf or has more than ``max_metrics`` metrics) is dropped,
logged (topic and reason, never the payload) and counted in ``dropped`` (by reason, see
:mod:`adapters.limits`); the forwarder drops rows it cannot send (``dropped_rows``). A dropped
message is acknowledged like any other (else the broker would deliver it again for ever) and
the messages around it go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections import Counter, deque
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters import limits
from adapters.base import ConfigError, Forwarder, config_int, desired_values, forwarder_from_config
from adapters.mapping import TopicMapping
from adapters.sparkplug.host import NAMESPACE as SPARKPLUG
from adapters.sparkplug.host import SparkplugHost
from twinstore.bus.ingest import Update

__all__ = ["MqttAdapter", "run"]

log = logging.getLogger("adapters.mqtt")

# (topic, payload (None: larger than max_payload_bytes, not kept), mid, qos, received at ms)
Received = tuple[str, bytes | None, int, int, int]
Answer = tuple[str, bytes]  # an MQTT message to publish (topic, payload)


class _Inbox:
    """Messages from paho's thread to the event loop, in arrival order, bounded."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.size = size
        self.items: deque[Received] = deque()
        self._event = asyncio.Event()
        self._signalled = False
        self._room = threading.Event()
        self._room.set()
        self.closed = False

    def put(self, item: Received) -> None:
        """Called in paho's thread; waits while the inbox is full."""
        while len(self.items) >= self.size and not self.closed:
            self._room.clear()
            self._room.wait(0.1)
        self.items.append(item)
        if not self._signalled:
            self._signalled = True
            self.loop.call_soon_threadsafe(self._event.set)

    async def take(self, most: int, linger: float, idle: float = 0.002) -> list[Received]:
        """At least one message, then what arrives within ``linger`` seconds, up to ``most``;
        stops early when nothing arrived for ``idle`` seconds (the broker may be waiting for
        our acks: its window of unacknowledged QoS 1 messages is full)."""
        while True:
            self._signalled = False  # before looking: a put after this signals again
            if self.items:
                break
            await self._event.wait()
            self._event.clear()
        deadline = self.loop.time() + linger
        while len(self.items) < most and (left := deadline - self.loop.time()) > 0:
            self._signalled = False
            self._event.clear()
            seen = len(self.items)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), min(left, idle))
            if len(self.items) == seen:
                break
        taken = [self.items.popleft() for _ in range(min(most, len(self.items)))]
        self._room.set()
        return taken


class _BufferedSocket:
    """paho reads every packet with three or more ``recv`` calls (command byte, each length
    byte, body); this reads up to 64 KiB at once and hands them out. ``pending()`` tells paho's
    loop that buffered bytes are left (as it does for TLS), so it does not wait in select."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._data) - self._pos + int(inner)

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._data):
            self._data = self._sock.recv(max(size, 65536))  # BlockingIOError etc. go to paho
            self._pos = 0
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Client(mqtt.Client):
    """paho's client with buffered reads (``_create_socket`` is paho 2's one socket factory)."""

    def _create_socket(self) -> Any:
        return _BufferedSocket(super()._create_socket())

    def ack_many(self, acks: list[tuple[int, int]]) -> None:
        """Acknowledge many messages with one wake-up of paho's thread (``ack`` alone writes a
        byte to paho's wake-up socket for every packet it queues)."""
        wake, self._sockpairW = self._sockpairW, None
        try:
            for mid, qos in acks:
                self.ack(mid, qos)
        finally:
            self._sockpairW = wake
        if wake is not None:
            with contextlib.suppress(BlockingIOError):
                wake.send(b"0")


def _protocol(value: Any) -> MQTTProtocolVersion:
    text = str(value)
    if text in ("5", "5.0", "mqttv5"):
        return MQTTProtocolVersion.MQTTv5
    if text in ("3.1.1", "311", "4", "mqttv311"):
        return MQTTProtocolVersion.MQTTv311
    raise ConfigError(f"mqtt.protocol {value!r}: 5 or 3.1.1")


class MqttAdapter:
    """Bridges one MQTT broker and one :class:`Forwarder` (see the module docstring)."""

    def __init__(self, config: dict[str, Any], forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.mqtt_config: dict[str, Any] = dict(config.get("mqtt") or {})
        self.batch_rows = int(config.get("batch_rows", 500))
        self.batch_ms = float(config.get("batch_ms", 20))
        self.queue_size = int(config.get("queue_size", 20_000))
        self.max_payload_bytes = config_int(
            config, "max_payload_bytes", limits.MAX_PAYLOAD_BYTES, 1, 256 * 1024 * 1024
        )
        self.mappings = [TopicMapping.from_config(m) for m in config.get("mappings") or []]
        sparkplug = config.get("sparkplug")
        self.sparkplug: SparkplugHost | None = None
        self.sparkplug_groups: list[str] = []
        if sparkplug is not None:
            if not isinstance(sparkplug, dict) or "namespace" not in sparkplug:
                raise ConfigError("sparkplug: needs at least 'namespace' (of the things it creates)")
            self.sparkplug = SparkplugHost(
                str(sparkplug["namespace"]),
                default_feature=str(sparkplug.get("default_feature", "metrics")),
                request_rebirth=bool(sparkplug.get("rebirth", True)),
                max_metrics=config_int(sparkplug, "max_metrics", limits.MAX_SPARKPLUG_METRICS, 1, 10_000_000),
            )
            self.sparkplug_groups = [str(g) for g in sparkplug.get("groups", ["+"])]
        if not self.mappings and self.sparkplug is None:
            raise ConfigError("nothing to do: configure 'mappings' and/or 'sparkplug'")
        url = urlsplit(str(self.mqtt_config.get("url", "mqtt://127.0.0.1:1883")))
        if url.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"mqtt.url {url.geturl()!r}: scheme must be mqtt:// or mqtts://")
        self.tls = url.scheme in ("mqtts", "ssl") or "tls" in self.mqtt_config
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if self.tls else 1883)
        self.username = self.mqtt_config.get("username", url.username)
        self.password = self.mqtt_config.get("password", url.password)
        self.protocol = _protocol(self.mqtt_config.get("protocol", 5))
        self.qos = int(self.mqtt_config.get("qos", 1))
        # Acknowledge QoS 1 messages once their rows are fsynced in the spool (default), or as
        # paho receives them (faster; a crash of the adapter may lose the last batch).
        self.ack_after_spool = bool(self.mqtt_config.get("ack_after_spool", True))
        self.client_id = str(self.mqtt_config.get("client_id", f"twinstore-{forwarder.source}"))
        self.received = 0
        self.unmatched = 0
        self.commands = 0
        self.dropped: Counter[str] = Counter()  # messages dropped undecoded, by reason
        self._client: _Client | None = None
        self._inbox: _Inbox | None = None
        self._connected = asyncio.Event()
        self.subscribed = asyncio.Event()  # the broker granted the subscriptions (once)

    @property
    def subscriptions(self) -> list[str]:
        topics = [m.subscription for m in self.mappings]
        topics += [f"{SPARKPLUG}/{g}/#" for g in self.sparkplug_groups]
        return list(dict.fromkeys(topics))

    # -- MQTT client ---------------------------------------------------------------------------

    def _make_client(self, loop: asyncio.AbstractEventLoop) -> _Client:
        v5 = self.protocol == MQTTProtocolVersion.MQTTv5
        clean_start = bool(self.mqtt_config.get("clean_start", False))
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            clean_session=None if v5 else clean_start,
            manual_ack=self.ack_after_spool,
        )
        if self.username is not None:
            client.username_pw_set(str(self.username), None if self.password is None else str(self.password))
        if self.tls:
            tls = self.mqtt_config.get("tls") or {}
            client.tls_set(
                ca_certs=tls.get("ca"),
                certfile=tls.get("cert"),
                keyfile=tls.get("key"),
                cert_reqs=ssl.CERT_NONE if tls.get("insecure") else ssl.CERT_REQUIRED,
            )
            if tls.get("insecure"):
                client.tls_insecure_set(True)
        client.reconnect_delay_set(1, 10)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.error("MQTT connect refused: %s", reason, extra={"broker": f"{self.host}:{self.port}"})
                return
            log.info(
                "MQTT connected", extra={"broker": f"{self.host}:{self.port}", "client_id": self.client_id}
            )
            c.subscribe([(topic, self.qos) for topic in self.subscriptions])
            loop.call_soon_threadsafe(self._connected.set)

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(self._connected.clear)
            if self._client is not None:
                log.warning("MQTT disconnected: %s", reason, extra={"broker": f"{self.host}:{self.port}"})

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            assert self._inbox is not None
            # An oversized payload is not kept: the inbox holds thousands of messages.
            body = bytes(msg.payload) if len(msg.payload) <= self.max_payload_bytes else None
            self._inbox.put((msg.topic, body, msg.mid, msg.qos, int(time.time() * 1000)))

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
            if refused := [str(r) for r in reasons if r.is_failure]:
                log.error("MQTT subscription refused: %s", refused, extra={"topics": self.subscriptions})
            loop.call_soon_threadsafe(self.subscribed.set)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = int(self.mqtt_config.get("session_expiry", 3600))
            # How many unacknowledged QoS 1 messages the broker may send us (we ack after the
            # spool's fsync); MQTT 3.1.1 brokers use their own limit (mosquitto: 20).
            properties.ReceiveMaximum = int(self.mqtt_config.get("receive_maximum", 1000))
        client.connect_async(
            self.host,
            self.port,
            keepalive=int(self.mqtt_config.get("keepalive", 30)),
            clean_start=clean_start if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        return client

    async def run(self) -> None:
        """Run until cancelled (the Forwarder must be started)."""
        loop = asyncio.get_running_loop()
        self._inbox = _Inbox(loop, self.queue_size)
        self._client = self._make_client(loop)
        self._client.loop_start()
        log.info("MQTT adapter running", extra={"subscriptions": self.subscriptions})
        tasks = [
            asyncio.create_task(self._ingest(), name="mqtt-ingest"),
            asyncio.create_task(self._commands(), name="mqtt-commands"),
            asyncio.create_task(self._report(), name="mqtt-report"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            client, self._client = self._client, None
            self._inbox.closed = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    # -- source -> twin ------------------------------------------------------------------------

    def decode(
        self, topic: str, payload: bytes, received_ms: int
    ) -> tuple[list[Update], list[tuple[str, bytes]]]:
        """Rows of one message, and MQTT messages to publish in answer (Sparkplug rebirths)."""
        if self.sparkplug is not None and topic.startswith(SPARKPLUG + "/"):
            outcome = self.sparkplug.handle(topic, payload, received_ms)
            return outcome.updates, outcome.publish
        for mapping in self.mappings:
            variables = mapping.match(topic)
            if variables is not None:
                return mapping.updates(topic, payload, variables), []
        self.unmatched += 1
        return [], []

    def _rows(self, topic: str, payload: bytes | None, received_ms: int) -> tuple[list[Update], list[Answer]]:
        """:meth:`decode`, or nothing for a message to drop (logged and counted)."""
        if payload is None or len(payload) > self.max_payload_bytes:
            return self._drop(topic, limits.TOO_LARGE)
        try:
            return self.decode(topic, payload, received_ms)
        except RecursionError:  # msgspec's JSON decoder recurses per nesting level
            return self._drop(topic, limits.TOO_DEEP)
        except Exception as exc:  # whatever a device sends must not end the adapter
            return self._drop(topic, limits.UNDECODABLE, type(exc).__name__)

    def _drop(self, topic: str, reason: str, error: str | None = None) -> tuple[list[Update], list[Answer]]:
        self.dropped[reason] += 1
        log.warning(
            "MQTT message dropped: %s",
            reason,
            extra={
                "topic": topic[:300],
                "error": error,
                "max_payload_bytes": self.max_payload_bytes,
                "dropped": sum(self.dropped.values()),
            },
        )
        return [], []

    async def _ingest(self) -> None:
        assert self._inbox is not None
        while True:
            batch = await self._inbox.take(self.batch_rows, self.batch_ms / 1000)
            rows: list[Update] = []
            answers: list[tuple[str, bytes]] = []
            for topic, payload, _, _, received_ms in batch:
                got, publish = self._rows(topic, payload, received_ms)
                rows.extend(got)
                answers.extend(publish)
            await self.forwarder.send_updates(rows)  # durable when it returns
            self.received += len(batch)
            client = self._client
            if client is None:
                return
            if self.ack_after_spool:
                client.ack_many([(mid, qos) for _, _, mid, qos, _ in batch if qos > 0])
            for topic, body in answers:
                client.publish(topic, body, qos=0)

    # -- twin -> source ------------------------------------------------------------------------

    def command(self, thing_id: str, feature: str, path: str, value: Any) -> tuple[str, bytes, int] | None:
        """(topic, payload, qos) that asks the device to take a desired value; None if unmapped."""
        if self.sparkplug is not None:
            found = self.sparkplug.command(thing_id, feature, path, value)
            if found is not None:
                return found[0], found[1], 0  # Sparkplug: NCMD/DCMD are QoS 0
        for mapping in self.mappings:
            target = mapping.command(thing_id, feature, path, value)
            if target is not None:
                return target[0], target[1], 1
        return None

    async def _commands(self) -> None:
        if not any(m.command_topic for m in self.mappings) and self.sparkplug is None:
            return
        async for envelope in self.forwarder.desired_changes(None):
            for desired in desired_values(envelope):
                target = self.command(desired.thing_id, desired.feature, desired.path, desired.value)
                if target is None:
                    continue
                await self._publish(*target, thing_id=desired.thing_id)

    async def _publish(self, topic: str, payload: bytes, qos: int, *, thing_id: str) -> None:
        """Publish a command once MQTT is connected; QoS 1 waits for the broker's ack."""
        while True:
            await self._connected.wait()
            client = self._client
            if client is None:
                return
            info = client.publish(topic, payload, qos=qos)
            try:
                if qos > 0:
                    await asyncio.to_thread(info.wait_for_publish, 10)
                    if not info.is_published():
                        raise RuntimeError("no PUBACK within 10 s")
                self.commands += 1
                log.info("desired value sent", extra={"thing_id": thing_id, "topic": topic})
                return
            except (RuntimeError, ValueError) as exc:
                log.warning("command publish failed, retrying: %s", exc, extra={"topic": topic})
                await asyncio.sleep(1.0)

    async def _report(self, every: float = 60.0) -> None:
        while True:
            await asyncio.sleep(every)
            log.info(
                "mqtt adapter",
                extra={
                    "received": self.received,
                    "unmatched": self.unmatched,
                    "commands": self.commands,
                    "published": self.forwarder.published,
                    "pending": self.forwarder.pending,
                    "sparkplug_seq_gaps": self.sparkplug.seq_gaps if self.sparkplug else 0,
                    "sparkplug_dropped": self.sparkplug.dropped if self.sparkplug else 0,
                    "dropped": dict(self.dropped),
                    "dropped_rows": dict(self.forwarder.dropped_rows),
                    "dropped_messages": self.forwarder.dropped_messages,
                },
            )


async def run(config: dict[str, Any]) -> None:
    """``twinstore-adapter mqtt``: run until cancelled (SIGTERM), then flush and stop."""
    forwarder = forwarder_from_config(config, default_source="mqtt")
    adapter = MqttAdapter(config, forwarder)  # validates the configuration before anything starts
    await forwarder.start()
    try:
        await adapter.run()
    finally:
        await forwarder.stop()
