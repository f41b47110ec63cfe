"""The OPC UA adapter against a real asyncua server (the PLC, started here on a free port) and
real NATS JetStream: data changes arrive on the ingest stream as telemetry rows with source
timestamp and status, browse paths resolve, a restarted server is resubscribed, secured
endpoints (Basic256Sha256 Sign / SignAndEncrypt, user and password) work, and desired
properties are written to the PLC."""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import secrets
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.api
import nats.js.errors
import orjson
import pytest
import pytest_asyncio
import yaml
from asyncua import Server, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from nats.aio.client import Client as NATS

from adapters import opcua
from adapters.base import ConfigError
from tests.conftest import bounded, cancel_and_wait, eventually, free_port
from twinstore.bus.ingest import IngestSubjects, Update, decode_telemetry
from twinstore.bus.relay import ensure_events_stream
from twinstore.bus.subjects import Subjects

NS_URI = "urn:twinstore:test:plc"
THING = "org.acme:pump-1"
FLOW = "/features/flow/properties/value"
SPEED = "/features/speed/properties/value"


class Users:
    """The PLC's user manager: one user and password."""

    def __init__(self, username: str, password: str) -> None:
        self.credentials = (username, password)

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        return User(role=UserRole.User) if (username, password) == self.credentials else None


class Plc:
    """An asyncua server with ``Pump1`` (``Flow`` Double, ``Speed`` Int32, ``Temp`` Float), all
    writable. :meth:`start` again after :meth:`stop` is a restarted PLC (same port, new state)."""

    def __init__(self, port: int, *, secure: dict[str, Any] | None = None) -> None:
        self.url = f"opc.tcp://127.0.0.1:{port}/plc/"
        self.secure = secure
        self.server: Server | None = None
        self.nodes: dict[str, Any] = {}
        self.ns = 0
        self.ns_uri = NS_URI
        self.shared = False

    async def start(self, flow: float = 1.0) -> Plc:
        users = Users(*self.secure["user"]) if self.secure else None
        server = Server(user_manager=users)  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.url)
        if self.secure:
            await server.load_certificate(str(self.secure["certificate"]))
            await server.load_private_key(str(self.secure["private_key"]))
            server.set_security_policy(self.secure["policies"])
            server.set_identity_tokens([ua.UserNameIdentityToken])
            store = TrustStore([self.secure["trusted"]], [])
            await store.load()
            options = CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
            server.set_certificate_validator(CertificateValidator(options, store))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        await self._add_pump(server, flow)
        await server.start()
        self.server = server
        return self

    async def _add_pump(self, server: Server, flow: float) -> None:
        self.ns = await server.register_namespace(self.ns_uri)
        pump = await server.nodes.objects.add_object(
            ua.NodeId("Pump1", self.ns), ua.QualifiedName("Pump1", self.ns)
        )
        for name, variant in (
            ("Flow", ua.Variant(flow, ua.VariantType.Double)),
            ("Speed", ua.Variant(0, ua.VariantType.Int32)),
            ("Temp", ua.Variant(20.0, ua.VariantType.Float)),
        ):
            node = await pump.add_variable(
                ua.NodeId(f"Pump1.{name}", self.ns), ua.QualifiedName(name, self.ns), variant
            )
            await node.set_writable()
            self.nodes[name] = node

    async def new_pump(self) -> Plc:
        """A fresh ``Pump1`` (initial values) in a namespace of its own on this running PLC: what
        a test sees of a PLC of its own that it never stops. Starting an asyncua server loads its
        whole standard address space, seconds of CPU per start."""
        assert self.server is not None
        view = Plc.__new__(Plc)
        view.url, view.secure, view.server, view.nodes = self.url, None, self.server, {}
        view.ns_uri, view.shared = f"{NS_URI}:{secrets.token_hex(4)}", True
        await view._add_pump(self.server, 1.0)
        return view

    async def stop(self) -> None:
        assert not self.shared, "a pump on the module's PLC: a test that stops its PLC takes own_plc"
        if self.server is not None:
            server, self.server = self.server, None
            await bounded(server.stop(), 15, "stopping the test PLC")

    async def set(
        self, name: str, value: Any, *, status: int = ua.StatusCodes.Good, at: datetime | None = None
    ) -> None:
        vtype = {"Flow": ua.VariantType.Double, "Speed": ua.VariantType.Int32, "Temp": ua.VariantType.Float}[
            name
        ]
        data = ua.DataValue(ua.Variant(value, vtype), StatusCode=ua.StatusCode(status), SourceTimestamp=at)
        await self.nodes[name].write_value(data)

    async def value(self, name: str) -> Any:
        return await self.nodes[name].read_value()


class Received:
    """The rows on the ingest stream, read back with a JetStream pull consumer."""

    def __init__(self, nc: NATS, subjects: IngestSubjects) -> None:
        self.js = nc.jetstream()
        self.subjects = subjects
        self.rows: list[Update] = []
        self.messages: list[Any] = []
        self._sub: Any = None

    async def read(self) -> None:
        if self._sub is None:
            self._sub = await self.js.pull_subscribe(
                f"{self.subjects.prefix}.ingest.*", durable="reader", stream=self.subjects.stream
            )
        with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
            for msg in await self._sub.fetch(500, timeout=0.1):
                self.messages.append(msg)
                self.rows.extend(decode_telemetry(msg.data))
                await msg.ack()

    async def wait_for(self, check: Callable[[Update], bool], timeout: float = 10.0) -> Update:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for row in self.rows[seen:]:
                if check(row):
                    return row
            seen = len(self.rows)
            if time.monotonic() > deadline:
                raise AssertionError(f"no such row within {timeout}s; got {self.rows[-10:]}")
            await self.read()


@pytest.fixture
def received(ingest: tuple[NATS, IngestSubjects]) -> Received:
    return Received(*ingest)


@pytest_asyncio.fixture(loop_scope="session")
async def events(ingest: tuple[NATS, IngestSubjects]) -> AsyncIterator[Subjects]:
    """The events stream of the test's prefix (where the relay would publish), deleted afterwards."""
    nc, subjects = ingest
    events = Subjects(subjects.prefix)
    await ensure_events_stream(nc.jetstream(), events, 600)
    try:
        yield events
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(events.events_stream)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def module_plc() -> AsyncIterator[Plc]:
    plc = await Plc(free_port()).start()
    try:
        yield plc
    finally:
        await plc.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def plc(module_plc: Plc) -> Plc:
    """A PLC pump of the test's own (fresh nodes and values) on the module's running PLC."""
    return await module_plc.new_pump()


@pytest_asyncio.fixture(loop_scope="session")
async def own_plc() -> AsyncIterator[Plc]:
    """A PLC server of the test's own, which the test may stop and start again."""
    plc = await Plc(free_port()).start()
    try:
        yield plc
    finally:
        await plc.stop()


Runner = Callable[..., Awaitable[asyncio.Task[None]]]


@pytest_asyncio.fixture(loop_scope="session")
async def adapter(
    ingest: tuple[NATS, IngestSubjects], nats_url: str, tmp_path: Path
) -> AsyncIterator[Runner]:
    """Start ``adapters.opcua.run`` (as the CLI does) on a PLC with node mappings and options of
    the ``opcua`` section; all cancelled at the end of the test."""
    tasks: list[asyncio.Task[None]] = []

    async def start(
        plc: Plc, nodes: list[dict[str, Any]], *, source: str | None = None, **options: Any
    ) -> asyncio.Task[None]:
        config = {
            "source": source or f"plc-{secrets.token_hex(3)}",
            "nats_url": nats_url,
            "nats_prefix": ingest[1].prefix,
            "partitions": ingest[1].partitions,
            "spool_dir": str(tmp_path / f"spool-{len(tasks)}"),
            "opcua": {"endpoint": plc.url, "publishing_interval": 20, **options},
            "nodes": nodes,
        }
        task = asyncio.create_task(opcua.run(config))
        tasks.append(task)
        return task

    yield start
    # bounded: a run once hung here for over 10 minutes after the Sign test
    await cancel_and_wait(*tasks, timeout=15)


def flow_node(plc: Plc, **extra: Any) -> dict[str, Any]:
    return {"node_id": f"ns={plc.ns};s=Pump1.Flow", "thing_id": THING, "path": FLOW, **extra}


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


# ---- telemetry -------------------------------------------------------------------------------


async def test_value_change_at_the_plc_becomes_a_row_with_source_timestamp_and_quality(
    plc: Plc, adapter: Runner, received: Received
) -> None:
    await adapter(plc, [flow_node(plc)])
    first = await received.wait_for(lambda r: r.path == FLOW)
    assert (first.thing_id, first.value, first.quality) == (THING, 1.0, "Good")

    at = datetime.now(UTC) - timedelta(seconds=3)  # the device's clock, not the server's
    await plc.set("Flow", 2.5, at=at)
    row = await received.wait_for(lambda r: r.value == 2.5)
    assert row == Update(THING, FLOW, 2.5, ms(at), "Good")
    # every message carries the source's ids, and the seq grows
    seqs = [int(m.headers["Twinstore-Seq"]) for m in received.messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_without_source_timestamp_the_server_timestamp_is_taken(
    plc: Plc, adapter: Runner, received: Received
) -> None:
    await adapter(plc, [flow_node(plc)])
    await received.wait_for(lambda r: r.value == 1.0)
    before = ms(datetime.now(UTC))
    await plc.set("Flow", 3.5)  # no SourceTimestamp
    row = await received.wait_for(lambda r: r.value == 3.5)
    assert row.ts is not None and before - 1000 <= row.ts <= ms(datetime.now(UTC)) + 1000


async def test_a_bad_status_code_is_carried_as_quality(plc: Plc, adapter: Runner, received: Received) -> None:
    await adapter(plc, [flow_node(plc)])
    await received.wait_for(lambda r: r.value == 1.0)
    at = datetime.now(UTC)
    await plc.set("Flow", 0.0, status=ua.StatusCodes.BadSensorFailure, at=at)
    bad = await received.wait_for(lambda r: r.quality != "Good")
    assert bad == Update(THING, FLOW, None, ms(at), "BadSensorFailure")  # a bad value carries none
    await plc.set("Flow", 4.0, status=ua.StatusCodes.UncertainLastUsableValue)
    uncertain = await received.wait_for(lambda r: r.value == 4.0)
    assert uncertain.quality == "UncertainLastUsableValue"


async def test_browse_paths_and_several_mappings(plc: Plc, adapter: Runner, received: Received) -> None:
    other = "org.acme:pump-1-mirror"
    await adapter(
        plc,
        [
            {"browse_path": f"/{plc.ns}:Pump1/{plc.ns}:Speed", "thing_id": THING, "path": SPEED},
            {
                "node_id": f"nsu={plc.ns_uri};s=Pump1.Temp",
                "thing_id": THING,
                "path": "/features/temp/properties/value",
            },
            {"node_id": f"nsu={plc.ns_uri};s=Pump1.Temp", "thing_id": other, "path": "/attributes/temp"},
            {
                "browse_path": f"/{plc.ns}:Pump1/{plc.ns}:Nothing",
                "thing_id": THING,
                "path": "/features/x/properties/v",
            },
        ],
    )
    await received.wait_for(lambda r: r.path == SPEED and r.value == 0)
    await plc.set("Speed", 1450)
    await plc.set("Temp", 21.5)
    assert (await received.wait_for(lambda r: r.value == 1450)).path == SPEED
    await received.wait_for(lambda r: r.value == 21.5 and r.thing_id == THING)
    assert (
        await received.wait_for(lambda r: r.value == 21.5 and r.thing_id == other)
    ).path == "/attributes/temp"
    assert not [r for r in received.rows if r.path == "/features/x/properties/v"]  # unresolvable: logged


async def test_many_changes_arrive_in_order_batched(plc: Plc, adapter: Runner, received: Received) -> None:
    await adapter(
        plc, [{"node_id": f"ns={plc.ns};s=Pump1.Speed", "thing_id": THING, "path": SPEED}], queue_size=2000
    )
    await received.wait_for(lambda r: r.value == 0)
    for i in range(1, 1001):
        await plc.set("Speed", i)
    await received.wait_for(lambda r: r.value == 1000)
    values = [r.value for r in received.rows if r.path == SPEED]
    assert values == list(range(0, 1001))  # every change, in order
    assert len(received.messages) < 200  # batched, not one message per change


# ---- reconnect -------------------------------------------------------------------------------


async def test_reconnects_and_resubscribes_after_the_server_restarts(
    own_plc: Plc, adapter: Runner, received: Received
) -> None:
    plc = own_plc
    await adapter(plc, [flow_node(plc)])
    await received.wait_for(lambda r: r.value == 1.0)
    await plc.set("Flow", 5.0)
    await received.wait_for(lambda r: r.value == 5.0)

    await plc.stop()
    # the outage itself (not a wait for something): long enough for the adapter to lose the
    # session and retry against a closed port
    await asyncio.sleep(1.5)
    await plc.start(flow=6.0)
    restarted = await received.wait_for(
        lambda r: r.value == 6.0, timeout=20
    )  # current value after resubscribe
    assert restarted.quality == "Good"
    await plc.set("Flow", 7.0)
    await received.wait_for(lambda r: r.value == 7.0)
    values = [r.value for r in received.rows]
    assert values.index(5.0) < values.index(6.0) < values.index(7.0)


async def test_starts_before_the_server_is_up(adapter: Runner, received: Received) -> None:
    plc = Plc(free_port())
    await adapter(plc, [{"node_id": f"nsu={NS_URI};s=Pump1.Flow", "thing_id": THING, "path": FLOW}])
    await asyncio.sleep(1.0)  # the fault itself: the adapter runs (and retries) with no server up
    await plc.start(flow=8.0)
    try:
        await received.wait_for(lambda r: r.value == 8.0, timeout=20)
    finally:
        await plc.stop()


# ---- security --------------------------------------------------------------------------------


def make_certificate(directory: Path, name: str, uri: str, usage: x509.ObjectIdentifier) -> tuple[Path, Path]:
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost"), x509.DNSName(socket.gethostname())],
        [usage],
    )
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    server_cert, server_key = make_certificate(
        tmp_path, "plc", "urn:freeopcua:python:server", ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_cert, client_key = make_certificate(
        tmp_path, "adapter", "urn:twinstore:adapter", ExtendedKeyUsageOID.CLIENT_AUTH
    )
    stranger_cert, stranger_key = make_certificate(
        tmp_path, "stranger", "urn:someone", ExtendedKeyUsageOID.CLIENT_AUTH
    )
    (trusted / "adapter.der").write_bytes(client_cert.read_bytes())
    return {
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "stranger_cert": stranger_cert,
        "stranger_key": stranger_key,
        "trusted": trusted,
    }


@pytest.mark.parametrize("mode", ["SignAndEncrypt", "Sign"])
async def test_basic256sha256_with_certificates_and_user_password(
    mode: str, pki: dict[str, Path], adapter: Runner, received: Received
) -> None:
    policy = getattr(ua.SecurityPolicyType, f"Basic256Sha256_{mode}")
    plc = Plc(
        free_port(),
        secure={
            "certificate": pki["server_cert"],
            "private_key": pki["server_key"],
            "policies": [policy],
            "user": ("twin", "s3cret"),
            "trusted": pki["trusted"],
        },
    )
    await plc.start(flow=11.0)
    try:
        security = {
            "policy": "Basic256Sha256",
            "mode": mode,
            "certificate": str(pki["client_cert"]),
            "private_key": str(pki["client_key"]),
            "server_certificate": str(pki["server_cert"]),
        }
        # refused: no security, a wrong password, an untrusted certificate
        await adapter(plc, [flow_node(plc, thing_id="org.acme:open")], username="twin", password="s3cret")
        await adapter(
            plc,
            [flow_node(plc, thing_id="org.acme:wrong")],
            username="twin",
            password="nope",
            security=security,
        )
        stranger = {
            **security,
            "certificate": str(pki["stranger_cert"]),
            "private_key": str(pki["stranger_key"]),
        }
        await adapter(
            plc,
            [flow_node(plc, thing_id="org.acme:stranger")],
            username="twin",
            password="s3cret",
            security=stranger,
        )
        # accepted
        await adapter(plc, [flow_node(plc)], username="twin", password="s3cret", security=security)
        await received.wait_for(lambda r: r.thing_id == THING and r.value == 11.0, timeout=20)
        await plc.set("Flow", 12.0)
        await received.wait_for(lambda r: r.value == 12.0)
        await asyncio.sleep(1.0)  # an assertion of absence: no row from the three refused adapters
        await received.read()
        assert {r.thing_id for r in received.rows} == {THING}
    finally:
        await plc.stop()


def test_configuration_errors_say_what_is_wrong() -> None:
    opc = {"endpoint": "opc.tcp://x:4840"}
    with pytest.raises(ConfigError, match="exactly one of node_id and browse_path"):
        opcua.parse_config({"opcua": opc, "nodes": [{"thing_id": "a:b", "path": "/attributes/a"}]})
    with pytest.raises(ConfigError, match="needs certificate and private_key"):
        opcua.parse_config({"opcua": {**opc, "security": {"policy": "Basic256Sha256"}}, "nodes": []})
    with pytest.raises(ConfigError, match="mode"):
        opcua.parse_config({"opcua": {**opc, "security": {"mode": "Encrypt"}}, "nodes": []})
    with pytest.raises(ConfigError, match="unknown field"):
        opcua.parse_config({"opcua": opc, "nodes": [], "sampling": 5})
    with pytest.raises(ConfigError, match="opcua"):
        opcua.parse_config({"nodes": []})
    # the keys every adapter shares are not the OPC UA adapter's business
    assert (
        opcua.parse_config({"opcua": opc, "nodes": [], "source": "s", "nats": {"user": "u"}}).batch_rows
        == 500
    )


def test_the_documented_configuration_is_valid() -> None:
    doc = opcua.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    config = opcua.parse_config(yaml.safe_load(textwrap.dedent(block)))
    assert config.opcua.security.mode == "SignAndEncrypt" and len(config.nodes) == 2


# ---- desired properties ----------------------------------------------------------------------


async def publish_event(nc: Any, prefix: str, thing_id: str, action: str, path: str, value: Any) -> None:
    namespace, name = thing_id.split(":", 1)
    envelope = {
        "topic": f"{namespace}/{name}/things/twin/events/{action}",
        "path": path,
        "value": value,
        "revision": 2,
    }
    await nc.jetstream().publish(Subjects(prefix).event_subject(thing_id), orjson.dumps(envelope))


async def wait_consumer(js: Any, stream: str, durable: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.consumer_info(stream, durable)
            return
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_desired_properties_are_written_to_the_node_and_come_back(
    plc: Plc, adapter: Runner, received: Received, ingest: tuple[NATS, IngestSubjects], events: Subjects
) -> None:
    nc, prefix = ingest[0], ingest[1].prefix
    js = nc.jetstream()
    nodes = [
        flow_node(plc),
        {"node_id": f"ns={plc.ns};s=Pump1.Speed", "thing_id": THING, "path": SPEED},
        {
            "node_id": f"ns={plc.ns};s=Pump1.Temp",
            "thing_id": THING,
            "path": "/features/temp/properties/value",
            "writable": False,
        },
    ]
    task = await adapter(plc, nodes, source="plc-desired")
    await received.wait_for(lambda r: r.path == SPEED)
    await wait_consumer(js, events.events_stream, "adapter-plc-desired")

    # a leaf, converted to the node's type (Int32), and the device's change flows back
    await publish_event(nc, prefix, THING, "modified", "/features/speed/desiredProperties/value", 1500.0)
    row = await received.wait_for(lambda r: r.path == SPEED and r.value == 1500)
    assert row.quality == "Good" and await plc.value("Speed") == 1500
    # a merge higher up; an int into a Double; a read-only mapping and other things are not written
    await publish_event(
        nc,
        prefix,
        THING,
        "merged",
        "/features",
        {"flow": {"desiredProperties": {"value": 42}}, "temp": {"desiredProperties": {"value": 99.0}}},
    )
    await publish_event(
        nc, prefix, "org.acme:other", "modified", "/features/flow/desiredProperties/value", 7.0
    )
    await received.wait_for(lambda r: r.path == FLOW and r.value == 42.0)
    assert await plc.value("Flow") == 42.0 and isinstance(await plc.value("Flow"), float)
    # a value that does not fit the node's type is refused (logged), the next one goes through
    await publish_event(nc, prefix, THING, "modified", "/features/speed/desiredProperties/value", "fast")
    await publish_event(nc, prefix, THING, "modified", "/features/speed/desiredProperties/value", 2**40)
    await publish_event(nc, prefix, THING, "modified", "/features/speed/desiredProperties/value", 900)
    await received.wait_for(lambda r: r.path == SPEED and r.value == 900)
    assert await plc.value("Temp") == 20.0
    assert await plc.value("Flow") == 42.0
    assert not task.done()


async def test_a_desired_change_while_the_plc_is_away_is_written_after_the_reconnect(
    own_plc: Plc, adapter: Runner, received: Received, ingest: tuple[NATS, IngestSubjects], events: Subjects
) -> None:
    plc = own_plc
    nc, prefix = ingest[0], ingest[1].prefix
    js = nc.jetstream()
    await adapter(
        plc, [{"node_id": f"ns={plc.ns};s=Pump1.Speed", "thing_id": THING, "path": SPEED}], source="plc-away"
    )
    await received.wait_for(lambda r: r.path == SPEED)
    await wait_consumer(js, events.events_stream, "adapter-plc-away")
    await plc.stop()
    await publish_event(nc, prefix, THING, "modified", "/features/speed/desiredProperties/value", 10)
    await publish_event(nc, prefix, THING, "modified", "/features/speed/desiredProperties/value", 20)

    async def delivered() -> bool:  # both changes are in the adapter's hands while the PLC is away
        info = await js.consumer_info(events.events_stream, "adapter-plc-away")
        return info.num_pending == 0  # (acknowledged only once written)

    await eventually(delivered, 10, "the desired changes delivered to the adapter")
    await plc.start()
    await received.wait_for(lambda r: r.path == SPEED and r.value == 20, timeout=20)
    assert await plc.value("Speed") == 20


def test_doctests() -> None:
    assert doctest.testmod(opcua, optionflags=doctest.ELLIPSIS).failed == 0
