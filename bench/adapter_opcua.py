"""OPC UA adapter throughput (issue 6): OPC UA value changes/s into NATS JetStream, against the
raw asyncua subscription rate in the same run.

Three processes besides this one (and the machine's NATS, ``TWINSTORE_TEST_NATS_URL``):

* the **PLC**: an asyncua server with ``--variables`` Double variables; on command it changes
  them round-robin as fast as it can for ``--seconds`` (each change through the server's own
  ``write_attribute_value``, i.e. the address space notifies the monitored items as a device
  driver would), then reports how many changes it made;
* the subject: either ``twinstore-adapter opcua`` (the real CLI, its own process: subscription,
  rows, batching, fsynced spool, JetStream acks), or the **raw** baseline, a bare asyncua client
  in its own process with the same subscription (same publishing/sampling intervals and queue)
  whose data-change callback only counts, nothing sent anywhere.

Two scenarios: **live** (the subject receives while the PLC changes its variables: both share
the 2 cores with NATS) and **backlog** (the subject is stopped with SIGSTOP while the PLC makes
its changes, which wait in the server's monitored-item queues, then continued: how fast it
drains them with the PLC idle).

The adapter's rate is rows seen on the ingest subjects (a core NATS subscriber in this process,
telemetry decoded), from the first to the last after the PLC starts; the raw rate is callbacks
from the first to the last, counted by the raw client. Both are checked against the PLC's count
(every change must arrive).

    .venv/bin/python bench/adapter_opcua.py [--variables 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.js.api
import psutil
import yaml
from asyncua import Server, ua
from asyncua.client.client import Client
from benchlib import (
    ROOT,
    Verdict,
    _cpu_model,
    _git_commit,
    _memory_gib,
    command_line,
    markdown_table,
    process_cpu,
    summary,
    write_section,
)

from twinstore.bus.ingest import IngestSubjects, decode_telemetry

TARGET = 5_000  # OPC UA value changes/s into NATS (issue 6)
PARTITIONS = 16
PUBLISHING_MS = 100.0
QUEUE_SIZE = 1000  # per monitored item, on the server: holds a backlog scenario's changes
NS_URI = "urn:twinstore:bench:plc"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- roles run as their own processes ---------------------------------------------------------


def plc(port: int, variables: int) -> None:
    """The PLC: serves ``variables`` Doubles; ``go SECONDS`` on stdin changes them round-robin
    for that long and prints ``{"changes": n, "seconds": s}``; ``quit`` stops."""

    async def main() -> None:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/plc/")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(NS_URI)
        plant = await server.nodes.objects.add_object(ua.NodeId("Plant", ns), ua.QualifiedName("Plant", ns))
        ids = []
        for i in range(variables):
            node = await plant.add_variable(
                ua.NodeId(f"V{i}", ns), ua.QualifiedName(f"V{i}", ns), ua.Variant(0.0, ua.VariantType.Double)
            )
            ids.append(node.nodeid)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with server:
            print(json.dumps({"ready": True}), flush=True)
            total = 0  # every write a new value (an unchanged value is no data change)
            while line := (await reader.readline()).decode().split():
                if line[0] != "go":
                    break
                seconds, changes = float(line[1]), 0
                started = time.monotonic()
                while time.monotonic() - started < seconds:
                    now = datetime.now(UTC)
                    for node_id in ids:
                        total += 1
                        value = ua.DataValue(
                            ua.Variant(float(total), ua.VariantType.Double),
                            SourceTimestamp=now,
                            ServerTimestamp=now,
                        )
                        await server.write_attribute_value(node_id, value)
                        changes += 1
                    await asyncio.sleep(0)  # let the server send its publish responses
                elapsed = time.monotonic() - started
                print(json.dumps({"changes": changes, "seconds": elapsed}), flush=True)

    asyncio.run(main())


class _Counting:
    """The raw baseline's subscription handler: counts data changes, nothing else."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
        self.last = time.monotonic()
        self.first = self.first or self.last
        self.count += 1


def raw(port: int, variables: int) -> None:
    """The baseline: an asyncua client with the adapter's subscription whose callback only
    counts; prints ``{"ready": true}`` after the initial values, then, once nothing arrived for
    2 s after a change, ``{"notifications": n, "seconds": first-to-last}``."""

    async def main() -> None:
        client = Client(f"opc.tcp://127.0.0.1:{port}/plc/", timeout=30, watchdog_intervall=5.0)
        await client.connect()
        ns = await client.get_namespace_index(NS_URI)
        handler = _Counting()
        sub = await client.create_subscription(PUBLISHING_MS, handler)
        requests = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(
                    NodeId=ua.NodeId(f"V{i}", ns), AttributeId=ua.AttributeIds.Value
                ),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=i + 1, SamplingInterval=0.0, QueueSize=QUEUE_SIZE, DiscardOldest=True
                ),
            )
            for i in range(variables)
        ]
        for start in range(0, len(requests), 1000):
            await sub.create_monitored_items(requests[start : start + 1000])
        while handler.count < variables:  # the initial values
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        handler.count, handler.first, handler.last = 0, 0.0, 0.0
        print(json.dumps({"ready": True}), flush=True)
        while handler.count == 0 or time.monotonic() - handler.last < 2.0:
            await asyncio.sleep(0.1)
        print(
            json.dumps({"notifications": handler.count, "seconds": handler.last - handler.first}), flush=True
        )
        await client.disconnect()

    asyncio.run(main())


# -- the driver -------------------------------------------------------------------------------


class Plc:
    def __init__(self, variables: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--role",
                "plc",
                "--port",
                str(self.port),
                "--variables",
                str(variables),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        assert json.loads(self.line())["ready"]

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def go(self, seconds: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {seconds}\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Counter:
    """Rows on the ingest subjects: how many, when the first and the last arrived."""

    def __init__(self) -> None:
        self.rows = 0
        self.first = 0.0
        self.last = 0.0

    async def on(self, msg: Any) -> None:
        self.rows += len(decode_telemetry(msg.data))
        self.last = time.monotonic()
        self.first = self.first or self.last

    def reset(self) -> None:
        self.rows, self.first, self.last = 0, 0.0, 0.0

    async def wait(self, rows: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.rows < rows and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.rows >= rows


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def produce(plc: Plc, proc: subprocess.Popen[Any], mode: str, seconds: float) -> dict[str, Any]:
    """Let the PLC change its variables; in ``backlog`` mode the subject is stopped (SIGSTOP)
    meanwhile, so the changes wait in the server's queues, and continued afterwards."""
    if mode == "backlog":
        proc.send_signal(signal.SIGSTOP)
    plc.go(seconds)
    made: dict[str, Any] = json.loads(await asyncio.to_thread(plc.line))
    if mode == "backlog":
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGCONT)
    return made


async def run_raw(plc: Plc, mode: str, variables: int, seconds: float) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "raw", "--port", str(plc.port), "--variables", str(variables)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert json.loads(await asyncio.to_thread(proc.stdout.readline))["ready"]
    cpu = process_cpu(psutil.Process(proc.pid))
    made = await produce(plc, proc, mode, seconds)
    result = json.loads(await asyncio.to_thread(proc.stdout.readline))
    cpu = process_cpu(psutil.Process(proc.pid)) - cpu
    proc.wait(30)
    return {
        "subject": "raw",
        "mode": mode,
        "received": result["notifications"],
        "rate": result["notifications"] / max(result["seconds"], 1e-9),
        "changes": made["changes"],
        "plc_rate": made["changes"] / made["seconds"],
        "cpu_us": cpu / max(result["notifications"], 1) * 1e6,
        "load": os.getloadavg()[0],
    }


async def run_adapter(plc: Plc, mode: str, variables: int, seconds: float, nats_url: str) -> dict[str, Any]:
    prefix = f"bo{secrets.token_hex(3)}"
    subjects = IngestSubjects(prefix, PARTITIONS)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        nats.js.api.StreamConfig(
            name=subjects.stream, subjects=subjects.all_subjects, storage=nats.js.api.StorageType.FILE
        )
    )
    counter = Counter()
    sub = await nc.subscribe(f"{prefix}.ingest.*", cb=counter.on)
    workdir = Path(tempfile.mkdtemp(prefix="bench-opcua-"))
    config = {
        "source": "bench-opcua",
        "nats_url": nats_url,
        "nats_prefix": prefix,
        "partitions": PARTITIONS,
        "spool_dir": str(workdir / "spool"),
        "opcua": {
            "endpoint": f"opc.tcp://127.0.0.1:{plc.port}/plc/",
            "publishing_interval": PUBLISHING_MS,
            "sampling_interval": 0,
            "queue_size": QUEUE_SIZE,
        },
        "nodes": [
            {
                "node_id": f"nsu={NS_URI};s=V{i}",
                "thing_id": f"org.bench:plc-{i // 10}",
                "path": f"/features/v{i % 10}/properties/value",
            }
            for i in range(variables)
        ],
    }
    (workdir / "opcua.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "adapters.cli", "opcua", "--config", str(workdir / "opcua.yaml")]
    log = (workdir / "adapter.log").open("wb")
    keep = False  # the work directory (spool, log) is kept when the run fails
    proc = subprocess.Popen(
        [*command, "--log-level", "warning", "--log-format", "text"], cwd=ROOT, stderr=log
    )
    try:
        assert await counter.wait(variables, 60), "the adapter did not send the initial values"
        await asyncio.sleep(1.0)
        counter.reset()
        cpu = process_cpu(psutil.Process(proc.pid))
        made = await produce(plc, proc, mode, seconds)
        complete = await counter.wait(made["changes"], 120)
        await asyncio.sleep(0.5)  # the publisher's last acks
        cpu = process_cpu(psutil.Process(proc.pid)) - cpu
        return {
            "subject": "adapter",
            "mode": mode,
            "received": counter.rows,
            "complete": complete,
            "rate": counter.rows / max(counter.last - counter.first, 1e-9),
            "changes": made["changes"],
            "plc_rate": made["changes"] / made["seconds"],
            "cpu_us": cpu / max(counter.rows, 1) * 1e6,
            "load": os.getloadavg()[0],
        }
    except BaseException:
        print(f"adapter log: {workdir / 'adapter.log'}", file=sys.stderr)
        keep = True
        raise
    finally:
        stop(proc)
        log.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_stream(subjects.stream)
        await nc.close()


async def drive(args: argparse.Namespace) -> None:
    nats_url = args.nats_url or os.environ.get("TWINSTORE_TEST_NATS_URL") or "nats://127.0.0.1:4222"
    plc = Plc(args.variables)
    results = []
    try:
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                for subject in args.subjects.split(","):
                    if subject == "raw":
                        result = await run_raw(plc, mode, args.variables, args.seconds)
                    else:
                        result = await run_adapter(plc, mode, args.variables, args.seconds, nats_url)
                    print(result, flush=True)
                    results.append(result)
    finally:
        plc.stop()
    rows = []
    verdicts = []
    for r in results:
        complete = r["received"] == r["changes"]
        cell = "-"
        if r["subject"] == "adapter":
            verdict = Verdict(
                f"twinstore-adapter opcua, {r['mode']}",
                f"{r['rate']:,.0f}/s, {r['received']:,} of {r['changes']:,} changes",
                f"≥ {TARGET:,}/s, every change",
                r["rate"] >= TARGET and complete,
            )
            verdicts.append(verdict)
            cell = verdict.cell()
        rows.append(
            [
                "twinstore-adapter opcua" if r["subject"] == "adapter" else "raw asyncua subscription",
                r["mode"],
                f"{r['changes']:,}",
                f"{r['plc_rate']:,.0f}/s",
                f"{r['received']:,}" + ("" if complete else " (incomplete)"),
                f"{r['rate']:,.0f}/s",
                f"{r['cpu_us']:.0f} µs",
                f"{r['load']:.1f}",
                cell,
            ]
        )
    table = markdown_table(
        [
            "subject",
            "scenario",
            "PLC changes",
            "PLC rate",
            "received",
            "rate",
            "subject CPU per change",
            "load",
            "target",
        ],
        rows,
    )
    notes = [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {os.cpu_count()} cores ({_cpu_model()}), {_memory_gib()}, {platform.platform()}, "
        "shared with other sessions' work (load average in the table)",
        f"Python {platform.python_version()}, asyncua {_version('asyncua')}, "
        f"twinstore commit {_git_commit()}; the machine's NATS ({nats_url}), "
        f"ingest stream with file storage, {PARTITIONS} partitions",
        f"PLC: an asyncua server process with {args.variables:,} Double variables, changed round-robin "
        f"as fast as it goes for {args.seconds:g} s per run (source timestamps set), one subject at a time",
        f"subscription (both subjects): publishing interval {PUBLISHING_MS:g} ms, sampling interval 0, "
        f"queue {QUEUE_SIZE} per item; adapter defaults otherwise: batches of ≤ 500 rows / 20 ms, "
        "spool fsynced per batch, JetStream ack awaited per NATS message (one per partition per batch)",
        "rate: adapter = rows seen on the ingest subjects (core NATS subscriber, telemetry decoded) from "
        "the first to the last; raw = data-change callbacks of the bare client, first to last; "
        "'subject CPU per change' = CPU seconds of the subject's process over the run / changes received "
        "(the adapter's includes the NATS client and the spool's fsyncs)",
    ]
    text = "\n".join(
        [
            "## OPC UA adapter throughput (issue 6) (bench/adapter_opcua.py)",
            "",
            "```",
            command_line(),
            "```",
            "",
            *[f"- {n}" for n in notes],
            "",
            table,
            "",
            summary(notes, verdicts),
        ]
    )
    print(text)
    if not args.no_write:
        write_section(args.output, "adapter-opcua", text)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variables", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--subjects", default="raw,adapter")
    parser.add_argument("--modes", default="live,backlog")
    parser.add_argument("--nats-url", default=None)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    parser.add_argument("--role", choices=["plc", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "plc":
        plc(args.port, args.variables)
    elif args.role == "raw":
        raw(args.port, args.variables)
    else:
        asyncio.run(drive(args))


if __name__ == "__main__":
    main()
