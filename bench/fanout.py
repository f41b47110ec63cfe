"""Fan-out benchmark: live events from a real ``twinstore serve`` to 1,000 WebSocket sessions.

Scenario 1 (issue 4's figure): ``--sessions`` WebSocket sessions on ``/ws/2`` (real sockets,
basic auth), each subscribed with ``START-SEND-EVENTS?...&filter=...`` to its own
``--things-per-session`` things, all in separate client processes; then ``--rate`` changes/s
(single-property PUTs over HTTP, from a writer process, paced, things picked at random) for
``--duration`` seconds. Per delivered event: latency from commit to delivery, every expected
event delivered once and in revision order per thing, the server's RSS and everyone's CPU.

Baseline in the same run: a bare nats-py core subscriber on the events subject (its own
process) receives the same changes; its latency is what the journal, the relay and NATS cost
before fan-out adds anything.

Scenario 2: one session subscribed to everything (no filter) while the writer writes as fast
as it can: does it keep up (delivered == written, lag bounded)?

Latency is measured from the event's ``timestamp`` (set by the server when it decides the
write, just before the commit; the server's and the clients' clocks are the same clock), so
it is an upper bound on commit -> delivery; it is also given from the writer's HTTP
acknowledgement (after the commit: a lower bound; the delivery may even precede it).

Run ``.venv/bin/python bench/fanout.py --help``; ``--quick`` for a short run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import nats
import orjson
import psutil
from api import Server
from benchlib import (
    ROOT,
    Verdict,
    command_line,
    create_database,
    default_database_url,
    default_nats_url,
    drop_database,
    machine_notes,
    markdown_table,
    percentile,
    process_cpu,
    summary,
    wait_quiet,
    write_section,
)

from twinstore.auth import write_users_file
from twinstore.bus.subjects import Subjects

USER, PASSWORD = "bench", "bench-password"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
POLICY_ID = "bench.policy:all"
PROPERTY = "/features/f/properties/temp"
P99_TARGET_MS = 50.0


def raise_nofile() -> int:
    """Raise the open-files limit to the hard limit (1,000+ sockets); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 65_536 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def use_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


# ---- a minimal HTTP/1.1 keep-alive client (httpx costs too much CPU at 2,000 writes/s) -------


class Http:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: {AUTHORIZATION}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while size := int((await self.reader.readline()).strip() or b"0", 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readline()
        elif length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].split("/", 1)[0].partition(":")
    return host, int(port or 80)


# ---- child processes: WebSocket clients, writer, bare NATS subscriber -------------------------


async def _commands(handlers: dict[str, Any]) -> None:
    """Serve line commands on stdin (COUNT, RESET, STOP ...) until STOP."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        answer = await handlers[line]()
        print(f"{line} {answer}", flush=True)
        if line == "STOP":
            return


class Received:
    """Deliveries as parallel lists (cheap to append, small to dump)."""

    def __init__(self) -> None:
        self.things: list[str] = []
        self.revisions: list[int] = []
        self.received: list[float] = []
        self.latency: list[float] = []  # seconds from the event timestamp
        self.values: list[Any] = []

    def add(self, envelope: dict[str, Any], now: float) -> None:
        namespace, name = envelope["topic"].split("/", 2)[:2]
        self.things.append(f"{namespace}:{name}")
        self.revisions.append(int(envelope["revision"]))
        self.received.append(now)
        self.latency.append(now - datetime.fromisoformat(envelope["timestamp"]).timestamp())
        value = envelope.get("value")
        self.values.append(value if isinstance(value, int) else None)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def dump(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def clients_role(url: str, queries_file: Path, out: Path, connect_concurrency: int) -> None:
    from websockets.asyncio.client import connect

    queries: list[str] = json.loads(queries_file.read_text())
    got = Received()
    closed: list[str] = []
    sockets: list[Any] = []
    gate = asyncio.Semaphore(connect_concurrency)
    failed: list[str] = []

    async def session(query: str) -> None:
        try:
            async with gate:
                ws = await connect(
                    url,
                    additional_headers={"Authorization": AUTHORIZATION},
                    compression=None,
                    ping_interval=None,
                    max_queue=None,
                    open_timeout=60,
                )
                await ws.send(query)
                ack = await asyncio.wait_for(ws.recv(), 60)
                if ack != "START-SEND-EVENTS:ACK":
                    raise RuntimeError(f"no ACK: {str(ack)[:200]}")
            sockets.append(ws)
        except Exception as exc:
            failed.append(repr(exc)[:200])
            return
        try:
            async for message in ws:
                got.add(orjson.loads(message), time.time())
        except Exception as exc:
            closed.append(repr(exc)[:200])
            return
        if ws.close_code not in (1000, None):
            closed.append(f"{ws.close_code} {ws.close_reason}")

    t0 = time.monotonic()
    tasks = [asyncio.create_task(session(q)) for q in queries]
    while len(sockets) + len(failed) < len(queries):
        await asyncio.sleep(0.05)
    print(f"READY {len(sockets)} {len(failed)} {time.monotonic() - t0:.1f}", flush=True)

    async def count() -> str:
        return str(len(got.things))

    async def reset() -> str:
        got.reset()
        return "0"

    async def stop() -> str:
        out.write_bytes(orjson.dumps({**got.dump(), "closed": closed, "failed": failed}))
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        for task in tasks:
            task.cancel()
        return "done"

    await _commands({"COUNT": count, "RESET": reset, "STOP": stop})


async def nats_role(nats_url: str, subject: str, out: Path) -> None:
    nc = await nats.connect(nats_url)
    got = Received()

    async def on_message(msg: Any) -> None:
        got.add(orjson.loads(msg.data), time.time())

    await nc.subscribe(subject, cb=on_message, pending_msgs_limit=1_000_000)
    await nc.flush()
    print("READY", flush=True)

    async def count() -> str:
        return str(len(got.things))

    async def reset() -> str:
        got.reset()
        return "0"

    async def stop() -> str:
        out.write_bytes(orjson.dumps(got.dump()))
        await nc.close()
        return "done"

    await _commands({"COUNT": count, "RESET": reset, "STOP": stop})


async def writer_role(
    url: str, things_file: Path, rate: float, duration: float, connections: int, out: Path
) -> None:
    """PUT the property of random things: paced at ``rate``/s (0: as fast as it goes)."""
    things: list[str] = json.loads(things_file.read_text())
    host, port = _host_port(url)
    seq = 0
    acks: list[tuple[int, float]] = []
    latencies: list[float] = []
    failed = 0
    behind = 0
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue(maxsize=connections * 4)
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + duration

    def next_write() -> tuple[str, int]:
        nonlocal seq
        seq += 1
        return f"/api/2/things/{random.choice(things)}{PROPERTY}", seq

    async def write(http: Http, path: str, value: int) -> None:
        nonlocal failed
        t0 = time.perf_counter()
        status = await http.request("PUT", path, str(value).encode())
        if 200 <= status < 300:
            acks.append((value, time.time()))
            latencies.append(time.perf_counter() - t0)
        else:
            failed += 1

    async def paced_worker() -> None:
        http = Http(host, port)
        while (item := await queue.get())[1] >= 0:
            await write(http, *item)
        http.close()

    async def free_worker() -> None:
        http = Http(host, port)
        while loop.time() < deadline:
            await write(http, *next_write())
        http.close()

    if rate > 0:
        workers = [asyncio.create_task(paced_worker()) for _ in range(connections)]
        issued = 0
        while (now := loop.time()) < deadline:
            due = int((now - start) * rate)
            while issued < due:
                if queue.full():  # the server is slower than the offered rate
                    behind += due - issued
                    issued = due
                    break
                queue.put_nowait(next_write())
                issued += 1
            await asyncio.sleep(0.002)
        for _ in workers:
            await queue.put(("", -1))
        await asyncio.gather(*workers)
    else:
        await asyncio.gather(*(free_worker() for _ in range(connections)))
    elapsed = loop.time() - start
    latencies.sort()
    result = {
        "acked": len(acks),
        "failed": failed,
        "behind": behind,
        "elapsed": elapsed,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "cpu": sum(os.times()[:2]),
        "acks": acks,
    }
    out.write_bytes(orjson.dumps(result))
    print("DONE", flush=True)


# ---- the orchestrating process ---------------------------------------------------------------


class Child:
    """A child process of this script, spoken to by lines on stdin/stdout."""

    def __init__(self, role: str, *args: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), f"_{role}", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ps = psutil.Process(self.proc.pid)

    def line(self, timeout: float = 300) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"child {self.proc.args} ended ({self.proc.wait(timeout)})")
        return line

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line().split(" ", 1)[1]

    def cpu(self) -> float:
        return process_cpu(self.ps)

    def wait(self) -> None:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def rss_mib(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.Error:
        return float("nan")


def _cpu_of(names: tuple[str, ...], database: str | None = None) -> dict[int, float]:
    """CPU seconds of processes named ``names``; PostgreSQL backends of other databases (other
    work on a shared machine) are left out, its background processes are kept."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        if not (proc.info["name"] or "").startswith(names):
            continue
        title = " ".join(proc.info["cmdline"] or [])
        if database is not None and "(" in title and f" {database} " not in title:
            continue  # "postgres: 15/main: user database host(port) state"
        out[proc.pid] = process_cpu(proc)
    return out


def _busy() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class Meter:
    """Cores busy during a phase: server, PostgreSQL, NATS server, each child, the rest."""

    def __init__(
        self, server_pid: int, children: dict[str, Child], database: str, write_pid: int | None = None
    ) -> None:
        self.server_pid, self.children, self.database = server_pid, children, database
        self.write_pid = write_pid

    @staticmethod
    def _tree(pid: int | None) -> dict[int, float]:
        if pid is None:
            return {}
        root = psutil.Process(pid)
        return {p.pid: process_cpu(p) for p in [root, *root.children(recursive=True)]}

    def _sample(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "server": self._tree(self.server_pid),
            "writes": self._tree(self.write_pid),
            "postgres": _cpu_of(("postgres",), self.database),
            "nats": _cpu_of(("nats-server",)),
            "children": {k: c.cpu() for k, c in self.children.items()},
            "busy": _busy(),
        }

    def start(self) -> None:
        self.begin = self._sample()

    def stop(self) -> dict[str, float]:
        end, begin = self._sample(), self.begin
        elapsed = end["t"] - begin["t"]
        cores = {
            k: sum(v - begin[k].get(pid, 0.0) for pid, v in end[k].items()) / elapsed
            for k in ("server", "writes", "postgres", "nats")
        }
        for k in end["children"]:
            cores[k] = (end["children"][k] - begin["children"].get(k, 0.0)) / elapsed
        cores["other"] = max(0.0, (end["busy"] - begin["busy"]) / elapsed - sum(cores.values()))
        return cores


CPU_KEYS = ("server", "writes", "postgres", "nats", "clients", "writer", "natssub", "other")


def cpu_text(cpu: dict[str, float]) -> str:
    return " / ".join(f"{cpu.get(k, 0.0):.2f}" for k in CPU_KEYS)


@dataclass
class Scenario:
    name: str
    sessions: int
    offered: str
    written: int = 0
    elapsed: float = 0.0
    failed: int = 0
    behind: int = 0
    write_p99: float = 0.0
    expected: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    closed: list[str] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # sorted, seconds from the event timestamp
    ack_latency: list[float] = field(default_factory=list)  # sorted, seconds from the HTTP ack
    baseline: list[float] = field(default_factory=list)  # sorted, bare NATS subscriber
    baseline_lost: int = 0
    windows: list[tuple[float, float, float]] = field(default_factory=list)  # (t, rate, p99) per window
    drain: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    rss: list[tuple[str, float]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.written / self.elapsed if self.elapsed else 0.0


async def journal_mark(database_url: str) -> int:
    con = await asyncpg.connect(database_url)
    try:
        return int(await con.fetchval("SELECT coalesce(max(position), 0) FROM journal"))
    finally:
        await con.close()


async def journal_events(database_url: str, after: int) -> set[tuple[str, int]]:
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch(
            "SELECT id, revision FROM journal WHERE entity = 'thing' AND position > $1", after
        )
    finally:
        await con.close()
    return {(r["id"], int(r["revision"])) for r in rows}


def check_deliveries(scenario: Scenario, expected: set[tuple[str, int]], got: dict[str, Any]) -> None:
    pairs = list(zip(got["things"], got["revisions"], strict=True))
    seen: set[tuple[str, int]] = set()
    last: dict[str, int] = {}
    for thing, revision in pairs:
        if (thing, revision) in seen:
            scenario.duplicates += 1
        elif revision < last.get(thing, 0):
            scenario.out_of_order += 1
        seen.add((thing, revision))
        last[thing] = max(last.get(thing, 0), revision)
    scenario.expected = len(expected)
    scenario.received = len(pairs)
    scenario.lost = len(expected - seen)
    scenario.unexpected = len(seen - expected)


def drain(children: list[Child], expected: int, patience: float = 5.0, limit: float = 60.0) -> float:
    """Wait until the children together received ``expected`` messages (or stopped progressing)."""
    t0 = last_change = time.monotonic()
    previous = -1
    while time.monotonic() - t0 < limit:
        total = sum(int(c.ask("COUNT")) for c in children)
        if total >= expected:
            break
        if total != previous:
            previous, last_change = total, time.monotonic()
        elif time.monotonic() - last_change > patience:
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def run_writer(
    url: str, tmp: Path, things: Path, rate: float, seconds: float, connections: int, tag: str
) -> tuple[Child, Path]:
    out = tmp / f"writer-{tag}.json"
    child = Child("writer", url, str(things), str(rate), str(seconds), str(connections), str(out))
    return child, out


def wait_writer(child: Child, server_pid: int, samples: list[float]) -> None:
    """Until the writer is done; samples the server's RSS every half second meanwhile."""
    assert child.proc.stdout is not None
    while child.proc.poll() is None:
        samples.append(rss_mib(server_pid))
        try:
            child.proc.wait(0.5)
        except subprocess.TimeoutExpired:
            continue
    if child.line() != "DONE":
        raise RuntimeError("writer failed")


async def seed(url: str, sessions: int, per_session: int, concurrency: int = 32) -> list[list[str]]:
    """A shared policy for the user, then ``sessions`` x ``per_session`` things using it."""
    host, port = _host_port(url)
    http = Http(host, port)
    policy = {
        "entries": {
            "owner": {
                "subjects": {f"nginx:{USER}": {"type": "bench"}},
                "resources": {
                    r: {"grant": ["READ", "WRITE"], "revoke": []}
                    for r in ("thing:/", "policy:/", "message:/")
                },
            }
        }
    }
    status = await http.request("PUT", f"/api/2/policies/{POLICY_ID}", orjson.dumps(policy))
    assert status in (201, 204), status
    http.close()
    groups = [[f"bench.s{i:04d}:t{j}" for j in range(per_session)] for i in range(sessions)]
    queue = iter([t for group in groups for t in group])

    async def worker() -> None:
        http = Http(host, port)
        for thing in queue:
            body = {
                "policyId": POLICY_ID,
                "attributes": {"session": thing.split(":")[0]},
                "features": {"f": {"properties": {"temp": 0}}},
            }
            status = await http.request("PUT", f"/api/2/things/{thing}", orjson.dumps(body))
            if status not in (201, 204):
                raise RuntimeError(f"seeding {thing}: {status}")
        http.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return groups


def session_query(mode: str, things: list[str]) -> str:
    """``START-SEND-EVENTS`` of one session for its own things."""
    value = "ge(features/f/properties/temp,0)"  # an RQL condition on the changed value
    if mode == "namespace":
        namespace = things[0].split(":")[0]
        return f"START-SEND-EVENTS?namespaces={namespace}&filter={quote(value)}"
    ids = ",".join(f'"{t}"' for t in things)
    return f"START-SEND-EVENTS?filter={quote(f'and(in(thingId,{ids}),{value})')}"


def _windows(got: dict[str, Any], begin: float, width: float) -> list[tuple[float, float, float]]:
    """(window start relative to begin, deliveries/s, p99 latency s) per ``width`` seconds."""
    buckets: dict[int, list[float]] = {}
    for at, lat in zip(got["received"], got["latency"], strict=True):
        buckets.setdefault(int((at - begin) // width), []).append(lat)
    return [
        (k * width, len(v) / width, percentile(sorted(v), 0.99)) for k, v in sorted(buckets.items()) if k >= 0
    ]


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: [] for k in ("things", "revisions", "received", "latency", "values")}
    merged["closed"], merged["failed"] = [], []
    for r in results:
        for k in merged:
            merged[k].extend(r.get(k, []))
    return merged


async def scenario_sessions(
    args: argparse.Namespace, server: Server, tmp: Path, groups: list[list[str]], natssub: Child
) -> Scenario:
    assert server.proc is not None
    pid = server.proc.pid
    scenario = Scenario(
        f"{args.sessions:,} sessions x {args.things_per_session} things ({args.subscribe})",
        args.sessions,
        f"{args.rate:,.0f}/s",
    )
    scenario.rss.append(("idle, after seeding", rss_mib(pid)))
    ws_url = server.url.replace("http://", "ws://") + "/ws/2"
    parts = [groups[i :: args.client_processes] for i in range(args.client_processes)]
    clients = []
    t0 = time.monotonic()
    for n, part in enumerate(parts):
        queries = tmp / f"queries-{n}.json"
        queries.write_text(json.dumps([session_query(args.subscribe, g) for g in part]))
        clients.append(Child("clients", ws_url, str(queries), str(tmp / f"clients-{n}.json"), "32"))
    ready = [c.line().split() for c in clients]
    ok = sum(int(r[1]) for r in ready)
    print(
        f"{ok:,} sessions subscribed ({sum(int(r[2]) for r in ready)} failed) in "
        f"{time.monotonic() - t0:.1f} s",
        flush=True,
    )
    scenario.rss.append((f"{ok:,} sessions subscribed", rss_mib(pid)))
    things_file = tmp / "things.json"
    things_file.write_text(json.dumps([t for g in groups for t in g]))

    # Warm-up (connections, caches), not measured.
    before = await journal_mark(server.database_url)
    writer, _ = run_writer(
        args.write_url, tmp, things_file, args.rate, args.warmup, args.writer_connections, "warm"
    )
    wait_writer(writer, pid, [])
    warm = len(await journal_events(server.database_url, before))
    drain(clients, warm, patience=2)
    drain([natssub], warm, patience=2)
    for c in [*clients, natssub]:
        c.ask("RESET")

    wait_quiet(args.quiet_wait, threshold=0.6)
    mark = await journal_mark(server.database_url)
    children = {"clients": clients[0], "natssub": natssub}
    meter = Meter(pid, children, server.database_url.rsplit("/", 1)[1], args.write_pid)
    extra_clients = clients[1:]
    extra0 = sum(c.cpu() for c in extra_clients)
    meter.start()
    begin = time.time()
    writer, out = run_writer(
        args.write_url, tmp, things_file, args.rate, args.duration, args.writer_connections, "s1"
    )
    samples: list[float] = []
    wait_writer(writer, pid, samples)
    cpu = meter.stop()
    cpu["clients"] += (sum(c.cpu() for c in extra_clients) - extra0) / max(1e-9, time.time() - begin)
    written = orjson.loads(out.read_bytes())
    cpu["writer"] = written["cpu"] / written["elapsed"]
    scenario.cpu = cpu
    scenario.written, scenario.elapsed = written["acked"], written["elapsed"]
    scenario.failed, scenario.behind, scenario.write_p99 = (
        written["failed"],
        written["behind"],
        written["p99"],
    )
    expected = await journal_events(server.database_url, mark)
    drain(clients, len(expected))
    drain([natssub], len(expected))
    half = len(samples) // 2
    scenario.rss.append(("under load, max", max(samples, default=float("nan"))))
    scenario.rss.append(("under load, middle", samples[half] if samples else float("nan")))
    scenario.rss.append(("under load, end", samples[-1] if samples else float("nan")))
    scenario.rss.append(("after the load, sessions open", rss_mib(pid)))
    results = []
    for n, c in enumerate(clients):
        c.ask("STOP")
        c.wait()
        results.append(orjson.loads((tmp / f"clients-{n}.json").read_bytes()))
    got = _merge(results)
    natssub.ask("STOP")
    natssub.wait()
    base = orjson.loads((tmp / "natssub.json").read_bytes())
    time.sleep(2)
    scenario.rss.append(("sessions closed", rss_mib(pid)))
    check_deliveries(scenario, expected, got)
    scenario.closed = got["closed"] + got["failed"]
    scenario.latency = sorted(got["latency"])
    acks = dict((int(v), t) for v, t in written["acks"])
    scenario.ack_latency = sorted(
        at - acks[v] for at, v in zip(got["received"], got["values"], strict=True) if v in acks
    )
    scenario.baseline = sorted(base["latency"])
    scenario.baseline_lost = len(expected - set(zip(base["things"], base["revisions"], strict=True)))
    scenario.windows = _windows(got, begin, max(1.0, args.duration / 6))
    return scenario


async def scenario_all(
    args: argparse.Namespace, server: Server, tmp: Path, groups: list[list[str]]
) -> Scenario:
    assert server.proc is not None
    pid = server.proc.pid
    scenario = Scenario("1 session, no filter (all events)", 1, "as fast as it goes")
    ws_url = server.url.replace("http://", "ws://") + "/ws/2"
    queries = tmp / "queries-all.json"
    queries.write_text(json.dumps(["START-SEND-EVENTS"]))
    client = Child("clients", ws_url, str(queries), str(tmp / "clients-all.json"), "1")
    natssub = Child(
        "nats", args.nats_url, Subjects(server.prefix).events_wildcard, str(tmp / "natssub2.json")
    )
    client.line()
    natssub.line()
    scenario.rss.append(("one session subscribed", rss_mib(pid)))
    things_file = tmp / "things.json"
    wait_quiet(args.quiet_wait, threshold=0.6)
    mark = await journal_mark(server.database_url)
    database = server.database_url.rsplit("/", 1)[1]
    meter = Meter(pid, {"clients": client, "natssub": natssub}, database, args.write_pid)
    meter.start()
    begin = time.time()
    writer, out = run_writer(
        args.write_url, tmp, things_file, 0, args.all_duration, args.writer_connections, "s2"
    )
    samples: list[float] = []
    wait_writer(writer, pid, samples)
    end = time.time()
    scenario.cpu = meter.stop()
    written = orjson.loads(out.read_bytes())
    scenario.cpu["writer"] = written["cpu"] / written["elapsed"]
    scenario.written, scenario.elapsed = written["acked"], written["elapsed"]
    scenario.failed, scenario.write_p99 = written["failed"], written["p99"]
    expected = await journal_events(server.database_url, mark)
    drain([client], len(expected))
    drain([natssub], len(expected))
    scenario.rss.append(("under load, max", max(samples, default=float("nan"))))
    client.ask("STOP")
    client.wait()
    natssub.ask("STOP")
    natssub.wait()
    got = orjson.loads((tmp / "clients-all.json").read_bytes())
    base = orjson.loads((tmp / "natssub2.json").read_bytes())
    check_deliveries(scenario, expected, got)
    scenario.closed = got["closed"] + got["failed"]
    scenario.latency = sorted(got["latency"])
    scenario.baseline = sorted(base["latency"])
    scenario.baseline_lost = len(expected - set(zip(base["things"], base["revisions"], strict=True)))
    scenario.windows = _windows(got, begin, max(1.0, args.all_duration / 6))
    scenario.drain = max(got["received"], default=end) - end
    return scenario


# ---- report ---------------------------------------------------------------------------------


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1e3:.1f}" if values else "-"


def _max_ms(values: list[float]) -> str:
    return f"{values[-1] * 1e3:.1f}" if values else "-"


def report(args: argparse.Namespace, notes: list[str], s1: Scenario, s2: Scenario | None) -> str:
    p99 = percentile(s1.latency, 0.99) * 1e3 if s1.latency else float("inf")
    full = s1.sessions >= 1000 and s1.rate >= 0.95 * 2000
    complete = s1.lost == 0 and s1.duplicates == 0 and s1.out_of_order == 0 and not s1.closed
    rss = dict(s1.rss)
    growth = rss["under load, end"] - rss["under load, middle"]
    bounded = (
        growth <= 0.05 * rss["under load, middle"] and rss["sessions closed"] <= 1.05 * rss["under load, max"]
    )
    latency = Verdict(
        "commit -> delivery, paced writes",
        f"p99 {_ms(s1.latency, 0.99)} ms at {s1.rate:,.0f} writes/s, {s1.lost} lost",
        f"p99 ≤ {P99_TARGET_MS:.0f} ms at 1,000 sessions x 2,000 writes/s, none lost",
        full and p99 <= P99_TARGET_MS and complete,
    )
    memory = Verdict(
        "bounded memory",
        f"RSS {rss['under load, end']:.0f} MiB at the end of the load, {rss['sessions closed']:.0f} MiB "
        "after the sessions closed",
        "end ≤ 1.05 x middle, closed ≤ 1.05 x max",
        bounded,
    )
    verdicts = {s1.name: latency}
    if s2 is not None:
        first, last = (s2.windows[0][2], s2.windows[-1][2]) if s2.windows else (0.0, 0.0)
        keeps = (
            s2.lost == 0 and s2.duplicates == 0 and not s2.closed and s2.drain < 1.0
            and last <= max(2 * first, 0.1)
        )  # fmt: skip
        verdicts[s2.name] = Verdict(
            "one all-events subscriber keeps up",
            f"{s2.rate:,.0f} writes/s, {s2.received:,} / {s2.expected:,} delivered",
            "every event, lag not growing",
            keeps,
        )
    headers = [
        "scenario", "receiver", "writes/s (offered)", "delivered / expected", "lost", "dup", "out of order",
        "p50 ms", "p99 ms", "max ms", "p99 ms from ack",
        "CPU cores server / write server / postgres / nats / ws clients / writer / nats sub / other",
        "target (issue 4)",
    ]  # fmt: skip
    rows: list[list[object]] = []
    for s in (s1, s2):
        if s is None:
            continue
        rows.append([
            s.name, "WebSocket sessions", f"{s.rate:,.0f} ({s.offered})", f"{s.received:,} / {s.expected:,}",
            s.lost, s.duplicates, s.out_of_order, _ms(s.latency, 0.5), _ms(s.latency, 0.99),
            _max_ms(s.latency), _ms(s.ack_latency, 0.99), cpu_text(s.cpu), verdicts[s.name].cell(),
        ])  # fmt: skip
        rows.append([
            "", "baseline: bare NATS subscriber", "", f"{len(s.baseline):,} / {s.expected:,}",
            s.baseline_lost, "-", "-", _ms(s.baseline, 0.5), _ms(s.baseline, 0.99), _max_ms(s.baseline),
            "-", "(same run)", "",
        ])  # fmt: skip
    where = (
        "to the same server; "
        if args.write_server == "same"
        else "to a second `twinstore serve` process on the same database and NATS (CPU column 'write "
        "server'); the sessions' server relays and fans out; "
    )
    example = session_query(args.subscribe, ["ns:a", "ns:b"])
    windows = ", ".join(f"{t:.1f} s: {r:,.0f}/s p99 {p * 1e3:.0f} ms" for t, r, p in s1.windows)
    lines = [
        "## Fan-out (issue 4): live events to WebSocket sessions (bench/fanout.py)",
        "",
        "```",
        command_line(),
        "```",
        "",
        *(f"- {n}" for n in notes),
        f"- `twinstore serve --workers {args.workers}` on the machine's PostgreSQL and NATS; writes go "
        f"{where}{args.sessions:,} WebSocket sessions on /ws/2 (basic auth, one user) in "
        f"{args.client_processes} client process(es) (`websockets`, uvloop), each `START-SEND-EVENTS` "
        "for its own "
        f"{args.things_per_session} things ({args.subscribe}: `{example}` for a session of 2 things); "
        "all things share one policy",
        "- writer: its own process, single-property PUTs over HTTP/1.1 keep-alive on "
        f"{args.writer_connections} connections, things at random; scenario 1 paced at {args.rate:,.0f}/s "
        f"for {args.duration:.0f} s "
        f"after {args.warmup:.0f} s warm-up, scenario 2 as fast as it goes for {args.all_duration:.0f} s",
        "- latency: delivery time minus the event's `timestamp` (set when the server decides the write, "
        "just before its commit: an upper bound on commit -> delivery); 'from ack': delivery minus the "
        "writer's HTTP acknowledgement (after the commit: a lower bound; may be negative)",
        "- baseline: a bare nats-py core subscriber on the events subject (own process), same changes, "
        "same latency definition: what the journal, the relay and NATS cost before the fan-out",
        "- checks: delivered events compared with the journal's events of the run per (thing, revision)",
        "- everything shares the machine's 2 cores; CPU columns are cores busy during the write phase "
        "(postgres: this run's database and PostgreSQL's background processes; other: everything else, "
        "including other people's work on a shared machine)",
        "",
        markdown_table(headers, rows),
        "",
        "Server RSS (MiB, the server process):",
        "",
        markdown_table(
            ["moment", "RSS MiB", "target"],
            [
                *([k, f"{v:.0f}", ""] for k, v in s1.rss),
                [
                    "memory bounded: end of the load / after the sessions closed",
                    f"{rss['under load, end']:.0f} / {rss['sessions closed']:.0f}",
                    memory.cell(),
                ],
            ],
        ),
        "",
        f"Scenario 1 deliveries per window: {windows}",
        "",
        summary(notes, [latency, memory, *([verdicts[s2.name]] if s2 is not None else [])]),
        "",
        "Details:",
        "",
        f"- paced writes: {s1.sessions:,} sessions, {s1.duplicates} duplicated, {s1.out_of_order} out of "
        f"order, {len(s1.closed)} sessions closed or failed"
        + (f": {s1.closed[:3]}" if s1.closed else "")
        + f"; writer: {s1.failed} failed writes, {s1.behind} writes behind schedule, write p99 "
        f"{s1.write_p99 * 1e3:.0f} ms",
    ]
    if s2 is not None:
        lines.append(
            f"- all events: p99 lag {first * 1e3:.0f} ms in the first window, {last * 1e3:.0f} ms in the "
            f"last; last delivery {s2.drain * 1e3:.0f} ms after the writer's end; windows: "
            f"{', '.join(f'{r:,.0f}/s' for _, r, _ in s2.windows)}"
        )
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark live-event fan-out of a real `twinstore serve` to WebSocket sessions, "
        "print a table and write the section 'fanout' of BENCHMARKS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sessions", type=int, default=1000, help="WebSocket sessions")
    parser.add_argument("--things-per-session", type=int, default=10, help="things per session")
    parser.add_argument("--rate", type=float, default=2000.0, help="changes per second (scenario 1)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of scenario 1's writes")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of writes before measuring")
    parser.add_argument("--all-duration", type=float, default=20.0, help="seconds of scenario 2's writes")
    parser.add_argument(
        "--subscribe",
        choices=("namespace", "thing-ids"),
        default="namespace",
        help="namespace: each session's things in its own namespace, `namespaces=` plus a filter on "
        "the value; thing-ids: `filter=and(in(thingId,...),...)`",
    )
    parser.add_argument("--workers", type=int, default=1, help="`twinstore serve --workers`")
    parser.add_argument(
        "--write-server",
        choices=("same", "separate"),
        default="same",
        help="same: the writer's PUTs go to the server holding the sessions; separate: to a second "
        "`twinstore serve` on the same database and NATS (the sessions' server only fans out and relays)",
    )
    parser.add_argument("--client-processes", type=int, default=1, help="processes for the sessions")
    parser.add_argument("--writer-connections", type=int, default=64, help="writer's HTTP connections")
    parser.add_argument("--skip-all", action="store_true", help="skip scenario 2")
    parser.add_argument("--quick", action="store_true", help="100 sessions, 500 changes/s, 10 s")
    parser.add_argument("--database-url", default=default_database_url(), help="admin database")
    parser.add_argument("--nats-url", default=default_nats_url(), help="NATS with JetStream")
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0, help="wait up to this long for an idle machine"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="results file")
    parser.add_argument("--no-output", action="store_true", help="only print, do not write --output")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.rate, args.duration, args.all_duration = 100, 500.0, 10.0, 5.0
        args.writer_connections = min(args.writer_connections, 32)
    return args


async def main_async(args: argparse.Namespace) -> int:
    print(f"open files limit: {raise_nofile()}")
    tmp = Path(tempfile.mkdtemp(prefix="twinstore-fanout-"))
    users_file = tmp / "users.htpasswd"
    write_users_file(users_file, {USER: PASSWORD})
    notes = await machine_notes(args.database_url)
    print("\n".join(notes))
    name, url = await create_database(args.database_url, "twinstore_bench_fanout")
    server = Server(url, args.nats_url, users_file, args.workers, tmp / "server.log")
    print(f"server log: {server.log}", flush=True)
    writes = None
    args.write_url, args.write_pid = server.url, None
    try:
        server.start()
        if args.write_server == "separate":  # a second process for the HTTP writes (scale-out)
            writes = Server(url, args.nats_url, users_file, 1, tmp / "write-server.log")
            writes.prefix = writes.env["TWINSTORE_NATS_PREFIX"] = server.prefix
            writes.start()
            assert writes.proc is not None
            args.write_url, args.write_pid = writes.url, writes.proc.pid
        t0 = time.monotonic()
        groups = await seed(server.url, args.sessions, args.things_per_session)
        print(f"seeded {args.sessions * args.things_per_session:,} things in {time.monotonic() - t0:.1f} s")
        natssub = Child(
            "nats", args.nats_url, Subjects(server.prefix).events_wildcard, str(tmp / "natssub.json")
        )
        natssub.line()
        s1 = await scenario_sessions(args, server, tmp, groups, natssub)
        print(report(args, notes, s1, None), flush=True)
        s2 = None if args.skip_all else await scenario_all(args, server, tmp, groups)
    finally:
        if writes is not None:
            writes.stop()
        server.stop()
        await server.delete_stream()
        await drop_database(args.database_url, name)
    text = report(args, notes, s1, s2)
    print("\n" + text)
    if not args.no_output:
        key = "fanout" if args.write_server == "same" else f"fanout-{args.write_server}-writes"
        write_section(args.output, key, text)
        print(f"wrote {args.output}")
    return 0


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role.startswith("_"):
        raise_nofile()
        use_uvloop()
        a = sys.argv[2:]
        if role == "_clients":
            asyncio.run(clients_role(a[0], Path(a[1]), Path(a[2]), int(a[3])))
        elif role == "_writer":
            asyncio.run(writer_role(a[0], Path(a[1]), float(a[2]), float(a[3]), int(a[4]), Path(a[5])))
        elif role == "_nats":
            asyncio.run(nats_role(a[0], a[1], Path(a[2])))
        return
    use_uvloop()
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
