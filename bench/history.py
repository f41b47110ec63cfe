"""History reads, audit verify and replay at 100,000 events per thing: issue 5's figures.

Measured in one run on a fresh database:

* **Seed** one thing with ``--events`` revisions (default 100,000: a create, then single-property
  modifies) and ``--things`` other things with ``--events-per-thing`` revisions each, all through
  :class:`twinstore.service.ThingService` (validation, policy, journal with its hash chain and
  snapshots every ``snapshot_every`` revisions, projection), ``--concurrency`` writes in flight
  so the journal's group commit batches them. Every event is a real journal event.
* **Historical reads** over HTTP against ``twinstore serve`` (one worker), sequentially:
  ``GET /api/2/things/{id}?at-historical-revision=N`` of the big thing at ``--reads`` random
  revisions; p50 / p95 / max. Target: <= 50 ms. Baseline in the same run: ``GET`` of its current
  state.
* **Audit and replay**: ``twinstore audit verify --all --json`` and ``twinstore replay --all
  --json`` as subprocesses; wall time (process start included) and events/s over every journal
  event. Target: >= 50,000 events/s each. Baseline in the same run: the same journal rows
  streamed by a raw asyncpg server-side cursor (the floor of any pass over the journal).
* **Export**: ``twinstore export --all --output FILE`` as a subprocess; wall time (process start
  included), events/s = lines written / wall time (the line count is checked against the
  journal's event count), file size and MB/s. Target: >= 100,000 events/s. Baseline in the same
  run: the same rows through a raw asyncpg server-side cursor written as NDJSON with orjson, one
  flat object per row (the minimum any Python exporter does). ``--export-runs`` runs of each,
  alternating, each after waiting for a quiet machine; the median is reported.

Run ``.venv/bin/python bench/history.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil
from api import Server
from benchlib import (
    ROOT,
    add_run_arguments,
    markdown_table,
    percentile,
    run_on_fresh_database,
    wait_quiet,
)

from twinstore.auth import AuthContext, write_users_file
from twinstore.model.thing import Create, Modify
from twinstore.runtime import Runtime
from twinstore.settings import load_settings
from twinstore.store.journal import WriteRequest

PASSWORD = "bench-pass"
BIG = "bench:big"
ALICE = AuthContext(("nginx:alice",))
READ_TARGET_MS = 50.0
PASS_TARGET = 50_000.0
EXPORT_TARGET = 100_000.0
MB = 1_000_000


def small_id(i: int) -> str:
    return f"ns{i % 10}:thing-{i:06d}"


async def write_all(rt: Runtime, requests: list[WriteRequest], concurrency: int, label: str) -> float:
    """Write ``requests`` in order with ``concurrency`` in flight; returns events/s."""
    queue = iter(requests)
    done = 0
    t0 = time.monotonic()
    step = max(1, len(requests) // 5)

    async def worker() -> None:
        nonlocal done
        assert rt.service is not None
        for request in queue:
            await rt.service.write(ALICE, request)
            done += 1
            if done % step == 0:
                print(f"  {label}: {done:,} events ({done / (time.monotonic() - t0):,.0f}/s)", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(requests) / (time.monotonic() - t0)


def request(thing: str, command: Create | Modify) -> WriteRequest:
    return WriteRequest(thing_id=thing, command=command, originator="alice")


async def seed(rt: Runtime, args: argparse.Namespace) -> list[str]:
    facts: list[str] = []
    create = Create(value={"attributes": {"n": 0}, "features": {"env": {"properties": {"t": 0.0}}}})
    assert rt.service is not None
    await rt.service.write(ALICE, request(BIG, create))
    rng = random.Random(5)
    big = [
        request(BIG, Modify(path="/features/env/properties/t", value=round(rng.uniform(0, 100), 3)))
        if i % 2
        else request(BIG, Modify(path="/attributes/n", value=i))
        for i in range(1, args.events)
    ]
    rate = await write_all(rt, big, args.concurrency, BIG)
    facts.append(f"seeded {BIG} with {args.events:,} revisions through ThingService at {rate:,.0f} events/s")
    # the other things: a create each, then modifies interleaved across things
    creates = [request(small_id(i), create) for i in range(args.things)]
    modifies = [
        request(small_id(i), Modify(path="/attributes/n", value=k))
        for k in range(1, args.events_per_thing)
        for i in range(args.things)
    ]
    t0 = time.monotonic()
    await write_all(rt, creates, args.concurrency, "other things, creates")
    await write_all(rt, modifies, args.concurrency, "other things, modifies")
    rate = (len(creates) + len(modifies)) / (time.monotonic() - t0)
    facts.append(
        f"seeded {args.things:,} other things with {args.events_per_thing} revisions each "
        f"at {rate:,.0f} events/s"
    )
    return facts


async def time_get(client: httpx.AsyncClient, path: str, params: dict[str, str], expect: int | None) -> float:
    t0 = time.perf_counter()
    r = await client.get(path, params=params, auth=("alice", PASSWORD))
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"GET {path} {params}: {r.status_code} {r.text}")
    if expect is not None and r.json()["_revision"] != expect:
        raise RuntimeError(f"GET {path} {params}: revision {r.json()['_revision']}, expected {expect}")
    return ms


def latency_row(name: str, samples: list[float], target: str) -> list[object]:
    s = sorted(samples)
    return [
        name,
        f"{len(s):,}",
        f"{statistics.median(s):.1f} ms",
        f"{percentile(s, 0.95):.1f} ms",
        f"{s[-1]:.1f} ms",
        target,
    ]


async def reads(server: Server, args: argparse.Namespace) -> list[list[object]]:
    path = f"/api/2/things/{BIG}"
    rng = random.Random(11)
    revisions = [rng.randint(1, args.events) for _ in range(args.reads)]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        for rev in revisions[:10]:  # warm connections, caches and plans
            await time_get(
                client, path, {"fields": "thingId,_revision", "at-historical-revision": str(rev)}, None
            )
            await time_get(client, path, {}, None)
        historical: list[float] = []
        current: list[float] = []
        for rev in revisions:
            # _revision is asked for alongside the whole thing to check the revision read
            params = {"at-historical-revision": str(rev), "fields": "thingId,attributes,features,_revision"}
            historical.append(await time_get(client, path, params, rev))
            current.append(
                await time_get(client, path, {"fields": "thingId,attributes,features,_revision"}, args.events)
            )
    worst = percentile(sorted(historical), 0.95)
    verdict = f"≤ {READ_TARGET_MS:.0f} ms (p95): " + ("met" if worst <= READ_TARGET_MS else "MISSED")
    return [
        latency_row(f"GET {BIG} at a random revision (1..{args.events:,})", historical, verdict),
        latency_row(f"baseline: GET {BIG} current state", current, "-"),
    ]


def run_cli(database_url: str, *command: str) -> tuple[float, dict[str, object]]:
    seconds, proc = run_process(database_url, *command, "--json")
    return seconds, json.loads(proc.stdout)


def run_process(database_url: str, *command: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """``twinstore COMMAND`` as a subprocess on ``database_url``: (wall seconds, the process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINSTORE_")}
    env["TWINSTORE_DATABASE_URL"] = database_url
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "twinstore.cli", *command],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"twinstore {' '.join(command)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return seconds, proc


async def cursor_baseline(database_url: str) -> tuple[float, int]:
    """Stream every journal row (all columns) in chain order with a server-side cursor."""
    con = await asyncpg.connect(database_url)
    try:
        rows = 0
        t0 = time.monotonic()
        async with con.transaction(isolation="repeatable_read", readonly=True):
            cursor = con.cursor(
                "SELECT entity, id, revision, ts, action, path, value, originator, correlation_id, hash "
                "FROM journal ORDER BY entity, id, revision",
                prefetch=2000,
            )
            async for _ in cursor:
                rows += 1
        return time.monotonic() - t0, rows
    finally:
        await con.close()


SELECT_JOURNAL = (
    "SELECT entity, id, revision, ts, action, path, value::text AS value, originator, "
    "correlation_id, hash FROM journal ORDER BY entity, id, revision"
)


def flat_lines(rows: list[asyncpg.Record]) -> bytes:
    """One flat orjson object per journal row (value as its stored JSON text, ts as RFC 3339,
    hash as hex), each with its newline."""
    dumps, options = orjson.dumps, orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE
    out: list[bytes] = []
    for entity, id_, revision, ts, action, path, value, originator, correlation_id, hash_ in rows:
        row = {
            "entity": entity,
            "id": id_,
            "revision": revision,
            "ts": ts,
            "action": action,
            "path": path,
            "value": value,
            "originator": originator,
            "correlation_id": correlation_id,
            "hash": hash_.hex(),
        }
        out.append(dumps(row, option=options))
    return b"".join(out)


async def export_baseline(database_url: str, path: Path) -> float:
    """The journal's rows as NDJSON (:func:`flat_lines`) through a raw server-side cursor in one
    snapshot, fetched in batches of 2,000, the next batch requested before the current one is
    encoded (as the export does); returns the seconds taken."""
    con = await asyncpg.connect(database_url)
    try:
        t0 = time.monotonic()
        with path.open("wb") as out:
            async with con.transaction(isolation="repeatable_read", readonly=True):
                cursor = await con.cursor(SELECT_JOURNAL)
                pending = asyncio.ensure_future(cursor.fetch(2000))
                while rows := await pending:
                    pending = asyncio.ensure_future(cursor.fetch(2000))
                    await asyncio.sleep(0)  # sends the request for the next batch
                    out.write(flat_lines(rows))
        return time.monotonic() - t0
    finally:
        await con.close()


def count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n")
    return lines


@dataclass
class ExportRun:
    seconds: float
    exporter: float  # cores busy with the exporter (this script, or the export process)
    rest: float  # cores busy with everything else: PostgreSQL and any other work on the machine
    quiet: float  # busy cores on the machine (1 s sample) just before the run


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def measure_export(
    export: Callable[[], Awaitable[float]], cpu: Callable[[], float], quiet: float
) -> ExportRun:
    """Run ``export`` (returns its wall seconds); ``cpu``: the exporter's CPU seconds so far."""
    busy0, cpu0, t0 = busy_seconds(), cpu(), time.monotonic()
    seconds = await export()
    elapsed = time.monotonic() - t0
    exporter = cpu() - cpu0
    rest = max(0.0, busy_seconds() - busy0 - exporter)
    return ExportRun(seconds, exporter / elapsed, rest / elapsed, quiet)


def export_row(name: str, runs: list[ExportRun], path: Path, events: int, target: bool) -> list[object]:
    """The run with the median wall time, checked: as many lines in ``path`` as journal events."""
    lines = count_lines(path)
    if lines != events:
        raise RuntimeError(f"{name}: {lines:,} lines in {path}, the journal holds {events:,} events")
    size = path.stat().st_size
    run = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    rate = lines / run.seconds
    verdict = "-"
    if target:
        verdict = f"≥ {EXPORT_TARGET:,.0f} events/s: " + ("met" if rate >= EXPORT_TARGET else "MISSED")
    return [
        name,
        f"{lines:,}",
        f"{run.seconds:.2f} s",
        f"{rate:,.0f}",
        f"{size / MB:.1f} MB",
        f"{size / MB / run.seconds:.1f}",
        f"{run.exporter:.2f} / {run.rest:.2f}",
        verdict,
    ]


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


async def exports(
    database_url: str, tmp: Path, events: int, args: argparse.Namespace
) -> tuple[list[str], list[list[object]]]:
    """``twinstore export --all`` (subprocess) vs the raw cursor + orjson baseline over the same
    rows, ``--export-runs`` times each, alternating, each after waiting for a quiet machine."""
    facts = [f"load average (1 / 5 / 15 min) before the exports: {load_average()}"]
    baseline, exported = tmp / "baseline.ndjson", tmp / "export.ndjson"
    await export_baseline(database_url, baseline)  # warms the cache for both
    base_runs: list[ExportRun] = []
    export_runs: list[ExportRun] = []
    report = ""

    async def export() -> float:
        nonlocal report
        seconds, proc = run_process(database_url, "export", "--all", "--output", str(exported))
        report = proc.stderr.strip().splitlines()[-1]
        return seconds

    for _ in range(args.export_runs):
        base_runs.append(
            await measure_export(
                lambda: export_baseline(database_url, baseline),
                time.process_time,
                wait_quiet(args.quiet_wait),
            )
        )
        export_runs.append(await measure_export(export, children_cpu, wait_quiet(args.quiet_wait)))
        print(
            f"  baseline {events / base_runs[-1].seconds:,.0f} events/s, "
            f"export {events / export_runs[-1].seconds:,.0f} events/s",
            flush=True,
        )
    rows = [
        export_row(
            "baseline: raw asyncpg cursor + orjson, one flat object per row",
            base_runs,
            baseline,
            events,
            False,
        ),
        export_row(
            "`twinstore export --all --output FILE` (subprocess, wall)", export_runs, exported, events, True
        ),
    ]
    baseline.unlink()
    exported.unlink()

    def rates(runs: list[ExportRun]) -> str:
        return ", ".join(f"{events / r.seconds:,.0f} (busy {r.quiet:.2f})" for r in runs)

    facts += [
        f"exports: {args.export_runs} runs each, alternating, each after waiting up to "
        f"{args.quiet_wait:.0f} s for fewer than 0.3 busy cores; the table shows the run with the "
        "median wall time; CPU: cores busy during that run (exporter: this script for the "
        "baseline, the export process for the export; rest: PostgreSQL and any other work on the "
        "machine)",
        f"baseline runs, events/s (machine's busy cores just before): {rates(base_runs)}",
        f"export runs, events/s (machine's busy cores just before): {rates(export_runs)}",
        f"`twinstore export --all` reported (last run): {report}",
        f"load average (1 / 5 / 15 min) after the exports: {load_average()}",
    ]
    return facts, rows


def pass_row(name: str, seconds: float, events: int, target: bool) -> list[object]:
    rate = events / seconds
    verdict = "-"
    if target:
        verdict = f"≥ {PASS_TARGET:,.0f} events/s: " + ("met" if rate >= PASS_TARGET else "MISSED")
    return [name, f"{events:,}", f"{seconds:.2f} s", f"{rate:,.0f}", verdict]


async def passes(database_url: str) -> tuple[list[str], list[list[object]], int]:
    con = await asyncpg.connect(database_url)
    try:
        events = int(await con.fetchval("SELECT count(*) FROM journal"))
        size = await con.fetchval("SELECT pg_size_pretty(pg_total_relation_size('journal'))")
    finally:
        await con.close()
    facts = [f"journal: {events:,} events (all entities: things and their policies), {size} with indexes"]
    rows: list[list[object]] = []
    seconds, rows_read = await cursor_baseline(database_url)  # also warms the cache for the others
    seconds, rows_read = await cursor_baseline(database_url)
    rows.append(
        pass_row("baseline: raw asyncpg server-side cursor over the journal", seconds, rows_read, False)
    )
    print(markdown_table(PASS_HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
    for command in (("audit", "verify", "--all"), ("replay", "--all")):
        seconds, report = run_cli(database_url, *command)
        rows.append(
            pass_row(f"`twinstore {' '.join(command)} --json` (subprocess, wall)", seconds, events, True)
        )
        print(markdown_table(PASS_HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
        summary = {k: v for k, v in report.items() if not isinstance(v, list | dict)}
        facts.append(f"`twinstore {' '.join(command)}` reported {json.dumps(summary)}")
    return facts, rows, events


READ_HEADERS = ["read", "requests", "p50", "p95", "max", "target"]
PASS_HEADERS = ["pass over the journal", "events", "wall time", "events/s", "target"]
EXPORT_HEADERS = [
    "export to NDJSON",
    "lines",
    "wall time",
    "events/s",
    "file",
    "MB/s",
    "CPU cores exporter / rest",
    "target",
]


async def run(args: argparse.Namespace, database_url: str, tmp: Path) -> tuple[list[str], str]:
    settings = load_settings(
        {}, database_url=database_url, nats_url=args.nats_url, nats_prefix=f"bh{secrets.token_hex(4)}"
    )
    facts = [f"snapshot_every={settings.snapshot_every}, max_batch={settings.max_batch}"]
    rt = Runtime(settings)
    await rt.open()
    try:
        print(f"seeding {args.events:,} revisions of {BIG} and {args.things:,} other things", flush=True)
        facts += await seed(rt, args)
    finally:
        await rt.close()
    con = await asyncpg.connect(database_url)
    try:
        for table in ("journal", "snapshots", "things", "policies"):
            await con.execute(f"VACUUM ANALYZE {table}")
    finally:
        await con.close()
    users = tmp / "users"
    write_users_file(users, {"alice": PASSWORD})
    server = Server(database_url, args.nats_url, users, 1, tmp / "server.log")
    try:
        server.start()
        read_rows = await reads(server, args)
        print(markdown_table(READ_HEADERS, read_rows), flush=True)
    finally:
        server.stop()
        await server.delete_stream()
    pass_facts, pass_rows, events = await passes(database_url)
    export_facts, export_rows = await exports(database_url, tmp, events, args)
    tables = "\n\n".join(
        [
            markdown_table(READ_HEADERS, read_rows),
            markdown_table(PASS_HEADERS, pass_rows),
            markdown_table(EXPORT_HEADERS, export_rows),
        ]
    )
    return facts + pass_facts + export_facts, tables


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=100_000, help="revisions of the big thing (default 100,000)"
    )
    parser.add_argument("--things", type=int, default=2_000, help="other things (default 2,000)")
    parser.add_argument("--events-per-thing", type=int, default=100, help="revisions of each other thing")
    parser.add_argument("--reads", type=int, default=300, help="historical reads (default 300)")
    parser.add_argument("--concurrency", type=int, default=256, help="writes in flight while seeding")
    parser.add_argument("--export-runs", type=int, default=3, help="runs of each export (default 3)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="wait up to this long for an idle machine before each export",
    )
    add_run_arguments(parser)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    return await run_on_fresh_database(
        args, name="history", title="History and audit (issue 5)", run=lambda url, tmp: run(args, url, tmp)
    )


def main() -> None:
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
