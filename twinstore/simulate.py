"""``twinstore simulate``: a small simulated plant whose twins change live.

Each pump of the plant (``--things N``, things ``<namespace>:pump-<i>``) has two kinds of
devices, each playing a real protocol against the real adapters:

* a **PLC**: one asyncua OPC UA server (``opc.tcp://127.0.0.1:4840/twinstore/simulate/``,
  namespace ``urn:twinstore:simulate``) with, per pump, the variables ``<pump>.Speed`` (Double,
  rpm, writable: the speed set point), ``.Current``, ``.Voltage``, ``.Pressure`` and
  ``.FlowRate``; ``twinstore-adapter opcua`` maps them to ``features/pump/properties/...``
  and writes ``features/pump/desiredProperties/speed`` to ``<pump>.Speed``;
* **sensors** publishing over MQTT (``twinstore-sim/<namespace>/<pump>/<feature>/<property>``,
  payload ``{"value": v, "ts": ms}``): vibration (two accelerometers), motor and fluid
  temperature, and the simulation's ground truth (``simulation/anomaly``,
  ``simulation/scenario``); ``twinstore-adapter mqtt`` maps them to the features of those names.

The signals are SKAB's (Skoltech Anomaly Benchmark: a water pump test bed): with the data set
at hand (``--dataset DIR``, found at ``../shared/datasets/skab`` otherwise) its CSV files are
replayed, one row per tick, each pump starting at another file; without it synthetic signals
with the same means and noise, and now and then an anomaly episode (a closed valve, rotor
imbalance, cavitation, hot fluid) are generated. The pump's speed scales them: flow with the
speed, pressure with its square, the current with its cube, vibration about linearly; the
actual speed follows the set point within a few seconds.

The simulator creates (replaces) a policy ``<namespace>:simulation`` and the things through the
HTTP API, writes the adapters' configurations under ``<data_dir>/simulate/<namespace>/`` and
runs both adapters as child processes (``twinstore-adapter mqtt|opcua --config FILE``, logs
next to their configurations). Without an MQTT broker only the OPC UA path runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from twinstore.bus.connection import servers
from twinstore.cli import DEV_INGEST_SUBJECT
from twinstore.model.partition import DEFAULT_PARTITIONS
from twinstore.settings import Settings

__all__ = ["Pump", "SkabReplay", "Synthetic", "run", "skab_files"]

log = logging.getLogger("twinstore.simulate")

NS_URI = "urn:twinstore:simulate"
TOPIC_ROOT = "twinstore-sim"
NOMINAL_RPM = 1500.0
MAX_RPM = 3000.0
RAMP_SECONDS = 3.0  # time constant of the actual speed following the set point

# SKAB's columns (a CSV header of the data set: datetime;<these>;anomaly;changepoint)
SKAB_COLUMNS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)


@dataclass(frozen=True)
class Signal:
    column: str  # SKAB column
    channel: str  # "opcua" (the PLC) or "mqtt" (the sensors)
    feature: str
    prop: str
    unit: str
    digits: int

    @property
    def node(self) -> str:
        """The PLC variable's name (OPC UA signals)."""
        return self.prop[0].upper() + self.prop[1:]


SIGNALS = (
    Signal("Accelerometer1RMS", "mqtt", "vibration", "accelerometer1RMS", "g", 6),
    Signal("Accelerometer2RMS", "mqtt", "vibration", "accelerometer2RMS", "g", 6),
    Signal("Temperature", "mqtt", "temperature", "motor", "°C", 3),
    Signal("Thermocouple", "mqtt", "temperature", "fluid", "°C", 3),
    Signal("Current", "opcua", "pump", "current", "A", 4),
    Signal("Voltage", "opcua", "pump", "voltage", "V", 2),
    Signal("Pressure", "opcua", "pump", "pressure", "bar", 4),
    Signal("Volume Flow RateRMS", "opcua", "pump", "flowRate", "l/min", 2),
)
SPEED = Signal("", "opcua", "pump", "speed", "rpm", 1)


class SimulateError(Exception):
    """A problem the user can fix (printed without a traceback, exit status 2)."""


# -- signals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    values: dict[str, float]  # SKAB column -> value at nominal speed
    anomaly: bool
    scenario: str


def skab_files(root: Path) -> list[Path]:
    """The CSV files of a SKAB directory, in replay order: valve1, valve2, other (numbered
    experiments), then the long anomaly-free run."""
    files: list[Path] = []
    for folder in ("valve1", "valve2", "other", "anomaly-free"):
        found = (root / folder).glob("*.csv")
        files += sorted(found, key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 30, p.stem))
    return files


class SkabReplay:
    """SKAB rows, one per :meth:`next`, starting at file ``start`` and going round the files.

    Rows with a missing or unparsable value are skipped; the ``anomaly`` label (absent in the
    anomaly-free file) becomes :attr:`Sample.anomaly`.
    """

    def __init__(self, root: Path, files: list[Path], start: int = 0) -> None:
        if not files:
            raise SimulateError(f"no SKAB CSV files under {root}")
        self.root = root
        self.files = files
        self.index = start % len(files)
        self._rows: Iterator[dict[str, str]] | None = None
        self._file: IO[str] | None = None
        self.scenario = ""

    def _open(self) -> None:
        self.close()
        path = self.files[self.index]
        self._file = path.open(newline="", encoding="utf-8")
        self._rows = csv.DictReader(self._file, delimiter=";")
        self.scenario = f"skab:{path.relative_to(self.root).as_posix()}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def next(self, dt: float = 1.0) -> Sample:
        for _ in range(2 * len(self.files) + 1):
            if self._rows is None:
                self._open()
            assert self._rows is not None
            for row in self._rows:
                try:
                    values = {c: float(row[c]) for c in SKAB_COLUMNS}
                    anomaly = float(row.get("anomaly") or 0) > 0
                except (KeyError, TypeError, ValueError):
                    continue
                if all(math.isfinite(v) for v in values.values()):
                    return Sample(values, anomaly, self.scenario)
            self._rows = None
            self.index = (self.index + 1) % len(self.files)
        raise SimulateError(f"no usable rows in the SKAB files under {self.root}")


# Means and standard deviations of SKAB's anomaly-free run.
BASE = {
    "Accelerometer1RMS": (0.2126, 0.0047),
    "Accelerometer2RMS": (0.2684, 0.0040),
    "Current": (2.403, 0.4865),
    "Pressure": (0.1113, 0.2533),
    "Temperature": (89.47, 0.667),
    "Thermocouple": (28.47, 0.731),
    "Voltage": (228.6, 10.98),
    "Volume Flow RateRMS": (125.2, 1.605),
}

# Anomaly episodes of the synthetic signals, after SKAB's experiments:
# column -> (factor, offset, extra noise in standard deviations), at full strength.
ANOMALIES: dict[str, dict[str, tuple[float, float, float]]] = {
    "inlet-valve-closed": {
        "Volume Flow RateRMS": (0.55, 0.0, 2.0),
        "Pressure": (1.0, -0.6, 0.0),
        "Current": (0.9, 0.0, 0.0),
        "Accelerometer1RMS": (1.15, 0.0, 1.0),
        "Accelerometer2RMS": (1.1, 0.0, 1.0),
    },
    "outlet-valve-closed": {
        "Volume Flow RateRMS": (0.5, 0.0, 2.0),
        "Pressure": (1.0, 0.8, 0.0),
        "Current": (0.85, 0.0, 0.0),
    },
    "rotor-imbalance": {
        "Accelerometer1RMS": (1.8, 0.0, 2.0),
        "Accelerometer2RMS": (1.5, 0.0, 2.0),
        "Current": (1.05, 0.0, 0.0),
        "Temperature": (1.0, 1.5, 0.0),
    },
    "cavitation": {
        "Accelerometer1RMS": (1.2, 0.0, 6.0),
        "Accelerometer2RMS": (1.2, 0.0, 6.0),
        "Volume Flow RateRMS": (0.85, 0.0, 4.0),
        "Pressure": (1.0, -0.8, 1.0),
    },
    "hot-fluid": {"Thermocouple": (1.0, 12.0, 0.0), "Temperature": (1.0, 3.0, 0.0)},
}


class Synthetic:
    """SKAB-like signals without the data set: each column its anomaly-free mean plus smooth
    noise (AR(1)) of its standard deviation; an anomaly episode (20-90 s, ramped in and out)
    starts every ``mean_interval`` seconds on average.

    >>> gen = Synthetic(random.Random(1), mean_interval=60.0)
    >>> samples = [gen.next(1.0) for _ in range(1200)]
    >>> normal = [s.values["Volume Flow RateRMS"] for s in samples if not s.anomaly]
    >>> 123 < sum(normal) / len(normal) < 127.5
    True
    >>> {s.scenario for s in samples} - {"normal"} <= set(ANOMALIES), any(s.anomaly for s in samples)
    (True, True)
    """

    def __init__(self, rng: random.Random, mean_interval: float = 180.0) -> None:
        self.rng = rng
        self.mean_interval = mean_interval
        self.noise = dict.fromkeys(BASE, 0.0)
        self.episode: tuple[str, float, float] | None = None  # kind, elapsed, duration

    def next(self, dt: float = 1.0) -> Sample:
        rng = self.rng
        phi = math.exp(-dt / 5.0)  # noise correlated over about 5 s
        for column in self.noise:
            self.noise[column] = phi * self.noise[column] + math.sqrt(1 - phi * phi) * rng.gauss(0, 1)
        if self.episode is None and rng.random() < dt / self.mean_interval:
            self.episode = (rng.choice(sorted(ANOMALIES)), 0.0, rng.uniform(20.0, 90.0))
        effects: dict[str, tuple[float, float, float]] = {}
        strength = 0.0
        scenario = "normal"
        if self.episode is not None:
            kind, elapsed, duration = self.episode
            elapsed += dt
            if elapsed >= duration:
                self.episode = None
            else:
                self.episode = (kind, elapsed, duration)
                strength = min(1.0, elapsed / 5.0, (duration - elapsed) / 5.0)
                effects, scenario = ANOMALIES[kind], kind
        values = {}
        for column, (mean, std) in BASE.items():
            factor, offset, extra = effects.get(column, (1.0, 0.0, 0.0))
            value = mean + std * self.noise[column]
            value = value * (1 + (factor - 1) * strength) + offset * strength
            value += std * extra * strength * rng.gauss(0, 1)
            values[column] = value
        return Sample(values, strength > 0, scenario)


def scale(values: dict[str, float], speed: float) -> dict[str, float]:
    """Values at nominal speed scaled to ``speed`` (rpm), after the affinity laws.

    >>> values = scale({"Volume Flow RateRMS": 100.0, "Pressure": 1.0, "Current": 2.0, "Voltage": 230.0}, 750)
    >>> {column: round(value, 3) for column, value in values.items()}
    {'Volume Flow RateRMS': 50.0, 'Pressure': 0.25, 'Current': 0.6, 'Voltage': 230.0}
    """
    r = max(speed, 0.0) / NOMINAL_RPM
    factors = {
        "Volume Flow RateRMS": r,
        "Pressure": r * r,
        "Current": 0.2 + 0.8 * r**3,
        "Accelerometer1RMS": 0.1 + 0.9 * r,
        "Accelerometer2RMS": 0.1 + 0.9 * r,
    }
    return {column: value * factors.get(column, 1.0) for column, value in values.items()}


@dataclass
class Pump:
    name: str
    thing_id: str
    signals: SkabReplay | Synthetic
    setpoint: float = NOMINAL_RPM
    speed: float = NOMINAL_RPM  # actual speed, following the set point
    last_scenario: tuple[bool, str] | None = None

    def step(self, dt: float) -> tuple[Sample, dict[str, float]]:
        """The next sample, and its values at the pump's actual speed."""
        self.speed += (self.setpoint - self.speed) * (1 - math.exp(-dt / RAMP_SECONDS))
        sample = self.signals.next(dt)
        return sample, scale(sample.values, self.speed)


# -- the PLC (OPC UA server) --------------------------------------------------------------------


class Plc:
    """The pumps' PLC: an asyncua server with a Speed set point and the measured values."""

    def __init__(self, host: str, port: int, pumps: list[str]) -> None:
        self.url = f"opc.tcp://{host}:{port}/twinstore/simulate/"
        self.pumps = pumps
        self.server: Any = None
        self.nodes: dict[tuple[str, str], Any] = {}

    @staticmethod
    def node_id(pump: str, name: str) -> str:
        return f"nsu={NS_URI};s={pump}.{name}"

    async def start(self) -> None:
        from asyncua import ua
        from asyncua.server.server import Server

        server = Server()
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("twinstore simulated plant PLC")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(NS_URI)
        for pump in self.pumps:
            obj = await server.nodes.objects.add_object(
                ua.NodeId(ua.String(pump), ua.Int16(ns)), ua.QualifiedName(pump, ns)
            )
            for signal_ in (SPEED, *(s for s in SIGNALS if s.channel == "opcua")):
                initial = NOMINAL_RPM if signal_ is SPEED else 0.0
                node = await obj.add_variable(
                    ua.NodeId(ua.String(f"{pump}.{signal_.node}"), ua.Int16(ns)),
                    ua.QualifiedName(signal_.node, ns),
                    ua.Variant(initial, ua.VariantType.Double),
                )
                if signal_ is SPEED:
                    await node.set_writable()
                self.nodes[pump, signal_.node] = node
        try:
            await server.start()
        except OSError as exc:
            raise SimulateError(f"the PLC cannot listen on {self.url}: {exc} (try --opcua-port)") from exc
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            with contextlib.suppress(Exception):
                await server.stop()

    async def setpoint(self, pump: str) -> float:
        """The Speed set point; one outside 0..MAX_RPM is clamped (and written back, so the
        twin shows what the PLC accepted)."""
        node = self.nodes[pump, SPEED.node]
        value = await node.read_value()
        try:
            wanted = float(value)
        except (TypeError, ValueError):
            wanted = NOMINAL_RPM
        clamped = min(max(wanted, 0.0) if math.isfinite(wanted) else NOMINAL_RPM, MAX_RPM)
        if clamped != wanted:
            await self.write(pump, SPEED.node, clamped)
        return clamped

    async def write(self, pump: str, name: str, value: float) -> None:
        from asyncua import ua

        now: Any = datetime.now(UTC)  # ua.DateTime is datetime
        data = ua.DataValue(
            ua.Variant(value, ua.VariantType.Double), SourceTimestamp=now, ServerTimestamp=now
        )
        await self.server.write_attribute_value(self.nodes[pump, name].nodeid, data)


# -- the sensors (MQTT publisher) ---------------------------------------------------------------


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Sensors:
    """The pumps' sensors: one paho client publishing QoS 1 values."""

    def __init__(self, url: str, client_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        parts = urllib.parse.urlsplit(url)
        self.tls = parts.scheme in ("mqtts", "ssl")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or (8883 if self.tls else 1883)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if parts.username:
            self.client.username_pw_set(
                urllib.parse.unquote(parts.username),
                urllib.parse.unquote(parts.password) if parts.password else None,
            )
        if self.tls:
            self.client.tls_set()
        self.published = 0
        self.retained: set[str] = set()

    def start(self) -> None:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def publish(self, topic: str, value: Any, ts_ms: int, retain: bool = False) -> None:
        self.client.publish(topic, json.dumps({"value": value, "ts": ts_ms}), qos=1, retain=retain)
        self.published += 1
        if retain:
            self.retained.add(topic)

    def stop(self) -> None:
        """Clear the retained messages (the adapter is gone by now) and disconnect."""
        with contextlib.suppress(Exception):
            for info in [self.client.publish(t, b"", qos=1, retain=True) for t in sorted(self.retained)]:
                info.wait_for_publish(2.0)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


# -- the adapters (child processes) -------------------------------------------------------------


# Runs a command with the parent-death signal SIGTERM (Linux prctl PR_SET_PDEATHSIG, kept
# across exec): an adapter stops by itself when the simulator is killed (kill -9 too).
_ORPHAN_GUARD = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


class Adapter:
    """``twinstore-adapter <kind> --config FILE`` as a child process, logging to a file; it
    stops by itself when the simulator dies (on Linux)."""

    def __init__(self, kind: str, workdir: Path, config: dict[str, Any]) -> None:
        import yaml

        self.kind = kind
        self.config_path = workdir / f"{kind}.yaml"
        self.log_path = workdir / f"{kind}-adapter.log"
        self.pid_path = workdir / f"{kind}-adapter.pid"
        header = (
            "# written by `twinstore simulate` at each start: "
            f"twinstore-adapter {kind} --config {self.config_path.name}\n"
        )
        self.config_path.write_text(header + yaml.safe_dump(config, sort_keys=False))
        self.proc: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        script = Path(sys.executable).parent / "twinstore-adapter"
        prefix = [str(script)] if script.is_file() else [sys.executable, "-m", "adapters.cli"]
        command = [*prefix, self.kind, "--config", str(self.config_path), "--log-format", "text"]
        if sys.platform == "linux":
            return [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), *command]
        return command

    def stop_leftover(self) -> None:
        """Stop an adapter a killed simulator left running on this configuration."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            return
        if str(self.config_path) in cmdline and "adapter" in cmdline:
            log.warning("stopping the %s adapter left running (pid %d)", self.kind, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def start(self) -> None:
        self.stop_leftover()
        with self.log_path.open("ab") as out:
            # A session of its own: Ctrl-C stops the simulator, which then stops the adapter.
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self.proc.pid}\n")

    @property
    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("the %s adapter did not stop in %.0f s: killing it", self.kind, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.pid_path.unlink(missing_ok=True)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# -- the HTTP API -------------------------------------------------------------------------------


class Api:
    """twinstore's HTTP API with basic authentication (urllib: no dependency beyond the service's)."""

    def __init__(self, url: str, user: str) -> None:
        self.url = url.rstrip("/")
        self.auth = "Basic " + base64.b64encode(user.encode()).decode() if user else None

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.auth is not None:
            request.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    async def acall(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await asyncio.to_thread(self.call, method, path, body)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                status, _ = await self.acall("GET", "/ready")
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise SimulateError(
                    f"twinstore does not answer at {self.url} (start `make run` or `twinstore serve` "
                    "first, or give --api-url)"
                )
            if not said:
                print(f"waiting for twinstore at {self.url} ...", flush=True)
                said = True
            await asyncio.sleep(0.5)


def _check(what: str, status: int, body: Any, ok: tuple[int, ...] = (200, 201, 204)) -> None:
    if status not in ok:
        hint = " (wrong --user?)" if status in (401, 403) else ""
        raise SimulateError(f"{what}: HTTP {status}{hint}: {body}")


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the simulation needs, resolved from the settings and options."""

    namespace: str
    things: int
    rate: float
    api_url: str
    user: str
    nats_url: str
    nats_prefix: str
    partitions: int
    mqtt_url: str | None
    opcua_host: str
    opcua_port: int
    dataset: Path | None
    workdir: Path
    duration: float | None
    status_interval: float
    seed: int | None
    grants: list[str] = field(default_factory=list)

    @property
    def policy_id(self) -> str:
        return f"{self.namespace}:simulation"

    def pump_names(self) -> list[str]:
        return [f"pump-{i}" for i in range(1, self.things + 1)]

    def source(self, kind: str) -> str:
        return f"simulate-{self.namespace}-{kind}"

    def subjects(self, kind: str) -> list[str]:
        """Who a source writes as: integration:<source> (configure it in ingest_sources), or
        the development default (ingest_default_subjects of `make run`), or --grant ones."""
        return [f"integration:{self.source(kind)}", DEV_INGEST_SUBJECT, *self.grants]


def find_nats(data_dir: Path) -> str | None:
    """The URL of the embedded NATS a running ``twinstore serve`` (``make run``) started under
    ``data_dir``: its pid file names the ports file it writes."""
    try:
        pid = int((data_dir / "nats.pid").read_text().strip())
        urls = json.loads((data_dir / f"nats-server_{pid}.ports").read_text())["nats"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not urls:
        return None
    url = str(urls[0])
    return url if reachable(*_host_port(url, 4222)) else None


def default_dataset() -> Path | None:
    """SKAB at ``$TWINSTORE_SKAB_DIR``, else at ``../shared/datasets/skab`` from the working
    directory or from the source tree."""
    env = os.environ.get("TWINSTORE_SKAB_DIR")
    candidates = [Path(env)] if env else []
    candidates += [
        Path("../shared/datasets/skab"),
        Path(__file__).resolve().parents[2] / "shared/datasets/skab",
    ]
    for path in candidates:
        if path.is_dir() and skab_files(path):
            return path.resolve()
    return None


def plan(settings: Settings, args: argparse.Namespace) -> Plan:
    data_dir = Path(settings.data_dir).resolve()
    nats_url = settings.nats_url or find_nats(data_dir)
    if nats_url is None:
        raise SimulateError(
            f"no NATS: no running twinstore with embedded servers under {data_dir} (start `make run` "
            "first, or give --data-dir of the running server, or --nats-url / TWINSTORE_NATS_URL)"
        )
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if args.dataset in ("synthetic", "none", ""):
        dataset = None
    elif args.dataset is not None:
        dataset = Path(args.dataset).resolve()
        if not skab_files(dataset):
            raise SimulateError(f"--dataset {args.dataset}: no SKAB CSV files (valve1/, other/, ...) there")
    else:
        dataset = default_dataset()
    if not 0 < args.rate <= 100:
        raise SimulateError("--rate must be above 0 and at most 100 (samples per second)")
    if not 1 <= args.things <= 1000:
        raise SimulateError("--things must be 1..1000")
    namespace = args.namespace
    if not all(part[:1].isalpha() and part.replace("_", "a").isalnum() for part in namespace.split(".")):
        raise SimulateError(f"--namespace {namespace!r} is not a Ditto namespace (like org.acme)")
    return Plan(
        namespace=namespace,
        things=args.things,
        rate=args.rate,
        api_url=args.api_url or f"http://{host}:{settings.port}",
        user=args.user,
        nats_url=nats_url,
        nats_prefix=settings.nats_prefix,
        # the server's count: the simulator, like any publisher, has no database to read it from
        partitions=settings.partitions or DEFAULT_PARTITIONS,
        mqtt_url=None if args.mqtt_url in ("none", "") else args.mqtt_url,
        opcua_host=args.opcua_host,
        opcua_port=args.opcua_port,
        dataset=dataset,
        workdir=data_dir / "simulate" / namespace,
        duration=args.duration,
        status_interval=args.status_interval,
        seed=args.seed,
        grants=list(args.grant or []),
    )


# -- the twins ----------------------------------------------------------------------------------


def policy(plan: Plan, owners: list[str]) -> dict[str, Any]:
    """The simulation's policy: the caller owns everything; the sensors' source may write the
    sensor features, the PLC's source the pump's properties (and nothing else)."""

    def entry(subjects: list[str], kind: str, resources: dict[str, list[str]]) -> dict[str, Any]:
        return {
            "subjects": {s: {"type": kind} for s in dict.fromkeys(subjects)},
            "resources": {r: {"grant": grant, "revoke": []} for r, grant in resources.items()},
        }

    sensors = {f"thing:/features/{f}": ["READ", "WRITE"] for f in ("vibration", "temperature", "simulation")}
    return {
        "entries": {
            "owner": entry(
                owners,
                "twinstore simulate: the user who started it",
                {r: ["READ", "WRITE"] for r in ("thing:/", "policy:/", "message:/")},
            ),
            "sensors": entry(plan.subjects("mqtt"), "MQTT sensors (twinstore-adapter mqtt)", sensors),
            "plc": entry(
                plan.subjects("opcua"),
                "PLC (twinstore-adapter opcua)",
                {"thing:/features/pump/properties": ["READ", "WRITE"]},
            ),
        }
    }


def thing(plan: Plan, pump: str, signals: str) -> dict[str, Any]:
    units: dict[str, dict[str, str]] = {}
    for s in (SPEED, *SIGNALS):
        units.setdefault(s.feature, {})[s.prop] = s.unit
    return {
        "policyId": plan.policy_id,
        "attributes": {
            "type": "centrifugal pump (simulated)",
            "site": f"twinstore simulate ({plan.namespace})",
            "signals": signals,
            "nominalSpeed": NOMINAL_RPM,
            "units": units,
        },
        "features": {
            "pump": {"properties": {}, "desiredProperties": {}},
            "vibration": {"properties": {}},
            "temperature": {"properties": {}},
            "simulation": {"properties": {}},
        },
    }


async def create_twins(api: Api, plan: Plan, signals: list[str]) -> None:
    status, me = await api.acall("GET", "/api/2/whoami")
    _check("who am I (GET /api/2/whoami)", status, me, (200,))
    owners = list(me.get("subjects") or [me["defaultSubject"]])
    status, body = await api.acall("PUT", f"/api/2/policies/{plan.policy_id}", policy(plan, owners))
    _check(f"creating the policy {plan.policy_id}", status, body)
    for name, label in zip(plan.pump_names(), signals, strict=True):
        thing_id = f"{plan.namespace}:{name}"
        status, body = await api.acall("PUT", f"/api/2/things/{thing_id}", thing(plan, name, label))
        _check(f"creating the thing {thing_id}", status, body)


# -- adapter configurations ---------------------------------------------------------------------


def opcua_config(plan: Plan, plc_url: str) -> dict[str, Any]:
    nodes = []
    for pump in plan.pump_names():
        for signal_ in (SPEED, *(s for s in SIGNALS if s.channel == "opcua")):
            nodes.append(
                {
                    "node_id": Plc.node_id(pump, signal_.node),
                    "thing_id": f"{plan.namespace}:{pump}",
                    "path": f"/features/{signal_.feature}/properties/{signal_.prop}",
                    "writable": signal_ is SPEED,
                }
            )
    return {
        "source": plan.source("opcua"),
        "nats_url": plan.nats_url,
        "nats_prefix": plan.nats_prefix,
        "partitions": plan.partitions,
        "spool_dir": str(plan.workdir / "spool-opcua"),
        "spool_max_bytes": 64 << 20,
        "opcua": {"endpoint": plc_url, "publishing_interval": 100, "sampling_interval": 0},
        "nodes": nodes,
    }


def mqtt_config(plan: Plan) -> dict[str, Any]:
    assert plan.mqtt_url is not None
    return {
        "source": plan.source("mqtt"),
        "nats_url": plan.nats_url,
        "nats_prefix": plan.nats_prefix,
        "partitions": plan.partitions,
        "spool_dir": str(plan.workdir / "spool-mqtt"),
        "spool_max_bytes": 64 << 20,
        "mqtt": {
            "url": plan.mqtt_url,
            "client_id": f"twinstore-sim-{plan.namespace}-adapter",
            "session_expiry": 300,
        },
        "mappings": [
            {
                "topic": f"{TOPIC_ROOT}/{plan.namespace}/{{thing}}/{{feature}}/{{property}}",
                "thing": f"{plan.namespace}:{{thing}}",
                "value": "/value",
                "timestamp": "/ts",
            }
        ],
    }


# -- running ------------------------------------------------------------------------------------


def _signals(plan: Plan) -> list[SkabReplay | Synthetic]:
    rng = random.Random(plan.seed)
    if plan.dataset is None:
        return [Synthetic(random.Random(rng.random())) for _ in range(plan.things)]
    files = skab_files(plan.dataset)
    return [SkabReplay(plan.dataset, files, i) for i in range(plan.things)]


async def _watch_refusals(plan: Plan) -> Any:
    """Log the ingest refusals of our sources (say, a source the server does not know)."""
    import nats

    from twinstore.bus.ingest import IngestSubjects

    subject = IngestSubjects(plan.nats_prefix, plan.partitions).errors_subject
    ours = {plan.source("mqtt"), plan.source("opcua")}
    seen: set[str] = set()

    async def on_report(msg: Any) -> None:
        try:
            report = json.loads(msg.data)
        except ValueError:
            return
        if report.get("source") not in ours:
            return
        error = (report.get("error") or {}).get("error", "")
        if error in seen:
            return
        seen.add(error)
        hint = ""
        if error == "ingest:source.unknown":
            hint = (
                f' -- configure ingest_sources = {{"{plan.source("mqtt")}": '
                f'["integration:{plan.source("mqtt")}"], "{plan.source("opcua")}": '
                f'["integration:{plan.source("opcua")}"]}} in the server, or run it in development '
                f"mode (ingest_default_subjects {DEV_INGEST_SUBJECT})"
            )
        log.error("twinstore refuses the simulated values: %s%s", report.get("reason"), hint)

    nc = await nats.connect(servers(plan.nats_url), max_reconnect_attempts=-1)
    await nc.subscribe(subject, cb=on_report)
    return nc


def _banner(plan: Plan, plc: Plc, signals: list[str], mqtt: bool, api: Api) -> str:
    first = f"{plan.namespace}:pump-1"
    user = f"-u {plan.user} " if plan.user else ""
    lines = [
        f"simulating {plan.things} pump(s) at {plan.rate:g} Hz; signals: {signals[0]}"
        + (" ..." if len(set(signals)) > 1 else ""),
        f"  PLC     {plc.url} (OPC UA) -> twinstore-adapter opcua, source {plan.source('opcua')}",
    ]
    if mqtt:
        lines.append(
            f"  sensors {plan.mqtt_url} topics {TOPIC_ROOT}/{plan.namespace}/# -> twinstore-adapter mqtt, "
            f"source {plan.source('mqtt')}"
        )
    else:
        lines.append(f"  sensors: no MQTT broker at {plan.mqtt_url}: only the PLC (OPC UA) path runs")
    lines += [
        f"  twins   {', '.join(f'{plan.namespace}:{p}' for p in plan.pump_names()[:5])}"
        + (" ..." if plan.things > 5 else "")
        + f" (policy {plan.policy_id}); adapter logs in {plan.workdir}",
        "watch:",
        f"  curl {user}{api.url}/api/2/things/{first}",
        f"  curl -N {user}-H 'Accept: text/event-stream' "
        f"'{api.url}/api/2/things?namespaces={plan.namespace}'",
        "set the speed (rpm; the PLC gets an OPC UA write, the confirmed value comes back in properties):",
        f"  curl {user}-X PUT -H 'Content-Type: application/json' "
        f"{api.url}/api/2/things/{first}/features/pump/desiredProperties/speed -d 1200",
        "Ctrl-C stops the simulation.",
    ]
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


async def _status(api: Api, plan: Plan) -> None:
    """One line per pump (at most 3) as the twin shows it."""
    for pump in plan.pump_names()[:3]:
        status, body = await api.acall("GET", f"/api/2/things/{plan.namespace}:{pump}")
        if status != 200 or not isinstance(body, dict):
            print(f"{pump}: HTTP {status}", flush=True)
            continue
        features = body.get("features") or {}

        def prop(feature: str, name: str, features: dict[str, Any] = features) -> Any:
            return ((features.get(feature) or {}).get("properties") or {}).get(name)

        sim = "ANOMALY " + str(prop("simulation", "scenario")) if prop("simulation", "anomaly") else "normal"
        print(
            f"twin {plan.namespace}:{pump}: speed {_fmt(prop('pump', 'speed'), 0)} rpm, "
            f"flow {_fmt(prop('pump', 'flowRate'))} l/min, "
            f"pressure {_fmt(prop('pump', 'pressure'), 3)} bar, "
            f"current {_fmt(prop('pump', 'current'))} A, "
            f"vibration {_fmt(prop('vibration', 'accelerometer1RMS'), 4)}"
            f"/{_fmt(prop('vibration', 'accelerometer2RMS'), 4)} g, "
            f"motor {_fmt(prop('temperature', 'motor'), 1)} °C, "
            f"fluid {_fmt(prop('temperature', 'fluid'), 1)} °C "
            f"[{sim}]",
            flush=True,
        )


async def _tick(plan: Plan, pumps: list[Pump], plc: Plc, sensors: Sensors | None, dt: float) -> None:
    ts_ms = int(time.time() * 1000)
    for pump in pumps:
        pump.setpoint = await plc.setpoint(pump.name)
        sample, values = pump.step(dt)
        for s in SIGNALS:
            value = round(values[s.column], s.digits)
            if s.channel == "opcua":
                await plc.write(pump.name, s.node, value)
            elif sensors is not None:
                sensors.publish(
                    f"{TOPIC_ROOT}/{plan.namespace}/{pump.name}/{s.feature}/{s.prop}", value, ts_ms
                )
        label = (sample.anomaly, sample.scenario)
        if sensors is not None and label != pump.last_scenario:
            topic = f"{TOPIC_ROOT}/{plan.namespace}/{pump.name}/simulation"
            # retained: sent only on change, and an adapter (re)subscribing gets the current one
            sensors.publish(f"{topic}/anomaly", sample.anomaly, ts_ms, retain=True)
            sensors.publish(f"{topic}/scenario", sample.scenario, ts_ms, retain=True)
            pump.last_scenario = label


async def simulate(plan: Plan) -> int:
    api = Api(plan.api_url, plan.user)
    await api.wait_ready(60.0)
    sources = _signals(plan)
    labels = [
        f"SKAB replay from skab:{s.files[s.index].relative_to(s.root).as_posix()}"
        if isinstance(s, SkabReplay)
        else "synthetic SKAB-like signals (no SKAB data set found)"
        for s in sources
    ]
    await create_twins(api, plan, labels)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    pumps = [
        Pump(name, f"{plan.namespace}:{name}", src)
        for name, src in zip(plan.pump_names(), sources, strict=True)
    ]
    plc = Plc(plan.opcua_host, plan.opcua_port, plan.pump_names())
    sensors: Sensors | None = None
    adapters: list[Adapter] = []
    refusals: Any = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    failed = 0
    try:
        await plc.start()
        adapters.append(Adapter("opcua", plan.workdir, opcua_config(plan, plc.url)))
        if plan.mqtt_url is not None and reachable(*_host_port(plan.mqtt_url, 1883)):
            sensors = Sensors(plan.mqtt_url, f"twinstore-sim-{plan.namespace}-sensors")
            await asyncio.to_thread(sensors.start)
            adapters.append(Adapter("mqtt", plan.workdir, mqtt_config(plan)))
        elif plan.mqtt_url is not None:
            log.warning("no MQTT broker at %s: only the PLC (OPC UA) path runs", plan.mqtt_url)
        for adapter in adapters:
            await adapter.start()
        with contextlib.suppress(Exception):
            refusals = await asyncio.wait_for(_watch_refusals(plan), 5.0)
        print(_banner(plan, plc, labels, sensors is not None, api), flush=True)
        dt = 1.0 / plan.rate
        began = next_tick = next_status = time.monotonic()
        next_status += min(plan.status_interval, 5.0) if plan.status_interval > 0 else math.inf
        while not stop.is_set():
            for adapter in adapters:
                if adapter.exited is not None:
                    print(
                        f"twinstore simulate: the {adapter.kind} adapter exited "
                        f"with status {adapter.exited}; "
                        f"its log ({adapter.log_path}):\n{adapter.tail()}",
                        file=sys.stderr,
                    )
                    failed = 1
                    stop.set()
            if stop.is_set():
                break
            await _tick(plan, pumps, plc, sensors, dt)
            now = time.monotonic()
            if plan.duration is not None and now - began >= plan.duration:
                break
            if now >= next_status:
                next_status = now + plan.status_interval
                with contextlib.suppress(Exception):
                    await _status(api, plan)
            next_tick = max(next_tick + dt, now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next_tick - time.monotonic())
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        print("stopping the simulation ...", file=sys.stderr, flush=True)
        for adapter in adapters:
            await adapter.stop()
        if sensors is not None:
            await asyncio.to_thread(sensors.stop)
        await plc.stop()
        if refusals is not None:
            with contextlib.suppress(Exception):
                await refusals.close()
        for src in sources:
            if isinstance(src, SkabReplay):
                src.close()
    return failed


def run(settings: Settings, args: argparse.Namespace) -> int:
    """``twinstore simulate``: the exit status (0 stopped, 1 an adapter failed, 2 a set-up problem)."""
    # asyncua warns that a server without security cannot verify users: that is the point here
    logging.getLogger("asyncua").setLevel(max(logging.getLogger().level, logging.ERROR))
    logging.getLogger("nats").setLevel(max(logging.getLogger().level, logging.WARNING))
    try:
        return asyncio.run(simulate(plan(settings, args)))
    except SimulateError as exc:
        print(f"twinstore simulate: {exc}", file=sys.stderr)
        return 2
