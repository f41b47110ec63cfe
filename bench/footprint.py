"""Footprint and scaling (issue 8): one API process's memory, and 1 -> 3 API processes.

One run on a fresh database and one NATS prefix:

1. **Memory of one API process** (``twinstore serve --workers 1 --no-ingest --no-anomaly``; RSS
   and USS with psutil, children included):

   * baselines first: a bare Python interpreter, ``python -c 'import twinstore.api.app'`` and an
     idle uvicorn hello-world app (the framework floor);
   * (a) at rest after its start;
   * (b) after ``--things`` things (default 100,000) were created through it (HTTP PUT by wrk,
     ``--seed-connections`` keep-alive connections, all things under one shared policy), and
     again after ``--read-seconds`` of GETs of random things through it (caches warm);
   * (c) with ``--sessions`` WebSocket sessions (default 1,000, opened from
     ``--client-processes`` separate client processes of ``bench/fanout.py``, ``ping_interval=None``)
     each ``START-SEND-EVENTS`` for its own ``--things-per-session`` things (ACKed), while
     ``--rate`` single-property PUTs/s (a paced writer process) go to those things for
     ``--load-seconds``, so each write is delivered to exactly one session; then the sessions
     are closed, opened again and closed again (memory the allocator keeps stays level across
     the second round, a leak would grow).

2. **Throughput from 1 to 3 API processes**: ``--scale`` processes (each its own port, all on the
   same database and NATS prefix, like a Deployment with replicas; started afresh per count),
   wrk with one connection per thread, the connections spread round-robin over the processes;
   PUT of one property of random things among the first ``--write-things`` things, then GET of
   random things among all of them; writes/s, p50/p99 and CPU (server processes / PostgreSQL /
   wrk / everything else). One process is the baseline of the scaling.

Run ``.venv/bin/python bench/footprint.py --help``; needs ``wrk`` (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil
from api import AUTHORIZATION, GET_LUA, PASSWORD, PROPERTY, USER, WRITE_LUA, Server, _errors, run_wrk
from benchlib import (
    ROOT,
    CpuMeter,
    CpuUse,
    add_run_arguments,
    markdown_table,
    percentile,
    run_on_fresh_database,
    wait_quiet,
)
from fanout import Child, drain, raise_nofile, run_writer, session_query, wait_writer

from twinstore.auth import write_users_file

POLICY_ID = "fp:policy"
THING_PREFIX = "/api/2/things/fp:t"  # things fp:t1 .. fp:tN
MEMORY_TARGET_MIB = 300.0
MIB = 2**20

# Creation of things 1..N by wrk: thread k (of `step`) creates k, k + step, k + 2 step, ... and stops
# after its last one (one connection per thread: nothing is in flight when it stops).
SEED_LUA = r"""
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("first", counter)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1]
  total = tonumber(args[2])
  step = tonumber(args[3])
  policy = args[4]
  hdrs = { ["Authorization"] = args[5], ["Content-Type"] = "application/json" }
  n = first
  ok = 0
  failed = 0
end

function request()
  local i = n
  n = n + step
  return wrk.format("PUT", prefix .. i, hdrs, string.format(
    '{"policyId":"%s","attributes":{"model":"bench","serial":%d},' ..
    '"features":{"f":{"properties":{"temp":20.0,"humidity":50,"counter":0}}}}', policy, i))
end

function response(status, headers, body)
  if status == 201 or status == 204 then ok = ok + 1 else failed = failed + 1 end
  if n > total then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local a, f = 0, 0
  for _, thread in ipairs(threads) do
    a = a + thread:get("ok")
    f = f + thread:get("failed")
  end
  io.write(string.format(
    'BENCH {"ok":%d,"failed":%d,"requests":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    a, f, summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""

# Appended to api.py's scripts: each wrk thread (one or more connections) talks to one of the
# servers listed in FOOTPRINT_PORTS, round-robin by thread.
ROUND_ROBIN_LUA = r"""
local base_setup = setup
local addrs = nil
local assigned = 0

function setup(thread)
  if base_setup ~= nil then base_setup(thread) end
  if addrs == nil then
    addrs = {}
    for port in string.gmatch(os.getenv("FOOTPRINT_PORTS"), "%d+") do
      table.insert(addrs, wrk.lookup("127.0.0.1", port)[1])
    end
  end
  assigned = assigned + 1
  thread.addr = addrs[(assigned - 1) % #addrs + 1]
end
"""


# ---- memory ---------------------------------------------------------------------------------


@dataclass
class Memory:
    rss: float  # MiB, the process and its children
    uss: float
    processes: int

    def cells(self) -> list[str]:
        return [f"{v:.1f}" if v == v else "-" for v in (self.rss, self.uss)]


def memory(pid: int) -> Memory:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = uss = 0.0
    for proc in procs:
        info = proc.memory_full_info()
        rss += info.rss
        uss += info.uss
    return Memory(rss / MIB, uss / MIB, len(procs))


@dataclass
class Step:
    name: str
    mem: Memory
    note: str = ""


HELLO_APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def baselines() -> list[Step]:
    """The floor: bare Python, the app's imports, an idle uvicorn hello-world (after one request)."""
    steps = []
    wait = "import time; print('ready', flush=True); time.sleep(600)"
    for name, code in (
        ("baseline: bare `python` (sleeping)", wait),
        ("baseline: `python -c 'import twinstore.api.app'`", "import twinstore.api.app; " + wait),
    ):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            time.sleep(0.5)
            steps.append(Step(name, memory(proc.pid)))
        finally:
            proc.kill()
            proc.wait()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", HELLO_APP, str(port)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        time.sleep(0.5)
        steps.append(Step("baseline: uvicorn hello-world ASGI app, after one request", memory(proc.pid)))
    finally:
        proc.kill()
        proc.wait()
    return steps


# ---- servers ----------------------------------------------------------------------------------


class Cluster:
    """``twinstore serve`` processes on one database and one NATS prefix."""

    def __init__(
        self,
        database_url: str,
        args: argparse.Namespace,
        users: Path,
        tmp: Path,
        root: Path = ROOT,
        env: dict[str, str] | None = None,
    ) -> None:
        """``root``: the source tree the processes run (another checkout runs a baseline);
        ``env``: more settings of the processes (``TWINSTORE_...``)."""
        self.database_url, self.args, self.users, self.tmp, self.root = database_url, args, users, tmp, root
        self.extra_env = env or {}
        self.prefix = ""
        self.servers: list[Server] = []
        self.started = 0

    def start(self, count: int) -> list[Server]:
        servers = []
        for _ in range(count):
            self.started += 1
            server = Server(
                self.database_url,
                self.args.nats_url,
                self.users,
                1,
                self.tmp / f"server-{self.started}.log",
                root=self.root,
            )
            if self.prefix:  # all on the first one's prefix
                server.prefix = self.prefix
            self.prefix = server.prefix
            server.env.update(
                TWINSTORE_NATS_PREFIX=self.prefix,
                TWINSTORE_INGEST_ENABLED="false",  # = serve --no-ingest
                TWINSTORE_ANOMALY_ENABLED="false",  # = serve --no-anomaly
            )
            server.env.update(self.extra_env)
            self.servers.append(server)
            servers.append(server)
        for server in servers:
            server.start()
        return servers

    def stop(self, servers: list[Server] | None = None) -> None:
        for server in list(self.servers if servers is None else servers):
            server.stop()
            self.servers.remove(server)

    async def close(self) -> None:
        """Stop every server, delete the prefix's NATS streams."""
        self.stop()
        if self.prefix:
            any_server = Server(self.database_url, self.args.nats_url, self.users, 1, self.tmp / "unused.log")
            any_server.prefix = self.prefix
            await any_server.delete_stream()


def pid_of(server: Server) -> int:
    assert server.proc is not None
    return server.proc.pid


async def journal_position(database_url: str) -> int:
    con = await asyncpg.connect(database_url)
    try:
        return int(await con.fetchval("SELECT coalesce(max(position), 0) FROM journal"))
    finally:
        await con.close()


async def count_things(database_url: str) -> int:
    con = await asyncpg.connect(database_url)
    try:
        return int(await con.fetchval("SELECT count(*) FROM things WHERE doc IS NOT NULL"))
    finally:
        await con.close()


async def create_policy(url: str) -> None:
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
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": AUTHORIZATION}) as client:
        r = await client.put(f"/api/2/policies/{POLICY_ID}", json=policy)
        if r.status_code not in (201, 204):
            raise RuntimeError(f"policy: {r.status_code} {r.text}")


async def seed(server: Server, args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], float, float]:
    """Create things 1..N through ``server`` with wrk; returns wrk's counts, things/s and the
    largest RSS seen meanwhile (MiB)."""
    await create_policy(server.url)
    script = tmp / "seed.lua"
    script.write_text(SEED_LUA)
    threads = min(args.seed_connections, args.things)
    cmd = ["wrk", "-t", str(threads), "-c", str(threads), "-d", "3600s", "--timeout", "30s"]
    cmd += ["-s", str(script), server.url, "--"]
    cmd += [THING_PREFIX, str(args.things), str(threads), POLICY_ID, AUTHORIZATION]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wrk = psutil.Process(proc.pid)
    t0 = last_print = time.monotonic()
    peak = 0.0
    time.sleep(1.0)
    # Every wrk thread ends after its last thing; then wrk (which otherwise sleeps for -d) is
    # interrupted so that it reports.
    while proc.poll() is None and wrk.num_threads() > 1:
        await asyncio.sleep(0.5)
        peak = max(peak, memory(pid_of(server)).rss)
        if time.monotonic() - last_print > 15:
            last_print = time.monotonic()
            done = await journal_position(server.database_url)
            print(f"  ~{done:,} things created, {time.monotonic() - t0:.0f} s", flush=True)
    elapsed = time.monotonic() - t0
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            out: dict[str, Any] = json.loads(line[len("BENCH ") :])
            break
    else:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout}\n{stderr}")
    # wrk calls request() once before the run to check the script (thread 1 skips its first
    # thing); whatever is missing is created now.
    out["late"] = await create_missing(server, args.things)
    return out, out["ok"] / elapsed, peak


async def create_missing(server: Server, things: int) -> int:
    con = await asyncpg.connect(server.database_url)
    try:
        rows = await con.fetch(
            "SELECT n FROM generate_series(1, $1::int) n WHERE NOT EXISTS "
            "(SELECT 1 FROM things WHERE id = 'fp:t' || n AND doc IS NOT NULL)",
            things,
        )
    finally:
        await con.close()
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": AUTHORIZATION}) as client:
        for row in rows:
            i = int(row["n"])
            properties = {"temp": 20.0, "humidity": 50, "counter": 0}
            body = {"policyId": POLICY_ID, "attributes": {"model": "bench", "serial": i}}
            r = await client.put(
                f"{THING_PREFIX}{i}", json={**body, "features": {"f": {"properties": properties}}}
            )
            if r.status_code not in (201, 204):
                raise RuntimeError(f"creating fp:t{i}: {r.status_code} {r.text}")
    return len(rows)


JOURNAL_COUNTERS = (
    "twinstore_journal_events_appended_total",
    "twinstore_journal_commits_total",
    "twinstore_journal_replans_total",
)


def journal_counters(servers: list[Server]) -> dict[str, float]:
    """The journal counters of /metrics, summed over the processes."""
    total = dict.fromkeys(JOURNAL_COUNTERS, 0.0)
    for server in servers:
        for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
            name, _, value = line.partition(" ")
            if name in total:
                total[name] += float(value)
    return total


def write_lua(tmp: Path) -> tuple[Path, Path]:
    get_script, write_script = tmp / "get-rr.lua", tmp / "write-rr.lua"
    get_script.write_text(GET_LUA + ROUND_ROBIN_LUA)
    write_script.write_text(WRITE_LUA + ROUND_ROBIN_LUA)
    return get_script, write_script


def run_get(
    servers: list[Server], script: Path, things: int, seconds: float, threads: int, connections: int
) -> tuple[dict[str, Any], CpuUse]:
    os.environ["FOOTPRINT_PORTS"] = ",".join(str(s.port) for s in servers)
    return run_wrk(
        ["-t", str(threads), "-c", str(connections), "-d", f"{seconds:.0f}s"],
        script,
        servers[0].url,
        [THING_PREFIX, str(things), AUTHORIZATION],
        busy=seconds - 0.2,
        meter=CpuMeter([pid_of(s) for s in servers]),
    )


def run_put(
    servers: list[Server], script: Path, things: int, seconds: float, connections: int
) -> tuple[dict[str, Any], CpuUse]:
    """PUT of one property (as bench/api.py's write runs: one wrk thread per connection, each
    stops after its first response past the deadline)."""
    os.environ["FOOTPRINT_PORTS"] = ",".join(str(s.port) for s in servers)
    grace = 3.0
    script_args = ["PUT", THING_PREFIX, str(things), PROPERTY, "%d", str(seconds)]
    return run_wrk(
        ["-t", str(connections), "-c", str(connections), "-d", f"{seconds + grace:.0f}s"],
        script,
        servers[0].url,
        [*script_args, AUTHORIZATION, "application/json"],
        busy=seconds,
        meter=CpuMeter([pid_of(s) for s in servers]),
    )


# ---- 1: memory --------------------------------------------------------------------------------


@dataclass
class MemoryResult:
    steps: list[Step] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    per_session_idle: float = 0.0
    per_session_load: float = 0.0


async def memory_part(args: argparse.Namespace, cluster: Cluster, tmp: Path) -> MemoryResult:
    result = MemoryResult()
    print("== baselines", flush=True)
    result.steps += baselines()
    for s in result.steps:
        print(f"  {s.name}: RSS {s.mem.rss:.1f} MiB, USS {s.mem.uss:.1f} MiB", flush=True)

    print("== one API process", flush=True)
    (server,) = cluster.start(1)
    pid = pid_of(server)
    await asyncio.sleep(2.0)
    step = Step("(a) at rest after start (only /ready polled)", memory(pid))
    result.steps.append(step)
    result.facts.append(f"the API process's tree: {step.mem.processes} process(es) (RSS and USS are summed)")
    print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)

    print(f"== (b) creating {args.things:,} things through it", flush=True)
    out, rate, peak = await seed(server, args, tmp)
    stored = await count_things(server.database_url)
    result.facts.append(
        f"seeding: {out['ok']:,} things created through the process by HTTP PUT (wrk, "
        f"{min(args.seed_connections, args.things)} keep-alive connections, one shared policy) at "
        f"{rate:,.0f} things/s, p50 {out['p50_us'] / 1e3:.1f} ms, p99 {out['p99_us'] / 1e3:.1f} ms, "
        f"{out['failed'] + out['errors']} failed ({out['late']} created afterwards, singly); "
        f"{stored:,} things in the store; "
        f"largest RSS while seeding {peak:.1f} MiB"
    )
    print("  " + result.facts[-1], flush=True)
    if stored != args.things:
        raise RuntimeError(f"{stored:,} things stored, {args.things:,} expected")
    await asyncio.sleep(2.0)  # the relay publishes, the process's fan-out sees every event
    step = Step(f"(b) after {args.things:,} things were created through it", memory(pid))
    result.steps.append(step)
    print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)
    get_script, _ = write_lua(tmp)
    got, _cpu = run_get([server], get_script, args.things, args.read_seconds, 1, args.connections)
    reads = int(got["requests"])
    step = Step(
        f"(b) and after {reads:,} GETs of random things through it",
        memory(pid),
        f"{reads / (got['duration_us'] / 1e6):,.0f} GET/s, {_errors(got)} errors",
    )
    result.steps.append(step)
    print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)

    print(f"== (c) {args.sessions:,} WebSocket sessions", flush=True)
    per = args.things_per_session
    written = args.sessions * per
    if written > args.things:
        raise SystemExit("--sessions x --things-per-session must not exceed --things")
    groups = [[f"fp:t{k * per + j}" for j in range(1, per + 1)] for k in range(args.sessions)]
    ws_url = server.url.replace("http://", "ws://") + "/ws/2"
    clients: list[Child] = []

    def open_sessions(tag: str) -> None:
        for n in range(args.client_processes):
            queries = tmp / f"queries-{n}.json"
            queries.write_text(
                json.dumps([session_query("things", g) for g in groups[n :: args.client_processes]])
            )
            out = tmp / f"clients-{tag}-{n}.json"
            clients.append(Child("clients", ws_url, str(queries), str(out), "32"))

    def close_sessions(tag: str) -> list[dict[str, Any]]:
        got = []
        for n, c in enumerate(clients):
            c.ask("STOP")
            c.wait()
            got.append(orjson.loads((tmp / f"clients-{tag}-{n}.json").read_bytes()))
        clients.clear()
        return got

    before = memory(pid)
    try:
        t0 = time.monotonic()
        open_sessions("1")
        ready = [c.line().split() for c in clients]
        opened, failed = sum(int(r[1]) for r in ready), sum(int(r[2]) for r in ready)
        result.facts.append(
            f"sessions: {opened:,} WebSocket sessions subscribed (START-SEND-EVENTS, ACKed) from "
            f"{args.client_processes} client processes in {time.monotonic() - t0:.1f} s, {failed} failed; "
            f"each for its own {per} things (`in(thingId,...)` filter)"
        )
        print("  " + result.facts[-1], flush=True)
        await asyncio.sleep(2.0)
        step = Step(f"(c) {opened:,} sessions open, idle", memory(pid))
        result.steps.append(step)
        result.per_session_idle = (step.mem.rss - before.rss) * 1024 / max(1, opened)
        print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)

        things_file = tmp / "written.json"
        things_file.write_text(json.dumps([t for g in groups for t in g]))
        writer, writer_out = run_writer(
            server.url, tmp, things_file, args.rate, args.load_seconds, 16, "load"
        )
        samples: list[float] = []
        wait_writer(writer, pid, samples)
        load = orjson.loads(writer_out.read_bytes())
        drain(clients, int(load["acked"]))
        under = Memory(max(samples, default=float("nan")), float("nan"), 1)
        result.steps.append(Step("(c) under the write load, largest RSS sampled (every 0.5 s)", under))
        step = Step(f"(c) {opened:,} sessions open, after the write load", memory(pid))
        result.steps.append(step)
        result.per_session_load = (step.mem.rss - before.rss) * 1024 / max(1, opened)
        print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)
        deliveries: list[float] = []
        received = closed = 0
        for got_n in close_sessions("1"):
            received += len(got_n["things"])
            closed += len(got_n["closed"])
            deliveries += got_n["latency"]
        deliveries.sort()
        result.facts.append(
            f"write load: {load['acked']:,} PUTs of one property in {load['elapsed']:.1f} s "
            f"({load['acked'] / load['elapsed']:,.0f}/s offered {args.rate:,.0f}/s, {load['failed']} failed, "
            f"p99 {load['p99'] * 1e3:.1f} ms) to the {written:,} subscribed things; the sessions received "
            f"{received:,} events (one per write expected), delivery p50 "
            f"{percentile(deliveries, 0.5) * 1e3:.1f} ms / p99 {percentile(deliveries, 0.99) * 1e3:.1f} ms "
            f"from the event timestamp; {closed} sessions closed by the server"
        )
        print("  " + result.facts[-1], flush=True)
        await asyncio.sleep(2.0)
        step = Step("(c) after the sessions closed", memory(pid))
        result.steps.append(step)
        print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)
        # Opened and closed once more: memory kept by the allocator stays level, a leak grows.
        open_sessions("2")
        again = sum(int(c.line().split()[1]) for c in clients)
        await asyncio.sleep(2.0)
        step = Step(f"(c) again: {again:,} sessions opened (idle)", memory(pid))
        result.steps.append(step)
        print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)
        close_sessions("2")
        await asyncio.sleep(2.0)
        step = Step("(c) again: after they closed", memory(pid))
        result.steps.append(step)
        print(f"  {step.name}: RSS {step.mem.rss:.1f} MiB, USS {step.mem.uss:.1f} MiB", flush=True)
    finally:
        for c in clients:
            c.proc.kill()
            c.wait()
        cluster.stop([server])
    return result


# ---- 2: scaling -------------------------------------------------------------------------------


@dataclass
class ScaleRow:
    processes: int
    test: str
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: CpuUse
    rss: list[float]
    journal: str = "-"

    def cells(self) -> list[str]:
        return [
            str(self.processes),
            self.test,
            f"{self.rate:,.0f}",
            f"{self.p50_ms:.1f}",
            f"{self.p99_ms:.1f}",
            str(self.errors),
            str(self.cpu),
            " + ".join(f"{r:.0f}" for r in self.rss),
            self.journal,
        ]


SCALE_HEADERS = [
    "processes",
    "test",
    "per second",
    "p50 ms",
    "p99 ms",
    "errors",
    "CPU cores servers / postgres / wrk / other",
    "RSS per process after, MiB",
    "events/commit / decided under lock",
]


async def scale_part(args: argparse.Namespace, cluster: Cluster, tmp: Path) -> list[ScaleRow]:
    get_script, write_script = write_lua(tmp)
    write_things = min(args.write_things, args.things)
    rows: list[ScaleRow] = []
    for count in args.scale_counts:
        print(f"== {count} API process(es)", flush=True)
        servers = cluster.start(count)
        try:
            run_put(servers, write_script, write_things, args.warmup, args.connections)  # warm-up
            wait_quiet(args.quiet_wait, threshold=0.5)
            counters = journal_counters(servers)
            out, cpu = run_put(servers, write_script, write_things, args.duration, args.connections)
            after = journal_counters(servers)
            events, commits, replans = (after[k] - counters[k] for k in JOURNAL_COUNTERS)
            rss = [memory(pid_of(s)).rss for s in servers]
            rows.append(
                ScaleRow(
                    count,
                    f"PUT property ({write_things:,} things)",
                    out["acked"] / out["elapsed"],
                    out["p50_us"] / 1e3,
                    out["p99_us"] / 1e3,
                    _errors(out) + int(out["failed"]),
                    cpu,
                    rss,
                    f"{events / max(1.0, commits):.1f} / {replans / max(1.0, events):.1%}",
                )
            )
            print(markdown_table(SCALE_HEADERS, [rows[-1].cells()]).splitlines()[-1], flush=True)
            if args.duration_get > 0:
                wait_quiet(args.quiet_wait, threshold=0.5)
                threads = 6  # 1, 2 and 3 servers get equal shares
                out, cpu = run_get(
                    servers, get_script, args.things, args.duration_get, threads, args.connections
                )
                rss = [memory(pid_of(s)).rss for s in servers]
                rows.append(
                    ScaleRow(
                        count,
                        f"GET thing ({args.things:,} things)",
                        out["requests"] / (out["duration_us"] / 1e6),
                        out["p50_us"] / 1e3,
                        out["p99_us"] / 1e3,
                        _errors(out),
                        cpu,
                        rss,
                    )
                )
                print(markdown_table(SCALE_HEADERS, [rows[-1].cells()]).splitlines()[-1], flush=True)
        finally:
            cluster.stop(servers)
    return rows


# ---- report -----------------------------------------------------------------------------------


def memory_table(steps: list[Step]) -> str:
    """The steps, then the largest RSS of the API process with issue 8's target (the summary's
    verdict is read from this column)."""
    rows = [[s.name, *s.mem.cells(), s.note, ""] for s in steps]
    peak = max((s.mem.rss for s in steps if not s.name.startswith("baseline")), default=0.0)
    verdict = "met" if peak <= MEMORY_TARGET_MIB else "MISSED"
    rows.append(
        [
            "largest RSS of the API process in this run",
            f"{peak:.1f}",
            "",
            "",
            f"≤ {MEMORY_TARGET_MIB:.0f} MiB: {verdict}",
        ]
    )
    return markdown_table(["step", "RSS MiB", "USS MiB", "note", "target (issue 8)"], rows)


def report(args: argparse.Namespace, mem: MemoryResult, scale: list[ScaleRow]) -> tuple[list[str], str]:
    facts = [
        "one process: `twinstore serve --workers 1 --no-ingest --no-anomaly` (the same settings by "
        "environment); RSS and USS (psutil, `memory_full_info`) of the process and its children",
        *mem.facts,
    ]
    lines = [
        "Memory of one API process:",
        "",
        memory_table(mem.steps),
        "",
        "- for context only (not measured here): Ditto's things service is given ~1.8 GB of heap for "
        "10k hot things",
        f"- per WebSocket session (RSS growth over the process before the sessions / sessions): "
        f"{mem.per_session_idle:.1f} KiB idle, {mem.per_session_load:.1f} KiB after the write load",
        "",
        f"Throughput from 1 to {max(args.scale_counts)} API processes (each `serve --workers 1 "
        "--no-ingest --no-anomaly` on its own port, one database and NATS prefix, started afresh "
        f"per count; wrk {args.connections} connections, one thread each for PUT, "
        f"6 threads for GET, threads spread round-robin over the processes; {args.duration:.0f} s "
        f"per run after {args.warmup:.0f} s of warm-up PUTs; durable writes, synchronous_commit=on):",
        "",
        markdown_table(SCALE_HEADERS, [r.cells() for r in scale]),
        "",
    ]
    puts = {r.processes: r for r in scale if r.test.startswith("PUT")}
    gets = {r.processes: r for r in scale if r.test.startswith("GET")}
    for name, rows in (("PUT", puts), ("GET", gets)):
        if 1 in rows and len(rows) > 1:
            ratios = ", ".join(f"{n}: {rows[n].rate / rows[1].rate:.2f} x" for n in sorted(rows) if n != 1)
            lines.append(f"- {name} throughput relative to 1 process: {ratios}")
    lines.append(
        "- events/commit: events per group-commit transaction, over all processes; decided under lock: "
        "the share of writes whose thing was not in the writing process's cache or had been written "
        "by another process since (its head moved), so they were decided again under the journal's "
        "lock (`twinstore_journal_replans_total` / `..._events_appended_total` of /metrics; the "
        "caches start empty with each count)"
    )
    return facts, "\n".join(lines) + "\n"


async def run(args: argparse.Namespace, database_url: str, tmp: Path) -> tuple[list[str], str]:
    users = tmp / "users.htpasswd"
    write_users_file(users, {USER: PASSWORD})
    cluster = Cluster(database_url, args, users, tmp)
    try:
        mem = await memory_part(args, cluster, tmp)
        scale = await scale_part(args, cluster, tmp)
    finally:
        await cluster.close()
    return report(args, mem, scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--things", type=int, default=100_000, help="things created through the process")
    parser.add_argument("--seed-connections", type=int, default=64, help="wrk connections creating them")
    parser.add_argument("--read-seconds", type=float, default=5.0, help="seconds of GETs after the seeding")
    parser.add_argument("--sessions", type=int, default=1_000, help="WebSocket sessions")
    parser.add_argument(
        "--things-per-session", type=int, default=10, help="things each session subscribes to"
    )
    parser.add_argument("--client-processes", type=int, default=2, help="processes holding the sessions")
    parser.add_argument("--rate", type=float, default=200.0, help="writes/s while the sessions are open")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="seconds of that write load")
    parser.add_argument("--scale", default="1,2,3", help="comma-separated API process counts")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections in the scaling runs")
    parser.add_argument("--write-things", type=int, default=10_000, help="things the scaling PUTs address")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured PUT run")
    parser.add_argument("--duration-get", type=float, default=8.0, help="seconds per GET run (0: none)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up PUTs per count")
    parser.add_argument(
        "--quiet-wait", type=float, default=15.0, help="wait up to this long for an idle machine before a run"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.scale_counts = [int(n) for n in str(args.scale).split(",") if n.strip()]
    return args


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("bench/footprint.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    raise_nofile()  # the server processes inherit it (1,000+ sockets)
    return await run_on_fresh_database(
        args,
        name="footprint",
        title="Footprint and scaling (issue 8): memory of one API process, 1 to 3 API processes",
        run=lambda url, tmp: run(args, url, tmp),
    )


def main() -> None:
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
