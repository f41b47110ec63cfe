"""MQTT adapter throughput (issue 6): MQTT messages/s into NATS JetStream, against a raw loop.

Runs a private Mosquitto (queues unbounded, so no QoS 1 message is dropped while a subscriber
lags) and uses the machine's NATS (``TWINSTORE_TEST_NATS_URL``). Two scenarios per subject:

* **backlog**: the subscriber's persistent session is created, the subscriber stopped, N
  messages published (QoS 1), then the subscriber started: how fast it drains the backlog into
  NATS (the adapter alone on the CPU, the broker delivering as fast as it is acknowledged);
* **live**: the subscriber runs while a publisher process sends N messages as fast as it can
  (publisher, broker, subscriber and NATS share the 2 cores).

Subjects: ``twinstore-adapter mqtt`` (its own process: mapping, batching, fsynced spool,
JetStream acks, MQTT acks after the spool) and the **raw** baseline, a minimal paho -> nats-py
loop in its own process (auto-ack QoS 1, every MQTT message published as one JetStream message,
acks awaited in windows of 1,000; no mapping, no spool, no batching). The rate is rows (MQTT
messages) seen on the ingest subjects between the first and the last, by a core NATS
subscriber in this process.

    .venv/bin/python bench/adapter_mqtt.py [--messages 100000] [--things 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import nats
import nats.js.api
import paho.mqtt.client as mqtt
import psutil
import yaml
from benchlib import (
    ROOT,
    Verdict,
    _cpu_model,
    _git_commit,
    _memory_gib,
    command_line,
    markdown_table,
    summary,
    write_section,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from twinstore.bus.ingest import IngestSubjects, decode_telemetry

TARGET = 10_000  # MQTT messages/s into NATS (issue 6)
PARTITIONS = 16
PUBLISHERS = 2  # publisher processes in the live scenario (one paho client publishes ~5,000/s here)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A private broker: unbounded queues and inflight windows, no persistence."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.config = root / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mosquitto:
        binary = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.config)], stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


# -- roles run as their own processes ---------------------------------------------------------


def publish(port: int, prefix: str, messages: int, things: int) -> None:
    """Publish ``messages`` JSON values (QoS 1) over ``things`` topics, as fast as paho goes."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"pub-{secrets.token_hex(3)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.monotonic()
    info = None
    for i in range(messages):
        body = json.dumps({"value": i, "ts": 1_700_000_000_000 + i})
        info = client.publish(f"{prefix}/org.bench/t{i % things}/temp/value", body, qos=1)
        while len(client._out_messages) > 5000:  # keep paho's queue bounded
            time.sleep(0.001)
    if info is not None:
        info.wait_for_publish(60)
    elapsed = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"published": messages, "seconds": elapsed}), flush=True)


def raw(port: int, nats_url: str, prefix: str, client_id: str) -> None:
    """The baseline: paho (QoS 1, auto-ack) -> one JetStream message per MQTT message."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        items: deque[bytes] = deque()
        wake = asyncio.Event()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )

        def on_connect(c: mqtt.Client, *_: Any) -> None:
            c.subscribe(f"{prefix}/#", qos=1)

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            items.append(msg.payload)
            loop.call_soon_threadsafe(wake.set)

        client.on_connect = on_connect
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        props.ReceiveMaximum = 1000
        client.connect("127.0.0.1", port, clean_start=False, properties=props)
        client.loop_start()
        nc = await nats.connect(nats_url)
        js = nc.jetstream(publish_async_max_pending=1000)
        subject = IngestSubjects(prefix, PARTITIONS).partition_subject(0)
        while not stop.is_set():
            if not items:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.2)
                continue
            while items:
                await js.publish_async(subject, items.popleft())
            await js.publish_async_completed()
        client.disconnect()
        client.loop_stop()
        await nc.close()

    asyncio.run(main())


# -- the driver -------------------------------------------------------------------------------


class Counter:
    """Rows on the ingest subjects (telemetry rows, or raw messages), first and last arrival."""

    def __init__(self, telemetry: bool) -> None:
        self.telemetry = telemetry
        self.rows = 0
        self.first = 0.0
        self.last = 0.0

    async def on(self, msg: Any) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.last = now
        self.rows += len(decode_telemetry(msg.data)) if self.telemetry else 1

    async def wait(self, expect: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.rows < expect and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.rows >= expect


OVERRIDES: dict[str, Any] = {}  # --set key=value (adapter configuration, top level or mqtt.key)


def start_subscriber(
    kind: str, port: int, nats_url: str, prefix: str, workdir: Path
) -> subprocess.Popen[bytes]:
    client_id = f"sub-{prefix}"
    if kind == "raw":
        args = [
            sys.executable,
            __file__,
            "--role",
            "raw",
            "--port",
            str(port),
            "--nats-url",
            nats_url,
            "--prefix",
            prefix,
            "--client-id",
            client_id,
        ]
    else:
        config = {
            "nats_url": nats_url,
            "nats_prefix": prefix,
            "partitions": PARTITIONS,
            "source": f"bench-{prefix}",
            "spool_dir": str(workdir / "spool"),
            "mqtt": {"url": f"mqtt://127.0.0.1:{port}", "client_id": client_id, "session_expiry": 600},
            "mappings": [
                {
                    "topic": f"{prefix}/{{namespace}}/{{thing}}/{{feature}}/{{property}}",
                    "value": "/value",
                    "timestamp": "/ts",
                }
            ],
        }
        for key, value in OVERRIDES.items():
            section, _, name = key.rpartition(".")
            (config[section] if section else config)[name] = value
        path = workdir / "adapter.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        args = [
            str(Path(sys.executable).parent / "twinstore-adapter"),
            "mqtt",
            "--config",
            str(path),
            "--log-level",
            "warning",
        ]
    return subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_publisher(port: int, prefix: str, messages: int, things: int) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        __file__,
        "--role",
        "publish",
        "--port",
        str(port),
        "--prefix",
        prefix,
        "--messages",
        str(messages),
        "--things",
        str(things),
    ]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE)


async def scenario(
    kind: str, mode: str, port: int, nats_url: str, messages: int, things: int
) -> dict[str, Any]:
    prefix = f"bm{secrets.token_hex(3)}"
    subjects = IngestSubjects(prefix, PARTITIONS)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        nats.js.api.StreamConfig(
            name=subjects.stream, subjects=subjects.all_subjects, storage=nats.js.api.StorageType.FILE
        )
    )
    counter = Counter(telemetry=kind == "adapter")
    sub = await nc.subscribe(f"{prefix}.ingest.*", cb=counter.on)
    workdir = Path(tempfile.mkdtemp(prefix="bench-adapter-"))
    try:
        # a first run creates the persistent session and proves the path works end to end
        proc = start_subscriber(kind, port, nats_url, prefix, workdir)
        for _ in range(200):
            publisher = run_publisher(port, prefix, 1, things)
            publisher.communicate()
            if await counter.wait(1, 0.5):
                break
        warm = counter.rows
        counter.rows, counter.first, counter.last = 0, 0.0, 0.0
        cpu = None
        published: dict[str, Any] = {}
        if mode == "backlog":
            stop(proc)
            out, _ = run_publisher(port, prefix, messages, things).communicate()
            published = json.loads(out)
            proc = start_subscriber(kind, port, nats_url, prefix, workdir)
            cpu = psutil.Process(proc.pid)
            cpu.cpu_percent()
            done = await counter.wait(messages, 300)
        else:
            cpu = psutil.Process(proc.pid)
            cpu.cpu_percent()
            share = messages // PUBLISHERS
            pubs = [run_publisher(port, prefix, share, things) for _ in range(PUBLISHERS)]
            done = await counter.wait(share * PUBLISHERS, 300)
            reports = [json.loads(p.communicate()[0]) for p in pubs]
            published = {
                "published": sum(r["published"] for r in reports),
                "seconds": max(r["seconds"] for r in reports),
            }
        cores = cpu.cpu_percent() / 100 if cpu is not None else 0.0
        stop(proc)
        span = max(counter.last - counter.first, 1e-9)
        return {
            "subject": kind,
            "mode": mode,
            "rows": counter.rows,
            "complete": done and counter.rows == (messages if mode == "backlog" else share * PUBLISHERS),
            "rate": (counter.rows - 1) / span,
            "publish_rate": published.get("published", 0) / max(published.get("seconds", 1e-9), 1e-9),
            "cores": cores,
            "warm": warm,
            "load": os.getloadavg()[0],
        }
    finally:
        await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_stream(subjects.stream)
        await nc.close()


async def drive(args: argparse.Namespace) -> None:
    nats_url = args.nats_url or os.environ.get("TWINSTORE_TEST_NATS_URL") or "nats://127.0.0.1:4222"
    results = []
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp)) as broker:
        for mode in args.modes.split(","):
            for kind in args.subjects.split(","):
                result = await scenario(kind, mode, broker.port, nats_url, args.messages, args.things)
                print(result, flush=True)
                results.append(result)
    rows = []
    verdicts = []
    raw = {r["mode"]: r for r in results if r["subject"] != "adapter"}
    for r in results:
        cell = "-"
        if r["subject"] == "adapter":
            verdict = Verdict(
                f"twinstore-adapter mqtt, {r['mode']}",
                f"{r['rate']:,.0f}/s",
                f"≥ {TARGET:,}/s",
                r["rate"] >= TARGET and r["complete"],
            )
            verdicts.append(verdict)
            cell = verdict.cell()
        base = raw.get(r["mode"])
        rows.append(
            [
                "twinstore-adapter mqtt" if r["subject"] == "adapter" else "raw paho -> nats-py loop",
                r["mode"],
                f"{r['rows']:,}" + ("" if r["complete"] else " (incomplete)"),
                f"{r['rate']:,.0f}/s",
                f"{r['rate'] / base['rate']:.2f}x" if base and base["rate"] else "-",
                f"{r['publish_rate']:,.0f}/s" if r["mode"] == "live" else "(before)",
                f"{r['cores']:.2f}",
                f"{r['load']:.1f}",
                cell,
            ]
        )
    table = markdown_table(
        [
            "subscriber",
            "scenario",
            "messages into NATS",
            "rate",
            "rate vs raw loop (same scenario)",
            "publisher",
            "subscriber cores",
            "load",
            "target",
        ],
        rows,
    )
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout.split(
        "\n"
    )[0]
    notes = [
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"machine: {os.cpu_count()} cores ({_cpu_model()}), {_memory_gib()}, {platform.platform()}",
        f"Python {platform.python_version()}, twinstore commit {_git_commit()}; "
        f"{mosquitto} (private, unbounded queues); the machine's NATS ({nats_url}), "
        f"ingest stream with file storage, {PARTITIONS} partitions",
        f'{args.messages:,} MQTT messages (QoS 1, MQTT 5, JSON `{{"value": i, "ts": ms}}`) over '
        f"{args.things:,} topics `<prefix>/org.bench/t<i>/temp/value`, mapped by "
        "`<prefix>/{namespace}/{thing}/{feature}/{property}`",
        "adapter defaults: batches of ≤ 500 rows / 20 ms, spool fsynced per batch, JetStream ack "
        "awaited per NATS message (one per partition per batch), MQTT PUBACK after the spool; "
        "Receive Maximum 1,000",
        f"live: {PUBLISHERS} publisher processes (QoS 1, 1,000 in flight each), 'publisher' = their "
        "combined rate; backlog: published before the subscriber starts",
        "rate: MQTT messages (rows) seen on the ingest subjects by a core NATS subscriber, from the "
        "first to the last; 'subscriber cores': CPU of the subscriber process over the phase; "
        "everything shares the 2 cores (other sessions' work too: load average in the table)",
    ]
    text = "\n".join(
        [
            "## MQTT adapter throughput (issue 6) (bench/adapter_mqtt.py)",
            "",
            "```",
            command_line(),
            "```",
            "",
            *(f"- {n}" for n in notes),
            "",
            table,
            "",
            summary(notes, verdicts),
        ]
    )
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "adapter-mqtt", text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--things", type=int, default=1_000)
    parser.add_argument("--nats-url")
    parser.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    parser.add_argument("--modes", default="backlog,live", help="scenarios (backlog,live)")
    parser.add_argument("--subjects", default="adapter,raw", help="subscribers (adapter,raw)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="adapter configuration override, e.g. batch_rows=1000 or mqtt.receive_maximum=2000",
    )
    parser.add_argument("--role", choices=["publish", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for item in args.set:
        key, _, value = item.partition("=")
        OVERRIDES[key] = yaml.safe_load(value)
    if args.role == "publish":
        publish(args.port, args.prefix, args.messages, args.things)
    elif args.role == "raw":
        raw(args.port, args.nats_url, args.prefix, args.client_id)
    else:
        asyncio.run(drive(args))


if __name__ == "__main__":
    main()
