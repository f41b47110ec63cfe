"""NATS ingestion: sustained property updates/s and publish -> commit latency (issue 6's figures).

Measured in one run on a fresh database and a fresh NATS prefix, against a real ``twinstore
serve`` process (one worker; it runs the ingest worker, the journal and the relay):

* **Seed** ``--things`` things through :class:`twinstore.service.ThingService`, each with one
  feature whose policy lets the benchmark's source write.
* **Sustained ingestion**: ``--updates`` property updates published to JetStream as telemetry
  batches (``--rows`` rows per message, the things in turn, as an adapter would) while the
  server ingests them; the rate is updates / time from the first publish until the last event is
  committed (every one a durable journal event: counted in the journal afterwards, and the hash
  chains of the ingested things verified). Target: >= 20,000 updates/s. The publisher runs on
  the same 2 cores; so does PostgreSQL.
* **Baseline in the same run**: the same rows inserted by raw asyncpg into a copy of the
  journal table (same columns, keys and indexes), 1,000 rows of one partition per ``INSERT ...
  unnest`` and per transaction (the floor of writing these rows durably from Python), and
  ``COPY`` of the same rows. Like the journal's, each row has its partition and a ``seq``
  numbered under that partition's row lock, held until commit: precomputed per partition
  under the lock, on a copy of ``partition_heads`` (``benchlib.insert_events``: one statement
  locks and moves the head row and inserts the rows numbered after it; for ``COPY``,
  ``benchlib.number_events`` locks and moves the head, then the rows are copied with their
  seqs, in one transaction).
* **Latency**: ``--rate`` updates/s (default 5,000) for ``--seconds`` s, paced in messages of
  ``--latency-rows`` rows; per update the time from its publish to (a) its journal timestamp
  (when the write was decided, just before the commit) and (b) its event arriving on the
  NATS events subject (after the commit and the relay's publish: an upper bound of commit
  time). p50 / p99 / max. Target: p99 <= 100 ms.

Run ``.venv/bin/python bench/ingest.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
import psutil
from api import Server
from benchlib import (
    ROOT,
    CpuMeter,
    Verdict,
    add_run_arguments,
    create_journal_copy,
    drop_journal_copy,
    insert_events,
    markdown_table,
    number_events,
    percentile,
    run_on_fresh_database,
    wait_quiet,
)
from benchlib import (
    latency_cells as stats,
)

from twinstore.audit import Scope, verify_database
from twinstore.auth import AuthContext, write_users_file
from twinstore.bus.ingest import IngestSubjects, Update, initial_seq, telemetry_messages
from twinstore.bus.subjects import Subjects
from twinstore.model.thing import Create
from twinstore.runtime import Runtime
from twinstore.settings import load_settings
from twinstore.store.codec import GENESIS, canonical, chain_hash
from twinstore.store.journal import WriteRequest
from twinstore.store.recorder import Recorder

SOURCE = "bench-plc"
SUBJECT = "integration:bench-plc"
OWNER = "nginx:bench"
PATH = "/features/sensor/properties/value"
SAMPLE_PATH = "/features/sensor/properties"
COPY = "journal_copy"  # the baseline's copy of the journal table
BASELINE_ROWS = 1000  # rows per baseline transaction
COUNT = "SELECT count(*) FROM journal WHERE entity = 'thing' AND path LIKE '/features/sensor/properties%'"
# A SKAB sample: its eight signals, written as one merge (one event) per pump and time.
SIGNALS = [
    "Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
    "Voltage", "VolumeFlowRateRMS",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--things", type=int, default=1000)
    p.add_argument("--updates", type=int, default=300_000, help="updates in the throughput phase")
    p.add_argument("--rows", type=int, default=100, help="rows per telemetry message (throughput phase)")
    p.add_argument("--rate", type=int, default=5000, help="updates/s in the latency phase")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the latency phase")
    p.add_argument(
        "--latency-rows",
        type=int,
        default=100,
        help="rows per publish in the latency phase (adapters send every 20 ms: 100 rows at 5,000/s)",
    )
    p.add_argument("--quiet-wait", type=float, default=10.0, help="wait up to s for an idle machine first")
    p.add_argument(
        "--ingest-processes",
        type=int,
        default=1,
        help="`twinstore ingest` processes (topology separate): they share the partitions",
    )
    p.add_argument(
        "--topology",
        choices=["single", "separate"],
        default="separate",
        help="single: one `twinstore serve` ingests; separate: `twinstore serve --no-ingest` (API, relay, "
        "fan-out) and one `twinstore ingest` process (default)",
    )
    return p.parse_args()


def thing_ids(n: int) -> list[str]:
    return [f"bench.ingest:pump-{i:05d}" for i in range(n)]


async def seed(database_url: str, nats_url: str, prefix: str, things: list[str]) -> None:
    """Things whose policy lets the source write the sensor feature (through ThingService)."""
    settings = load_settings(
        {},
        database_url=database_url,
        nats_url=nats_url,
        nats_prefix=prefix,
        ingest_enabled=False,
        partitions=16,  # the database's count from here on: the server's and the publisher's
    )
    runtime = Runtime(settings)
    await runtime.open()
    try:
        assert runtime.service is not None
        auth = AuthContext(subjects=(OWNER,))
        policy = {
            "entries": {
                "owner": {
                    "subjects": {OWNER: {"type": "bench"}},
                    "resources": {
                        "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                        "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    },
                },
                "plc": {
                    "subjects": {SUBJECT: {"type": "ingest source"}},
                    "resources": {"thing:/features/sensor": {"grant": ["READ", "WRITE"], "revoke": []}},
                },
            }
        }

        async def one(thing_id: str) -> None:
            body = {"_policy": policy, "features": {"sensor": {"properties": {"value": 0.0}}}}
            await runtime.service.write(  # type: ignore[union-attr]
                auth, WriteRequest(thing_id=thing_id, command=Create(value=body), originator=OWNER)
            )

        for start in range(0, len(things), 100):
            await asyncio.gather(*(one(t) for t in things[start : start + 100]))
    finally:
        await runtime.close()


async def journal_count(database_url: str) -> int:
    con = await asyncpg.connect(database_url)
    try:
        return int(
            await con.fetchval(COUNT)
        )
    finally:
        await con.close()


async def wait_for_count(database_url: str, expected: int, timeout: float) -> float:
    """Poll the journal until ``expected`` sensor events are committed; the time it happened."""
    con = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            n = int(await con.fetchval(COUNT))
            if n >= expected:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n} of {expected} events after {timeout} s")
            await asyncio.sleep(0.05)
    finally:
        await con.close()


async def throughput(
    args: argparse.Namespace, database_url: str, prefix: str, things: list[str], signals: int
) -> dict[str, Any]:
    """Publish ``args.updates`` property updates as fast as JetStream takes them, each row one
    property (``signals == 1``) or one sample of ``signals`` properties merged in one event."""
    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    subjects = IngestSubjects(prefix, 16)
    seq = initial_seq()
    before = await journal_count(database_url)
    value = 0
    started = time.monotonic()
    published = 0
    pending: list[Any] = []
    while published < args.updates:
        rows = []
        for _ in range(args.rows):
            if signals == 1:
                rows.append(Update(things[value % len(things)], PATH, float(value)))
            else:
                sample = {name: float(value) + i for i, name in enumerate(SIGNALS[:signals])}
                rows.append(Update(things[value % len(things)], SAMPLE_PATH, sample))
            value += 1
        msgs = telemetry_messages(subjects, SOURCE, seq, rows)
        seq += len(msgs)
        for m in msgs:
            pending.append(js.publish(m.subject, m.payload, headers=m.headers))
        published += len(rows) * signals
        if len(pending) >= 64:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    publish_done = time.monotonic()
    end = await wait_for_count(database_url, before + published // signals, 600)
    await nc.close()
    seconds = end - started
    return {
        "signals": signals,
        "events": published // signals,
        "updates": published,
        "seconds": seconds,
        "rate": published / seconds,
        "publish_seconds": publish_done - started,
    }


async def baseline(database_url: str, n: int, things: list[str]) -> dict[str, float]:
    """The same rows written by raw asyncpg into a copy of the journal table, 1,000 rows of one
    partition per transaction (an ingest unit's things are in one partition), each numbered
    under its partition's row lock (benchlib.insert_events / number_events)."""
    con = await asyncpg.connect(database_url)
    try:
        recorder = Recorder(await create_journal_copy(con, COPY))
        now = datetime.now(UTC)
        by_partition: dict[int, list[tuple[Any, ...]]] = {}
        head = GENESIS
        for i in range(n):
            value = canonical(float(i))
            thing = things[i % len(things)]
            head = chain_hash(head, "thing", thing, 1_000_000 + i, now, "merged", PATH, value, SUBJECT, None)
            row = (thing, 1_000_000 + i, now, "merged", PATH, value.decode(), SUBJECT, None, head)
            by_partition.setdefault(recorder.partition(thing), []).append(row)
        chunks = [
            (partition, rows[start : start + BASELINE_ROWS])
            for partition, rows in by_partition.items()
            for start in range(0, len(rows), BASELINE_ROWS)
        ]
        insert = insert_events(COPY)
        started = time.monotonic()
        for partition, chunk in chunks:
            async with con.transaction():
                await con.execute(insert, partition, *[list(col) for col in zip(*chunk, strict=True)])
        insert_rate = n / (time.monotonic() - started)
        await drop_journal_copy(con, COPY)
        await create_journal_copy(con, COPY)
        number = number_events(COPY)
        started = time.monotonic()
        for partition, chunk in chunks:
            async with con.transaction():
                first = int(await con.fetchval(number, partition, len(chunk)))
                await con.copy_records_to_table(
                    COPY,
                    records=[
                        (partition, first + 1 + i, "thing", *r[:5], r[5], *r[6:]) for i, r in enumerate(chunk)
                    ],
                    columns=[
                        "partition", "seq", "entity", "id", "revision", "ts", "action", "path", "value",
                        "originator", "correlation_id", "hash",
                    ],
                )
        copy_rate = n / (time.monotonic() - started)
        await drop_journal_copy(con, COPY)
        return {"insert": insert_rate, "copy": copy_rate, "rows_per_txn": n / max(1, len(chunks))}
    finally:
        await con.close()


async def latency(
    args: argparse.Namespace, prefix: str, things: list[str], database_url: str
) -> dict[str, Any]:
    """Paced publishing; publish -> journal ts and publish -> event on NATS, per update."""
    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    subjects = IngestSubjects(prefix, 16)
    events = Subjects(prefix, 16)
    sent: dict[str, float] = {}  # marker value -> publish wall time
    arrived: dict[str, float] = {}

    async def on_event(msg: Any) -> None:
        envelope = orjson.loads(msg.data)
        value = envelope.get("value")
        if isinstance(value, str) and value.startswith("L"):
            arrived[value] = time.time()

    sub = await nc.subscribe(events.events_wildcard, cb=on_event)
    seq = initial_seq()
    per_message = args.latency_rows
    interval = per_message / args.rate
    total = int(args.rate * args.seconds)
    n = 0
    next_at = time.monotonic()
    while n < total:
        rows = []
        for _ in range(per_message):
            rows.append(Update(things[n % len(things)], PATH, f"L{n}"))
            n += 1
        msgs = telemetry_messages(subjects, SOURCE, seq, rows)
        seq += len(msgs)
        now = time.time()
        for row in rows:
            sent[row.value] = now
        await asyncio.gather(*(js.publish(m.subject, m.payload, headers=m.headers) for m in msgs))
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    elapsed_rate = total / (time.monotonic() - (next_at - total / args.rate))
    deadline = time.monotonic() + 60
    while len(arrived) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await sub.unsubscribe()
    await nc.close()
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch(
            "SELECT value #>> '{}' AS v, ts FROM journal WHERE entity = 'thing' AND path = $1 "
            "AND json_typeof(value) = 'string'",
            PATH,
        )
    finally:
        await con.close()
    decided = sorted((r["ts"].timestamp() - sent[r["v"]]) * 1000 for r in rows if r["v"] in sent)
    delivered = sorted((arrived[v] - sent[v]) * 1000 for v in arrived if v in sent)
    return {"updates": total, "rate": elapsed_rate, "decided": decided, "delivered": delivered}


async def run(database_url: str, tmp: Path) -> tuple[list[str], str, list[Verdict]]:
    args = ARGS
    things = thing_ids(args.things)
    users = tmp / "users"
    write_users_file(users, {"bench": "bench"})
    server = Server(database_url, args.nats_url, users, 1, tmp / "server.log")
    server.env["TWINSTORE_INGEST_SOURCES"] = orjson.dumps({SOURCE: [SUBJECT]}).decode()
    server.env["TWINSTORE_PARTITIONS"] = "16"
    workers: list[subprocess.Popen[bytes]] = []
    if args.topology == "separate":
        server.env["TWINSTORE_INGEST_ENABLED"] = "false"
    await seed(database_url, args.nats_url, server.prefix, things)
    base = await baseline(database_url, min(args.updates, 200_000), things)
    wait_quiet(args.quiet_wait)
    server.start()
    try:
        assert server.proc is not None
        pids = [server.proc.pid]
        if args.topology == "separate":
            env = {**server.env, "TWINSTORE_INGEST_ENABLED": "true"}
            for n in range(args.ingest_processes):
                with (tmp / f"ingest-{n}.log").open("ab") as out:
                    workers.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "twinstore.cli", "ingest"], env=env, stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT,
                        )
                    )
                pids.append(workers[-1].pid)
            # the workers claim their partitions (a rebalance round each)
            await asyncio.sleep(4 + 5 * (args.ingest_processes - 1))
        meter = CpuMeter(pids)
        me = psutil.Process(os.getpid())
        cpu0, mine0 = meter.start(), sum(me.cpu_times()[:2])
        tp = await throughput(args, database_url, server.prefix, things, 1)
        cpu = meter.stop(cpu0, sum(me.cpu_times()[:2]) - mine0)
        print(f"throughput: {tp['rate']:,.0f} updates/s ({tp['updates']:,} in {tp['seconds']:.1f} s), {cpu}")
        wait_quiet(args.quiet_wait)
        cpu0, mine0 = meter.start(), sum(me.cpu_times()[:2])
        tp8 = await throughput(args, database_url, server.prefix, things, len(SIGNALS))
        cpu8 = meter.stop(cpu0, sum(me.cpu_times()[:2]) - mine0)
        print(f"samples: {tp8['rate']:,.0f} updates/s, {tp8['events']:,} events, {cpu8}")
        wait_quiet(args.quiet_wait)
        cpu0, mine0 = meter.start(), sum(me.cpu_times()[:2])
        lat = await latency(args, server.prefix, things, database_url)
        lat["cpu"] = meter.stop(cpu0, sum(me.cpu_times()[:2]) - mine0)
        print(f"latency phase CPU: {lat['cpu']}")
        print(f"latency: decided {stats(lat['decided'])}, delivered {stats(lat['delivered'])}")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
        server.stop()
        await server.delete_stream()  # events, ingest and ingest-errors streams of its prefix
    total_events = await journal_count(database_url)
    expected = tp["events"] + tp8["events"] + lat["updates"]
    report = await verify_database(database_url, Scope(namespace="bench.ingest"), checkpoints="none")
    facts = [
        f"{args.things:,} things, {args.updates:,} property updates per phase in telemetry messages of "
        f"{args.rows} rows "
        f"(throughput), {args.rate:,}/s for {args.seconds:.0f} s in messages of {args.latency_rows} "
        "rows (latency); "
        + (
            "one `twinstore serve` process (ingest worker, journal, relay, fan-out)"
            if args.topology == "single"
            else "`twinstore serve --no-ingest` (API, relay, fan-out) and "
            + ("one `twinstore ingest` process" if args.ingest_processes == 1
               else f"{args.ingest_processes} `twinstore ingest` processes")
        )
        + " with 16 partitions; publisher, twinstore, PostgreSQL and NATS share the machine's 2 cores",
        f"journal afterwards: {total_events:,} sensor events for {expected:,} published rows "
        f"({'ok' if total_events == expected else 'MISMATCH'}); audit verify of the ingested things: "
        f"{'ok' if report.ok else 'BROKEN'} ({report.events:,} events)",
    ]
    sustained = Verdict(
        "sustained ingestion, one event per property update",
        f"{tp['rate']:,.0f} updates/s",
        "≥ 20,000 updates/s",
        tp["rate"] >= 20_000,
    )
    versus_insert = tp["events"] / tp["seconds"] / base["insert"]
    against_insert = Verdict(
        "ingestion events/s vs raw asyncpg INSERT of the same rows",
        f"{versus_insert:.2f}x",
        "≥ 0.5x",
        versus_insert >= 0.5,
    )
    delivered = stats(lat["delivered"])
    p99 = percentile(lat["delivered"], 0.99) if lat["delivered"] else float("inf")
    relayed = Verdict(
        "publish -> event on NATS (committed + relayed), paced",
        f"p99 {delivered[1]} ms",
        "p99 ≤ 100 ms",
        p99 <= 100,
    )
    table1 = markdown_table(
        [
            "what",
            "updates",
            "events",
            "seconds",
            "updates/s",
            "events/s",
            "events vs raw INSERT",
            "CPU",
            "target (issue 6)",
        ],
        [
            [
                "ingestion via NATS, 1 property per row (1 event each)",
                f"{tp['updates']:,}",
                f"{tp['events']:,}",
                f"{tp['seconds']:.1f}",
                f"{tp['rate']:,.0f}",
                f"{tp['events'] / tp['seconds']:,.0f}",
                f"{versus_insert:.2f}x ({against_insert.cell()})",
                str(cpu),
                sustained.cell(),
            ],
            [
                f"ingestion via NATS, {len(SIGNALS)}-signal samples (1 merge event each)",
                f"{tp8['updates']:,}",
                f"{tp8['events']:,}",
                f"{tp8['seconds']:.1f}",
                f"{tp8['rate']:,.0f}",
                f"{tp8['events'] / tp8['seconds']:,.0f}",
                f"{tp8['events'] / tp8['seconds'] / base['insert']:.2f}x",
                str(cpu8),
                "",
            ],
            [
                f"raw asyncpg INSERT unnest, {base['rows_per_txn']:,.0f} rows/txn (one partition)",
                *["-"] * 4,
                f"{base['insert']:,.0f}",
                "1.00x",
                "-",
                "",
            ],
            [
                f"raw asyncpg COPY, {base['rows_per_txn']:,.0f} rows/txn (one partition)",
                "-",
                "-",
                "-",
                "-",
                f"{base['copy']:,.0f}",
                f"{base['copy'] / base['insert']:.2f}x",
                "-",
                "",
            ],
        ],
    )
    table2 = markdown_table(
        [
            "latency at " + f"{lat['rate']:,.0f} updates/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "samples",
            "CPU (the phase)",
            "target",
        ],
        [
            ["publish -> journal event decided (ts)", *stats(lat["decided"]), str(lat["cpu"]), ""],
            ["publish -> event on NATS (committed + relayed)", *delivered, str(lat["cpu"]), relayed.cell()],
        ],
    )
    body = "\n".join(
        [
            table1,
            "",
            table2,
            "",
            f"- publishing alone took {tp['publish_seconds']:.1f} s of the {tp['seconds']:.1f} s of the "
            "first phase",
            f"- with {len(SIGNALS)}-signal samples (one merge event per pump and time, every value in the "
            f"journal): {tp8['rate']:,.0f} property updates/s "
            f"= {tp8['events'] / tp8['seconds']:,.0f} events/s",
            "- CPU columns: cores busy during the phase: twinstore processes / PostgreSQL / the publisher "
            "(this script) / everything else (NATS server, other work on the shared machine)",
        ]
    )
    return facts, body, [sustained, against_insert, relayed]


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    ARGS = parse_args()
    return asyncio.run(
        run_on_fresh_database(ARGS, name="ingest", title="NATS ingestion (issue 6, bench/ingest.py)", run=run)
    )


if __name__ == "__main__":
    sys.exit(main())
