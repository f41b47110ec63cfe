"""HTTP benchmark of a real ``twinstore serve`` process, with raw asyncpg inserts as the baseline.

For each ``--workers`` value it creates a fresh database, starts ``twinstore serve`` on it
(the machine's PostgreSQL and NATS, a bcrypt users file, its own NATS subject prefix), seeds
``--things`` things over HTTP, then drives it with wrk (a C load generator, so the CPU is left
to the server and PostgreSQL):

* GET /api/2/things/{id} of random seeded things;
* PUT /api/2/things/{id}/features/f/properties/temp (a single property, durable: the server
  keeps PostgreSQL's default synchronous_commit=on);
* PATCH /api/2/things/{id} with a merge patch of a single property.

Write runs use one wrk thread per client, and each thread stops after the first response past
the deadline, so no write is in flight when wrk ends: afterwards the journal must hold exactly
one event per acknowledged write, gapless per thing, and the projection and NATS must agree.

Baseline (same PostgreSQL, same run, no server running): raw asyncpg inserts of the same event
rows into a copy of the journal table, (a) one row per transaction from ``--clients``
concurrent connections, (b) ``INSERT ... SELECT FROM unnest`` of rows of one partition with
the batch size the server's group commit formed, one transaction at a time. Like the
journal's, every row has its partition and a ``seq`` numbered under that partition's row lock
(held until commit, as the recorder's): precomputed under the lock in the insert statement
itself, on a copy of ``partition_heads`` (``benchlib.insert_events``), so the baseline pays
the same lock and numbering without the recorder's JSON rows and projection.

Run ``.venv/bin/python bench/api.py --help``; needs ``wrk`` (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import psutil
from benchlib import (
    ROOT,
    CpuMeter,
    CpuUse,
    Verdict,
    command_line,
    create_database,
    create_journal_copy,
    default_database_url,
    default_nats_url,
    drop_database,
    drop_journal_copy,
    insert_events,
    machine_notes,
    markdown_table,
    percentile,
    process_cpu,
    summary,
    wait_quiet,
    write_section,
)

from twinstore.auth import write_users_file
from twinstore.bus.streams import delete_streams
from twinstore.bus.subjects import Subjects
from twinstore.store.recorder import Recorder

USER, PASSWORD = "bench", "bench-password"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
NAMESPACE_PREFIX = "/api/2/things/org.bench:t"
PROPERTY = "/features/f/properties/temp"
MERGE_TEMPLATE = '{"features":{"f":{"properties":{"humidity":%d}}}}'
GET_TARGET = (5_000.0, 20.0)  # requests/s, p99 ms
WRITE_TARGET = 3_000.0  # writes/s

# wrk scripts. Thing ids are org.bench:t1 .. org.bench:tN, picked at random per request.
_SEED = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) / 1e9
end
local function reseed()
  ffi.C.clock_gettime(1, clock)
  local address = tonumber(string.match(tostring({}), "0x(%x+)"), 16) or 0
  math.randomseed((tonumber(clock.tv_nsec) + address) % 2147483647)
end
"""

GET_LUA = (
    _SEED
    + r"""
function init(args)
  prefix = args[1]
  count = tonumber(args[2])
  hdrs = { ["Authorization"] = args[3] }
  reseed()
end

function request()
  return wrk.format("GET", prefix .. math.random(count), hdrs)
end

function done(summary, latency, requests)
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
"""
)

WRITE_LUA = (
    _SEED
    + r"""
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  method = args[1]
  prefix = args[2]
  count = tonumber(args[3])
  suffix = args[4]
  template = args[5]
  deadline = now() + tonumber(args[6])
  hdrs = { ["Authorization"] = args[7], ["Content-Type"] = args[8] }
  acked = 0
  failed = 0
  first = 0
  last = 0
  seq = 0
  reseed()
end

function request()
  if first == 0 then first = now() end
  seq = seq + 1
  return wrk.format(method, prefix .. math.random(count) .. suffix, hdrs, string.format(template, seq))
end

function response(status, headers, body)
  if status >= 200 and status < 300 then acked = acked + 1 else failed = failed + 1 end
  last = now()
  -- One connection per thread: stopping here leaves no write in flight.
  if last >= deadline then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local a, f, t0, t1 = 0, 0, math.huge, 0
  for _, thread in ipairs(threads) do
    a = a + thread:get("acked")
    f = f + thread:get("failed")
    local first = thread:get("first")
    local last = thread:get("last")
    if first > 0 and first < t0 then t0 = first end
    if last > t1 then t1 = last end
  end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%f,"acked":%d,"failed":%d,"elapsed":%f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean, a, f, t1 - t0))
end
"""
)


# ---- measurements -------------------------------------------------------------------------


@dataclass
class Result:
    workers: int
    test: str
    clients: int
    rate: float  # requests or writes per second
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    requests: int
    batch: float | None = None
    cpu: CpuUse = field(default_factory=CpuUse)


def run_wrk(
    options: list[str],
    script: Path,
    url: str,
    script_args: list[str],
    *,
    busy: float,
    meter: CpuMeter,
) -> tuple[dict[str, Any], CpuUse]:
    """Run wrk; returns the JSON line its ``done`` hook printed and the CPU used in the first
    ``busy`` seconds (write runs idle after their deadline until wrk's own end)."""
    cmd = ["wrk", *options, "--timeout", "10s", "-s", str(script), url, "--", *script_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wrk = psutil.Process(proc.pid)
    begin = meter.start()
    time.sleep(busy)
    cpu = meter.stop(begin, process_cpu(wrk))
    stdout, stderr = proc.communicate(timeout=busy + 120)
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            result: dict[str, Any] = json.loads(line[len("BENCH ") :])
            return result, cpu
    raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout}\n{stderr}")


def _errors(out: dict[str, Any]) -> int:
    keys = ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
    return sum(int(out[k]) for k in keys)


# ---- the server ---------------------------------------------------------------------------


class Server:
    """A ``twinstore serve`` process on its own database and NATS prefix."""

    def __init__(
        self,
        database_url: str,
        nats_url: str,
        users_file: Path,
        workers: int,
        log: Path,
        root: Path = ROOT,
    ) -> None:
        """``root``: the source tree to run (another checkout runs a baseline version)."""
        self.root = root
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"bench{secrets.token_hex(4)}"
        self.database_url = database_url
        self.nats_url = nats_url
        self.workers = workers
        self.log = log
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TWINSTORE_")}
        self.env.update(
            TWINSTORE_DATABASE_URL=database_url,
            TWINSTORE_NATS_URL=nats_url,
            TWINSTORE_USERS_FILE=str(users_file),
            TWINSTORE_NATS_PREFIX=self.prefix,
            TWINSTORE_LOG_LEVEL="warning",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        cmd = [sys.executable, "-m", "twinstore.cli", "serve", "--port", str(self.port)]
        cmd += ["--workers", str(self.workers)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, env={**self.env, "PYTHONPATH": str(self.root)}, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        healthy = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    healthy += 1
                    if healthy >= 2 * self.workers:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not become healthy:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def delete_stream(self) -> None:
        nc = await nats.connect(self.nats_url)
        try:
            await delete_streams(nc.jetstream(), self.prefix)
        except Exception:  # already gone or never created: nothing to clean
            pass
        finally:
            await nc.close()


async def seed(url: str, things: int, concurrency: int = 32) -> None:
    """PUT ``things`` things with one feature ``f`` (properties temp, humidity, counter)."""
    queue = iter(range(1, things + 1))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in queue:
            body = {
                "attributes": {"model": "bench", "serial": i},
                "features": {"f": {"properties": {"temp": 20.0, "humidity": 50, "counter": 0}}},
            }
            r = await client.put(f"{NAMESPACE_PREFIX}{i}", json=body)
            if r.status_code not in (201, 204):
                raise RuntimeError(f"seeding thing {i}: {r.status_code} {r.text}")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": AUTHORIZATION}, limits=limits, timeout=30
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


# ---- journal checks -------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


async def journal_position(database_url: str) -> int:
    con = await asyncpg.connect(database_url)
    try:
        return int(await con.fetchval("SELECT coalesce(max(position), 0) FROM journal"))
    finally:
        await con.close()


async def batch_size(database_url: str, after_position: int) -> float:
    """Average events per write transaction since ``after_position`` (rows sharing an xmin)."""
    con = await asyncpg.connect(database_url)
    try:
        row = await con.fetchrow(
            "SELECT count(*) AS events, count(DISTINCT xmin::text) AS txns FROM journal WHERE position > $1",
            after_position,
        )
    finally:
        await con.close()
    assert row is not None
    return float(row["events"]) / max(1, int(row["txns"]))


async def check_journal(server: Server, things: int, acked: int) -> list[Check]:
    """After the write runs: one event per acknowledged write, gapless, projection and NATS agree."""
    con = await asyncpg.connect(server.database_url)
    try:
        sync = await con.fetchval("SHOW synchronous_commit")
        # Thing events only: the default policies created with the things are journal events
        # too (entity 'policy'), but they are not published on the events stream.
        events = int(await con.fetchval("SELECT count(*) FROM journal WHERE entity = 'thing'"))
        writes = int(
            await con.fetchval("SELECT count(*) FROM journal WHERE entity = 'thing' AND revision > 1")
        )
        gaps = int(
            await con.fetchval(
                """SELECT count(*) FROM (SELECT revision, row_number() OVER (PARTITION BY entity, id
                   ORDER BY revision) AS n FROM journal) j WHERE revision <> n"""
            )
        )
        stale = int(
            await con.fetchval(
                """SELECT count(*) FROM things t JOIN (SELECT id, max(revision) AS r FROM journal
                   WHERE entity = 'thing' GROUP BY id) j USING (id) WHERE t.revision <> j.r"""
            )
        )
    finally:
        await con.close()
    published = await _published(server, events)
    return [
        Check("durable", sync == "on", f"synchronous_commit={sync}"),
        Check(
            "one event per acknowledged write",
            writes == acked,
            f"{acked:,} writes acknowledged (2xx), {writes:,} events after the {things:,} creations",
        ),
        Check("gapless", gaps == 0, f"{gaps} events off their place in 1..n per thing"),
        Check("projection", stale == 0, f"{stale} things whose revision differs from the journal's"),
        Check("published", published == events, f"{published:,} of {events:,} events on JetStream"),
    ]


async def _published(server: Server, expected: int, wait: float = 30.0) -> int:
    nc = await nats.connect(server.nats_url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + wait
        while True:
            info = await js.stream_info(Subjects(server.prefix).events_stream)
            count = int(info.state.messages)
            if count >= expected or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


# ---- the raw asyncpg baseline ---------------------------------------------------------------

RAW_TABLE = "raw_journal"
# One row, numbered under its partition's row lock (held until commit, as the recorder's) in the
# same statement: the copy's head row is locked and moved, the row takes the new seq.
INSERT_RAW_ONE = f"""
WITH head AS (UPDATE {RAW_TABLE}_heads SET seq = seq + 1 WHERE partition = $1 RETURNING seq)
INSERT INTO {RAW_TABLE} (partition, seq, entity, id, revision, ts, action, path, value, originator,
                         correlation_id, hash)
SELECT $1, head.seq, 'thing', $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM head
"""
INSERT_RAW_BATCH = insert_events(RAW_TABLE)


class RowSource:
    """Event rows as the journal writes them for a single-property PUT, revisions per thing."""

    def __init__(self, things: int, partitions: int) -> None:
        self.things = things
        self.revisions: defaultdict[int, int] = defaultdict(int)
        self.seq = 0
        recorder = Recorder(partitions)
        self.partition_of = {n: recorder.partition(f"org.bench:t{n}") for n in range(1, things + 1)}
        by_partition: defaultdict[int, list[int]] = defaultdict(list)
        for n, partition in self.partition_of.items():
            by_partition[partition].append(n)
        self.by_partition = dict(by_partition)

    def row(self, n: int | None = None) -> tuple[Any, ...]:
        """(partition, the nine event columns) of a write of thing ``n`` (default: a random one)."""
        self.seq += 1
        if n is None:
            n = 1 + secrets.randbelow(self.things)
        self.revisions[n] += 1
        value = str(self.seq)
        return (
            self.partition_of[n],
            f"org.bench:t{n}",
            self.revisions[n],
            datetime.now(UTC),
            "modified",
            PROPERTY,
            value,
            f"nginx:{USER}",
            str(uuid.uuid4()),
            hashlib.sha256(value.encode()).digest(),
        )

    def columns(self, count: int) -> tuple[int, list[list[Any]]]:
        """A partition (at random) and ``count`` rows of its things as columns: one group commit
        holds the writes of one partition."""
        partition = secrets.choice(list(self.by_partition))
        ns = self.by_partition[partition]
        rows = [self.row(secrets.choice(ns))[1:] for _ in range(count)]
        return partition, [list(col) for col in zip(*rows, strict=True)]


async def raw_baseline(
    database_url: str, things: int, clients: int, batch: int, duration: float, quiet_wait: float
) -> list[Result]:
    """Raw inserts of journal rows: one per transaction from N connections, and batched."""
    con = await asyncpg.connect(database_url)
    try:
        partitions = await create_journal_copy(con, RAW_TABLE)
    finally:
        await con.close()
    results = []

    # (a) one row per transaction, ``clients`` connections at once.
    source = RowSource(things, partitions)
    pool = await asyncpg.create_pool(database_url, min_size=clients, max_size=clients)
    assert pool is not None
    latencies: list[float] = []

    async def single(deadline: float) -> None:
        async with pool.acquire() as c:
            while time.monotonic() < deadline:
                row = source.row()
                t0 = time.perf_counter()
                await c.execute(INSERT_RAW_ONE, *row)
                latencies.append(time.perf_counter() - t0)

    meter = CpuMeter(None)
    wait_quiet(quiet_wait)
    begin = meter.start()
    cpu0 = time.process_time()
    t0 = time.monotonic()
    await asyncio.gather(*(single(t0 + duration) for _ in range(clients)))
    elapsed = time.monotonic() - t0
    cpu = meter.stop(begin, time.process_time() - cpu0)
    await pool.close()
    latencies.sort()
    results.append(
        Result(
            0,
            "raw INSERT, 1 row/txn",
            clients,
            len(latencies) / elapsed,
            percentile(latencies, 0.5) * 1e3,
            percentile(latencies, 0.99) * 1e3,
            latencies[-1] * 1e3,
            0,
            len(latencies),
            1.0,
            cpu,
        )
    )

    # (b) ``INSERT ... SELECT FROM unnest``, ``batch`` rows of one partition per transaction.
    latencies = []
    con = await asyncpg.connect(database_url)
    try:
        wait_quiet(quiet_wait)
        begin = meter.start()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        rows = 0
        while time.monotonic() < t0 + duration:
            partition, columns = source.columns(batch)
            t1 = time.perf_counter()
            await con.execute(INSERT_RAW_BATCH, partition, *columns)
            latencies.append(time.perf_counter() - t1)
            rows += batch
        elapsed = time.monotonic() - t0
        cpu = meter.stop(begin, time.process_time() - cpu0)
        await drop_journal_copy(con, RAW_TABLE)
    finally:
        await con.close()
    latencies.sort()
    results.append(
        Result(
            0,
            f"raw INSERT unnest, {batch} rows/txn (one partition)",
            1,
            rows / elapsed,
            percentile(latencies, 0.5) * 1e3,
            percentile(latencies, 0.99) * 1e3,
            latencies[-1] * 1e3,
            0,
            rows,
            float(batch),
            cpu,
        )
    )
    return results


# ---- one configuration ---------------------------------------------------------------------


@dataclass
class Outcome:
    results: list[Result]
    checks: list[Check]


def _write_run(
    server: Server,
    script: Path,
    method: str,
    suffix: str,
    template: str,
    content_type: str,
    args: argparse.Namespace,
    duration: float,
    meter: CpuMeter,
) -> tuple[dict[str, Any], CpuUse]:
    # wrk's own end comes `grace` seconds after the threads' deadline: by then every thread has
    # stopped after its last response (latencies are far below it), so no write is in flight.
    grace = 3.0
    script_args = [method, NAMESPACE_PREFIX, str(args.things), suffix, template, str(duration)]
    return run_wrk(
        ["-t", str(args.clients), "-c", str(args.clients), "-d", f"{duration + grace:.0f}s"],
        script,
        server.url,
        [*script_args, AUTHORIZATION, content_type],
        busy=duration,
        meter=meter,
    )


async def run_configuration(
    args: argparse.Namespace, workers: int, database_url: str, users_file: Path, tmp: Path
) -> Outcome:
    get_script, write_script = tmp / "get.lua", tmp / "write.lua"
    get_script.write_text(GET_LUA)
    write_script.write_text(WRITE_LUA)
    server = Server(database_url, args.nats_url, users_file, workers, tmp / f"server-{workers}.log")
    results: list[Result] = []
    print(f"\n== twinstore serve --workers {workers}  (log: {server.log})", flush=True)
    server.start()
    try:
        t0 = time.monotonic()
        await seed(server.url, args.things)
        print(f"seeded {args.things:,} things in {time.monotonic() - t0:.1f} s", flush=True)
        meter = CpuMeter(server.proc.pid if server.proc else None)

        # GET: warm up (every worker process, the pool, caches), then measure.
        get_args = ["-t", str(args.get_threads), "-c", str(args.clients)]
        get_script_args = [NAMESPACE_PREFIX, str(args.things), AUTHORIZATION]
        run_wrk(
            [*get_args, "-d", f"{args.warmup:.0f}s"],
            get_script,
            server.url,
            get_script_args,
            busy=args.warmup,
            meter=meter,
        )
        wait_quiet(args.quiet_wait)
        out, cpu = run_wrk(
            [*get_args, "-d", f"{args.duration:.0f}s"],
            get_script,
            server.url,
            get_script_args,
            busy=args.duration - 0.2,
            meter=meter,
        )
        results.append(
            Result(
                workers,
                "GET thing",
                args.clients,
                out["requests"] / (out["duration_us"] / 1e6),
                out["p50_us"] / 1e3,
                out["p99_us"] / 1e3,
                out["max_us"] / 1e3,
                _errors(out),
                out["requests"],
                None,
                cpu,
            )
        )
        print(markdown_table(TABLE_HEADERS, [_row(results[-1])]), flush=True)

        # Writes: warm-up PUTs (counted in the journal check), then PUT and PATCH.
        acked = 0
        runs = [
            ("warm-up PUT", "PUT", PROPERTY, "%d", "application/json", args.warmup),
            ("PUT property", "PUT", PROPERTY, "%d", "application/json", args.duration),
            ("PATCH merge", "PATCH", "", MERGE_TEMPLATE, "application/merge-patch+json", args.duration),
        ]
        for name, method, suffix, template, content_type, duration in runs:
            wait_quiet(args.quiet_wait)
            position = await journal_position(database_url)
            out, cpu = _write_run(
                server, write_script, method, suffix, template, content_type, args, duration, meter
            )
            acked += int(out["acked"])
            if name.startswith("warm-up"):
                continue
            results.append(
                Result(
                    workers,
                    name,
                    args.clients,
                    out["acked"] / out["elapsed"],
                    out["p50_us"] / 1e3,
                    out["p99_us"] / 1e3,
                    out["max_us"] / 1e3,
                    _errors(out) + int(out["failed"]),
                    out["requests"],
                    await batch_size(database_url, position),
                    cpu,
                )
            )
            print(markdown_table(TABLE_HEADERS, [_row(results[-1])]), flush=True)
        checks = await check_journal(server, args.things, acked)
        for check in checks:
            print(f"  [{'ok' if check.ok else 'FAILED'}] {check.name}: {check.detail}", flush=True)
    finally:
        server.stop()
        await server.delete_stream()
    return Outcome(results, checks)


TABLE_HEADERS = [
    "workers",
    "test",
    "clients",
    "per second",
    "p50 ms",
    "p99 ms",
    "max ms",
    "errors",
    "events/txn",
    "CPU cores server / postgres / client / other",
]


def _row(r: Result) -> list[object]:
    return [
        r.workers or "-",
        r.test,
        r.clients,
        f"{r.rate:,.0f}",
        f"{r.p50_ms:.1f}",
        f"{r.p99_ms:.1f}",
        f"{r.max_ms:.1f}",
        r.errors,
        "-" if r.batch is None else f"{r.batch:.1f}",
        str(r.cpu),
    ]


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark a real `twinstore serve` (GET, PUT, PATCH) with wrk against raw asyncpg "
        "inserts, print a table and write the section 'api' of BENCHMARKS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before GET and writes")
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--get-threads", type=int, default=1, help="wrk threads for the GET run")
    parser.add_argument("--things", type=int, default=2_000, help="things seeded and addressed at random")
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated `twinstore serve --workers` values to run"
    )
    parser.add_argument(
        "--database-url",
        default=default_database_url(),
        help="admin database; a fresh database is created per configuration",
    )
    parser.add_argument("--nats-url", default=default_nats_url(), help="NATS with JetStream")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for the machine to be idle (shared machines)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="results file")
    parser.add_argument("--no-output", action="store_true", help="only print, do not write --output")
    parser.add_argument("--keep-databases", action="store_true", help="do not drop the databases")
    args = parser.parse_args(argv)
    args.worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    return args


def target_of(r: Result) -> Verdict:
    """Issue 2's target for a server run, judged on the figures its table row prints."""
    if r.test == "GET thing":
        return Verdict(
            f"workers={r.workers} {r.test}",
            f"{r.rate:,.0f} req/s, p99 {r.p99_ms:.1f} ms",
            f"≥ {GET_TARGET[0]:,.0f}/s, p99 ≤ {GET_TARGET[1]:.0f} ms",
            r.rate >= GET_TARGET[0] and r.p99_ms <= GET_TARGET[1],
        )
    return Verdict(
        f"workers={r.workers} {r.test}",
        f"{r.rate:,.0f} writes/s",
        f"≥ {WRITE_TARGET:,.0f}/s",
        r.rate >= WRITE_TARGET,
    )


def report(
    args: argparse.Namespace, notes: list[str], outcomes: list[Outcome], baseline: list[Result]
) -> str:
    results = [r for o in outcomes for r in o.results]
    verdicts = [target_of(r) for r in results]
    writes = [r for r in results if r.test != "GET thing"]
    ratio_headers = ["workers", "test", *(f"x {b.test}" for b in baseline)]
    ratio_rows = [[r.workers, r.test, *(f"{r.rate / b.rate:.2f}" for b in baseline)] for r in results]
    lines = [
        "## HTTP API: `twinstore serve` driven by wrk (bench/api.py)",
        "",
        "```",
        command_line(),
        "```",
        "",
        *(f"- {n}" for n in notes),
        f"- wrk {args.clients} connections on 127.0.0.1 (GET: {args.get_threads} wrk thread; writes: one "
        f"thread per connection), {args.things:,} seeded things picked at random, {args.duration:.0f} s "
        f"per run after {args.warmup:.0f} s warm-up; basic auth (bcrypt users file) on every request",
        "- load generator, server and PostgreSQL share the machine's cores; CPU columns are cores busy "
        "(1.00 = one core) during the run: the server's processes, all PostgreSQL processes, the load "
        "generator (wrk, or this script for the baseline), and everything else on the machine (other "
        "work on a shared machine; each run first waits for the machine to be idle)",
        "",
        markdown_table(
            [*TABLE_HEADERS, "target (issue 2)"],
            [[*_row(r), v.cell()] for r, v in zip(results, verdicts, strict=True)],
        ),
        "",
        "Raw asyncpg baseline, same PostgreSQL and run, same event rows (the journal's columns, a copy "
        "of its table with the same keys and indexes), no server running:",
        "",
        markdown_table(TABLE_HEADERS, [_row(r) for r in baseline]),
        "",
        "Each server run's rate relative to the raw baseline's (same run):",
        "",
        markdown_table(ratio_headers, ratio_rows),
        "",
        summary(
            notes,
            verdicts,
            [
                f"workers={r.workers} {r.test}: {r.rate / baseline[0].rate:.2f} x {baseline[0].test}"
                for r in writes
                if baseline
            ],
        ),
        "",
    ]
    lines.append("Journal after the write runs:")
    lines.append("")
    for o in outcomes:
        workers = o.results[0].workers if o.results else "?"
        for c in o.checks:
            lines.append(f"- workers={workers} {c.name}: {'ok' if c.ok else 'FAILED'} ({c.detail})")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("bench/api.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="twinstore-bench-"))
    users_file = tmp / "users.htpasswd"
    write_users_file(users_file, {USER: PASSWORD})
    notes = await machine_notes(args.database_url)
    print("\n".join(notes))
    outcomes: list[Outcome] = []
    baseline: list[Result] = []
    for workers in args.worker_counts:
        name, url = await create_database(args.database_url, "twinstore_bench")
        try:
            outcome = await run_configuration(args, workers, url, users_file, tmp)
            outcomes.append(outcome)
            if not baseline:
                batches = [r.batch for r in outcome.results if r.test == "PUT property" and r.batch]
                batch = max(1, round(batches[0])) if batches else 1
                print(
                    f"\n== raw asyncpg baseline ({args.clients} connections; batches of {batch})", flush=True
                )
                baseline = await raw_baseline(
                    url, args.things, args.clients, batch, args.duration, args.quiet_wait
                )
                print(markdown_table(TABLE_HEADERS, [_row(r) for r in baseline]), flush=True)
        finally:
            if not args.keep_databases:
                await drop_database(args.database_url, name)
    text = report(args, notes, outcomes, baseline)
    print("\n" + text)
    if not args.no_output:
        write_section(args.output, "api", text)
        print(f"wrote {args.output}")
    failed = [c for o in outcomes for c in o.checks if not c.ok]
    return 1 if failed else 0


def main() -> None:
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
