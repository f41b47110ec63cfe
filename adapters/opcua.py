"""OPC UA adapter: subscriptions to a server's variables → telemetry rows on NATS, and
``desiredProperties`` changes → writes to the mapped variables.

``twinstore-adapter opcua --config FILE`` runs :func:`run`. A configuration (YAML; TOML with
the same keys works too; the keys every adapter shares, ``source``, ``nats_url``,
``nats_prefix``, ``partitions`` (the server's), ``spool_dir``, ``spool_max_bytes``, are in
:mod:`adapters.cli`)::

    source: plc-1
    opcua:
      endpoint: opc.tcp://plc-1.local:4840/
      username: twin                         # optional, with password
      password: secret
      security:                              # optional; policy None (the default) needs nothing else
        policy: Basic256Sha256               # or None
        mode: SignAndEncrypt                 # or Sign
        certificate: adapter-cert.der        # the adapter's application instance certificate (DER or PEM)
        private_key: adapter-key.pem
        server_certificate: plc-cert.der     # pins the server; without it the endpoint's is taken
      publishing_interval: 100               # ms: how often the server sends what changed
      sampling_interval: 0                   # ms, default of every node; 0: every change
      queue_size: 100                        # per node, on the server: changes kept between publishes
    nodes:
      - node_id: ns=2;s=Pump1.Flow           # or nsu=urn:acme:plc;s=Pump1.Flow
        thing_id: org.acme:pump-1
        path: /features/flow/properties/value
      - browse_path: /2:Pump1/2:Speed        # OPC UA relative path from the Objects folder
        thing_id: org.acme:pump-1
        path: /features/speed/properties/value
        sampling_interval: 500
        writable: false                      # never written from desiredProperties
    batch_rows: 500                          # rows per send_updates, or
    batch_ms: 20                             # at most this long after the first change
    queue_size: 100000                       # changes received but not yet batched (then: reconnect)

Every data change of a node becomes one :class:`~twinstore.bus.ingest.Update` per mapping:
the value as JSON (timestamps ISO-8601, byte strings base64, structures as objects), the
``SourceTimestamp`` (else the ``ServerTimestamp``) in ms, and the status code's name as quality
(``Good``, ``BadSensorFailure``; a bad value without a value sends ``null``). A value larger than
``max_row_bytes`` (a ByteString or String of megabytes, a big array) is dropped before it is
converted, logged and counted in ``dropped``; a NaN or Infinity is dropped by the forwarder
(JSON cannot carry it, ``null`` would delete the property). Rows are handed
to :class:`~adapters.base.Forwarder` in batches (``batch_rows`` rows or ``batch_ms`` after
the first, whichever comes first); the forwarder spools them durably.

A lost connection (server stopped, network down, subscription timed out) ends the session:
the adapter reconnects with backoff, resolves node ids and browse paths again (a restarted
server may have renumbered its namespaces) and subscribes again; the first notification of each
node then carries its current value. Changes buffered on the client when the connection drops
are still sent; changes the server made while no client was connected are not seen (OPC UA
keeps no history for a subscription that is gone).

The other direction: an event that sets ``/features/<f>/desiredProperties/<p>`` of a mapped
``/features/<f>/properties/<p>`` is written to that node, converted to the node's data type
(read once per session). The latest desired value per node waits while the server is away and
is written after the reconnect. The device's resulting data change comes back as any other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

import msgspec
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import DataChangeEvent, OverflowPolicy, StatusChangeEvent, Subscription
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509

from adapters import limits
from adapters.base import (
    COMMON_KEYS,
    ConfigError,
    Forwarder,
    desired_values,
    forwarder_from_config,
    refuse_replaced_keys,
)
from twinstore.bus.ingest import Update

__all__ = ["Connection", "NodeMapping", "OpcUaAdapter", "OpcUaConfig", "Security", "parse_config", "run"]

log = logging.getLogger("adapters.opcua")


# -- configuration ----------------------------------------------------------------------------


class Security(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    policy: Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = "None"
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: str | None = None
    private_key: str | None = None
    private_key_password: str | None = None
    server_certificate: str | None = None
    application_uri: str | None = None  # default: the URI in the certificate's subjectAltName


class Connection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    endpoint: str
    username: str | None = None
    password: str | None = None
    security: Security = msgspec.field(default_factory=Security)
    publishing_interval: float = 100.0  # ms
    sampling_interval: float = 0.0  # ms, default of every node
    queue_size: int = 100  # per monitored item, on the server
    request_timeout: float = 10.0  # s
    watchdog_interval: float = 5.0  # s: a silent server is probed this often, lost after as long
    reconnect_max_delay: float = 10.0  # s


class NodeMapping(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    thing_id: str
    path: str
    node_id: str | None = None
    browse_path: str | None = None
    sampling_interval: float | None = None
    writable: bool = True


class OpcUaConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    opcua: Connection
    nodes: list[NodeMapping]
    batch_rows: int = 500
    batch_ms: float = 20.0
    queue_size: int = 100_000  # notifications received but not yet batched; beyond: reconnect

    def __post_init__(self) -> None:
        for i, node in enumerate(self.nodes):
            if (node.node_id is None) == (node.browse_path is None):
                raise ValueError(f"nodes[{i}]: give exactly one of node_id and browse_path")
            if not node.path.startswith("/") or ":" not in node.thing_id:
                raise ValueError(f"nodes[{i}]: thing_id must be 'namespace:name' and path a JSON pointer")
        security = self.opcua.security
        if security.policy != "None" and not (security.certificate and security.private_key):
            raise ValueError(f"opcua.security: policy {security.policy} needs certificate and private_key")


def parse_config(config: dict[str, Any]) -> OpcUaConfig:
    """The OPC UA part of the configuration; :class:`~adapters.base.ConfigError` naming what is
    wrong (an unknown key too: a typo must not silently fall back to a default)."""
    refuse_replaced_keys(config)
    try:
        return msgspec.convert({k: v for k, v in config.items() if k not in COMMON_KEYS}, OpcUaConfig)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"OPC UA adapter: {exc}") from exc


# -- values -----------------------------------------------------------------------------------

_PLAIN = (float, int, str, bool, type(None))


def to_json(value: Any) -> Any:
    """An OPC UA value as JSON (what a telemetry row carries); NaN and Infinity stay floats
    (the forwarder drops such a row).

    >>> to_json([1.5, ua.LocalizedText("on"), datetime(2026, 1, 2, tzinfo=UTC), b"\\x01"])
    [1.5, 'on', '2026-01-02T00:00:00Z', 'AQ==']
    """
    if type(value) in _PLAIN:
        return value
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, datetime):
        return _aware(value).isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    if isinstance(value, ua.Variant):
        return to_json(value.Value)
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.NodeId | ua.QualifiedName):
        return value.to_string()
    if isinstance(value, ua.StatusCode):
        return value.name
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, ua.XmlElement):
        return value.Value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    return str(value)


def too_large(value: Any, max_bytes: int) -> bool:
    """Whether ``value`` is certainly larger than ``max_bytes`` as JSON, told without
    converting it (a ByteString of megabytes would first become a base64 string of more).

    >>> too_large(b"x" * 300, 200), too_large("x" * 100, 200), too_large(list(range(150)), 200)
    (True, False, True)
    """
    if isinstance(value, ua.Variant):
        value = value.Value
    if isinstance(value, bytes | bytearray):
        return len(value) * 4 // 3 > max_bytes
    if isinstance(value, str):
        return len(value) > max_bytes
    if isinstance(value, list | tuple):
        return 2 * len(value) > max_bytes  # each element and its comma: two bytes at least
    return False


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _millis(ts: datetime | None) -> int | None:
    return None if ts is None else int(_aware(ts).timestamp() * 1000)


_INT_RANGES = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}


def to_variant(value: Any, vtype: ua.VariantType) -> ua.Variant:
    """A JSON value as a Variant of the node's type; ``ValueError`` if it does not fit.

    >>> to_variant(3.0, ua.VariantType.Int16)
    Variant(Value=3, VariantType=<VariantType.Int16: 4>, Dimensions=None, is_array=False)
    """
    if isinstance(value, list):
        return ua.Variant([_coerce(v, vtype) for v in value], vtype, is_array=True)
    return ua.Variant(_coerce(value, vtype), vtype)


def _coerce(value: Any, vtype: ua.VariantType) -> Any:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if vtype is ua.VariantType.Boolean and isinstance(value, bool):
        return value
    if vtype in _INT_RANGES and number and float(value).is_integer():
        low, high = _INT_RANGES[vtype]
        if low <= int(value) <= high:
            return int(value)
        raise ValueError(f"{value} is out of the range of {vtype.name}")
    if vtype in (ua.VariantType.Float, ua.VariantType.Double) and number:
        return float(value)
    if vtype is ua.VariantType.String and isinstance(value, str):
        return value
    if vtype is ua.VariantType.LocalizedText and isinstance(value, str):
        return ua.LocalizedText(value)
    if vtype is ua.VariantType.DateTime and isinstance(value, str):
        return _aware(datetime.fromisoformat(value))
    if vtype is ua.VariantType.ByteString and isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise ValueError(f"{value!r} cannot be written to a node of type {vtype.name}")


# -- batching ---------------------------------------------------------------------------------


class Batcher:
    """Collects rows and hands them to ``send`` in batches: at most ``max_rows`` rows, at most
    ``max_delay`` seconds after the first row of a batch. :meth:`add` waits while a full batch
    is pending (backpressure to the subscription's bounded queue)."""

    def __init__(self, send: Callable[[list[Update]], Awaitable[None]], max_rows: int, max_delay: float):
        self._send = send
        self._max_rows = max_rows
        self._max_delay = max_delay
        self._rows: list[Update] = []
        self._wake = asyncio.Event()  # the buffer is no longer empty
        self._full = asyncio.Event()  # the buffer holds max_rows
        self._room = asyncio.Event()  # the buffer was taken
        self._room.set()
        self.sent = 0
        self.final_timeout = 5.0

    async def add(self, rows: list[Update]) -> None:
        while len(self._rows) >= self._max_rows:
            self._room.clear()
            await self._room.wait()
        self._rows.extend(rows)
        self._wake.set()
        if len(self._rows) >= self._max_rows:
            self._full.set()

    async def run(self) -> None:
        """Send batches until cancelled; then what is buffered is still sent (for at most
        ``final_timeout`` seconds: the spool may be full with NATS away)."""
        inflight: asyncio.Future[None] | None = None
        try:
            while True:
                await self._wake.wait()
                if len(self._rows) < self._max_rows:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self._max_delay)
                inflight = asyncio.ensure_future(self._flush())
                await asyncio.shield(inflight)  # a cancelled run lets the batch in hand finish
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(self.final_timeout):
                    if inflight is not None:
                        await inflight
                    await self._flush()
            except TimeoutError:
                log.error("stopped with %d rows unsent (the spool stayed full)", len(self._rows))
            raise

    async def _flush(self) -> None:
        rows, self._rows = self._rows, []
        self._wake.clear()
        self._full.clear()
        self._room.set()
        delay = 0.1
        while rows:
            try:
                await self._send(rows)
                self.sent += len(rows)
                return
            except Exception:  # the spool refused (a batch larger than the whole spool): keep them
                log.exception("sending %d rows failed; retrying in %.1fs", len(rows), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


# -- the adapter ------------------------------------------------------------------------------

_PROPERTY_PATH_MIN = 4  # /features/<f>/properties/<p...>
_CHUNK = 1000  # monitored items per CreateMonitoredItems call
_DRAIN_TIMEOUT = 2.0  # after a loss, how long notifications already received may still arrive
_DESIRED_WAIT = 10.0  # an event is acknowledged once written, or after this while the server is away


def _desired_key(mapping: NodeMapping) -> tuple[str, str, str] | None:
    """``(thing_id, feature, pointer inside desiredProperties)`` of a feature property mapping."""
    tokens = mapping.path.split("/")
    if len(tokens) < _PROPERTY_PATH_MIN or tokens[1] != "features" or tokens[3] != "properties":
        return None
    feature = tokens[2].replace("~1", "/").replace("~0", "~")
    return mapping.thing_id, feature, "/" + "/".join(tokens[4:]) if len(tokens) > _PROPERTY_PATH_MIN else ""


class OpcUaAdapter:
    """The adapter for one OPC UA server, sending through ``forwarder``; :meth:`run` until
    cancelled."""

    def __init__(self, config: OpcUaConfig, forwarder: Forwarder) -> None:
        self.config = config
        self.forwarder = forwarder
        self.batcher = Batcher(forwarder.send_updates, config.batch_rows, config.batch_ms / 1000)
        self.received = 0  # data changes received (all sessions)
        self.sessions = 0  # sessions that got as far as subscribing
        self.written = 0  # desired values written to nodes
        self.dropped: Counter[str] = Counter()  # data changes dropped unconverted, by reason
        self._writes: dict[tuple[str, str, str], list[int]] = {}
        for index, mapping in enumerate(config.nodes):
            key = _desired_key(mapping)
            if mapping.writable and key is not None:
                self._writes.setdefault(key, []).append(index)
        self._client: Client | None = None  # the current session's, once subscribed
        self._nodes: list[ua.NodeId | None] = []  # per mapping, resolved in the current session
        self._vtypes: dict[int, ua.VariantType] = {}
        self._connected = asyncio.Event()
        self._pending: dict[int, Any] = {}  # mapping index -> latest desired value not yet written
        self._pending_changed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.batcher.run(), name="opcua-batcher")
            tasks.create_task(self._connect_loop(), name="opcua-session")
            if self._writes:
                tasks.create_task(self._desired_loop(), name="opcua-desired")
                tasks.create_task(self._write_loop(), name="opcua-writes")

    # -- sessions ------------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        delay = 0.25
        while True:
            sessions = self.sessions
            try:
                await self._session()
                log.info("OPC UA session ended; reconnecting", extra={"endpoint": self.config.opcua.endpoint})
            except Exception as exc:  # any failure of one session: log it, start another
                log.warning(
                    "OPC UA session failed, retrying in %.1fs: %r",
                    delay,
                    exc,
                    extra={"endpoint": self.config.opcua.endpoint},
                )
            if self.sessions != sessions:
                delay = 0.25
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.opcua.reconnect_max_delay)

    async def _session(self) -> None:
        """Connect, subscribe, consume until the connection is lost."""
        config = self.config.opcua
        client = Client(
            config.endpoint, timeout=config.request_timeout, watchdog_intervall=config.watchdog_interval
        )
        lost = asyncio.Event()

        async def on_lost(exc: Exception) -> None:
            log.warning("OPC UA connection lost: %r", exc, extra={"endpoint": config.endpoint})
            lost.set()

        client.connection_lost_callback = on_lost
        await self._secure(client)
        await client.connect()
        try:
            nodes = await self._resolve(client)
            sub = await client.create_subscription(
                self.config.opcua.publishing_interval,
                None,
                queue_maxsize=self.config.queue_size,
                overflow=OverflowPolicy.DISCONNECT,  # falling behind ends the session, never silently drops
            )
            handles = await self._monitor(sub, nodes)
            self._client, self._nodes, self._vtypes = client, nodes, {}
            self._connected.set()
            self.sessions += 1
            log.info(
                "OPC UA subscribed",
                extra={"endpoint": self.config.opcua.endpoint, "monitored_items": len(handles)},
            )
            consume = asyncio.create_task(self._consume(sub, handles))
            watch = asyncio.create_task(lost.wait())
            try:
                done, _ = await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
                if consume not in done:  # what was received before the loss still goes out
                    await asyncio.wait({consume}, timeout=_DRAIN_TIMEOUT)
            finally:
                consume.cancel()
                watch.cancel()
            failure = consume.exception() if consume.done() and not consume.cancelled() else None
            if failure is not None:
                raise failure
        finally:
            self._connected.clear()
            self._client = None
            # asyncio.wait, not wait_for: on Python 3.11 wait_for waits for the cancelled
            # disconnect to end, and asyncua's may take its whole request timeout (a stopping
            # adapter was seen waiting over 15 s here); what is left of it ends on its own.
            closing = asyncio.ensure_future(client.disconnect())
            closing.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.wait({closing}, timeout=2.0)

    async def _secure(self, client: Client) -> None:
        config = self.config.opcua
        if config.username is not None:
            client.set_user(config.username)
        if config.password is not None:
            client.set_password(config.password)
        security = config.security
        if security.policy == "None":
            return
        assert security.certificate is not None and security.private_key is not None
        certificate = await uacrypto.load_certificate(security.certificate)
        client.application_uri = (
            security.application_uri or _certificate_uri(certificate) or client.application_uri
        )
        await client.set_security(
            getattr(security_policies, f"SecurityPolicy{security.policy}"),
            security.certificate,
            security.private_key,
            security.private_key_password,
            security.server_certificate,
            getattr(ua.MessageSecurityMode, security.mode),
        )

    async def _resolve(self, client: Client) -> list[ua.NodeId | None]:
        """The node id of every mapping in this session (None: unknown here, logged)."""
        namespaces = await client.get_namespace_array()
        nodes: list[ua.NodeId | None] = [None] * len(self.config.nodes)
        browse: list[int] = []
        for index, mapping in enumerate(self.config.nodes):
            if mapping.node_id is None:
                browse.append(index)
                continue
            try:
                nodes[index] = _node_id(mapping.node_id, namespaces)
            except (ValueError, UaError) as exc:
                log.error("node %r: %s", mapping.node_id, exc, extra={"thing_id": mapping.thing_id})
        if browse:
            paths = [self.config.nodes[i].browse_path or "" for i in browse]
            results = await client.translate_browsepaths(ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder)), paths)
            for index, path, result in zip(browse, paths, results, strict=True):
                if result.StatusCode.is_good() and result.Targets:
                    target = result.Targets[0].TargetId
                    nodes[index] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
                else:
                    log.error("browse path %r: %s", path, result.StatusCode.name)
        return nodes

    async def _monitor(self, sub: Subscription, nodes: list[ua.NodeId | None]) -> dict[int, list[int]]:
        """One monitored item per (node, sampling interval); client handle -> mapping indexes."""
        handles: dict[int, list[int]] = {}
        items: dict[tuple[str, float], int] = {}
        requests: list[ua.MonitoredItemCreateRequest] = []
        for index, node in enumerate(nodes):
            if node is None:
                continue
            mapping = self.config.nodes[index]
            sampling = (
                self.config.opcua.sampling_interval
                if mapping.sampling_interval is None
                else mapping.sampling_interval
            )
            handle = items.setdefault((node.to_string(), sampling), len(items) + 1)
            if handle in handles:
                handles[handle].append(index)
                continue
            handles[handle] = [index]
            params = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=sampling,
                QueueSize=self.config.opcua.queue_size,
                DiscardOldest=True,
            )
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=params,
                )
            )
        for start in range(0, len(requests), _CHUNK):
            chunk = requests[start : start + _CHUNK]
            results = await sub.create_monitored_items(chunk)
            for request, result in zip(chunk, results, strict=True):
                if isinstance(result, ua.StatusCode):
                    handle = request.RequestedParameters.ClientHandle
                    for index in handles.pop(handle):
                        log.error(
                            "cannot monitor %s: %s",
                            request.ItemToMonitor.NodeId.to_string(),
                            result.name,
                            extra={"thing_id": self.config.nodes[index].thing_id},
                        )
        return handles

    async def _consume(self, sub: Subscription, handles: dict[int, list[int]]) -> None:
        """Data changes -> rows, until the subscription reports a bad status."""
        mappings = self.config.nodes
        async for event in sub:
            if isinstance(event, DataChangeEvent):
                item = event.data.monitored_item
                indexes = handles.get(item.ClientHandle)
                if not indexes:
                    continue
                self.received += 1
                data = item.Value
                if too_large(event.value, self.forwarder.max_row_bytes):
                    self.dropped[limits.TOO_LARGE] += 1
                    log.warning(
                        "OPC UA value dropped: %s",
                        limits.TOO_LARGE,
                        extra={
                            "node": event.node.nodeid.to_string(),
                            "thing_id": mappings[indexes[0]].thing_id,
                            "path": mappings[indexes[0]].path,
                            "max_row_bytes": self.forwarder.max_row_bytes,
                            "dropped": sum(self.dropped.values()),
                        },
                    )
                    continue
                value = to_json(event.value)
                ts = _millis(data.SourceTimestamp or data.ServerTimestamp)
                quality = data.StatusCode.name if data.StatusCode is not None else "Good"
                await self.batcher.add(
                    [Update(mappings[i].thing_id, mappings[i].path, value, ts, quality) for i in indexes]
                )
            elif isinstance(event, StatusChangeEvent) and not event.notification.Status.is_good():
                log.warning("OPC UA subscription ended: %s", event.notification.Status.name)
                return

    # -- desired properties --------------------------------------------------------------------

    async def _desired_loop(self) -> None:
        things = {thing_id for thing_id, _, _ in self._writes}
        async for envelope in self.forwarder.desired_changes(things):
            for desired in desired_values(envelope):
                for index in self._writes.get((desired.thing_id, desired.feature, desired.path), ()):
                    self._pending[index] = desired.value
                    self._drained.clear()
                    self._pending_changed.set()
            # acknowledged (by asking for the next) once written, or later while the server is away
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), _DESIRED_WAIT)

    async def _write_loop(self) -> None:
        while True:
            await self._pending_changed.wait()
            await self._connected.wait()
            client, nodes = self._client, self._nodes
            self._pending_changed.clear()
            batch, self._pending = self._pending, {}
            for index, value in batch.items():
                if client is None or not await self._write(client, nodes, index, value):
                    self._pending.setdefault(index, value)  # connection gone: after the reconnect
                    self._pending_changed.set()
            if self._pending:
                await asyncio.sleep(0.2)
            else:
                self._drained.set()

    async def _write(self, client: Client, nodes: list[ua.NodeId | None], index: int, value: Any) -> bool:
        """Write one desired value; False if the connection failed (try again later)."""
        mapping = self.config.nodes[index]
        extra = {"thing_id": mapping.thing_id, "path": mapping.path}
        node_id = nodes[index]
        if node_id is None:
            log.warning("desired value not written: the node is unknown", extra=extra)
            return True
        node = client.get_node(node_id)
        try:
            vtype = self._vtypes.get(index)
            if vtype is None:
                vtype = self._vtypes[index] = await node.read_data_type_as_variant_type()
            await node.write_value(ua.DataValue(to_variant(value, vtype)))
        except (ValueError, UaStatusCodeError) as exc:
            log.warning("desired value not written to %s: %s", node_id.to_string(), exc, extra=extra)
            return True
        except (ConnectionError, OSError, TimeoutError, UaError) as exc:
            log.info("desired value waits for the connection: %r", exc, extra=extra)
            return False
        self.written += 1
        return True


def _node_id(text: str, namespaces: list[str]) -> ua.NodeId:
    """``ns=2;s=X`` or ``nsu=<uri>;s=X`` as a NodeId of this server."""
    node = ua.NodeId.from_string(text)
    uri = getattr(node, "NamespaceUri", None)
    if uri:
        if uri not in namespaces:
            raise ValueError(f"the server has no namespace {uri}")
        return ua.NodeId(node.Identifier, ua.Int16(namespaces.index(uri)), node.NodeIdType)
    return node


def _certificate_uri(certificate: x509.Certificate) -> str | None:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


async def run(config: dict[str, Any]) -> None:
    """The adapter process (``twinstore-adapter opcua --config FILE``): until cancelled."""
    settings = parse_config(config)
    forwarder = forwarder_from_config(config, default_source="opcua")
    await forwarder.start()
    try:
        await OpcUaAdapter(settings, forwarder).run()
    finally:
        await forwarder.stop()
