"""Journal appends side by side with the ``eventsourcing`` library's PostgreSQL recorder.

Same PostgreSQL, same fresh database, same batch sizes (events per transaction), one
transaction at a time for every contender (twinstore's group commit and eventsourcing's
application recorder both serialise their write transactions by a lock), each for
``--duration`` seconds:

* ``twinstore Journal``: :class:`twinstore.store.journal.Journal` itself with ``max_batch`` set
  to the batch size and twice as many concurrent writers, each writing single-property
  commands (decide, hash chain, event insert, projection upsert, all in the measurement);
* ``twinstore journal SQL``: the statements one group-commit transaction runs (advisory lock,
  read of current state, ``INSERT ... SELECT FROM unnest`` of the events, projection upsert)
  with rows prepared outside the timing, i.e. the storage cost without the domain logic;
* ``eventsourcing recorder``: ``PostgresApplicationRecorder.insert_events`` (psycopg 3, table
  lock, NOTIFY, insert returning notification ids: the recorder that gives the global order a
  relay needs, as twinstore's journal does), with events carrying the same information
  (thing id, revision, timestamp, action, path, value, originator, correlation id).

Run ``.venv/bin/python bench/journal.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson
import psycopg
import uvloop
from benchlib import (
    INSERT_EVENTS,
    ROOT,
    CpuMeter,
    CpuUse,
    command_line,
    create_database,
    default_database_url,
    drop_database,
    machine_notes,
    markdown_table,
    summary,
    wait_quiet,
    write_section,
)
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

from twinstore.model.thing import Create, Modify
from twinstore.runtime import create_pool
from twinstore.store.recorder import Recorder
from twinstore.store.journal import APPEND, LOCK_AND_HEADS, WRITE_LOCK, Journal, WriteRequest
from twinstore.store.schema import migrate

ORIGINATOR = "nginx:bench"
PROPERTY = "/features/f/properties/temp"


def thing_id(n: int) -> str:
    return f"org.bench:t{n}"


def seed_doc(n: int) -> dict[str, Any]:
    return {
        "thingId": thing_id(n),
        "policyId": thing_id(n),
        "attributes": {"model": "bench", "serial": n},
        "features": {"f": {"properties": {"temp": 20.0, "humidity": 50, "counter": 0}}},
    }


@dataclass
class Measurement:
    contender: str
    batch: int
    events: int
    seconds: float
    transactions: int
    cpu: CpuUse = field(default_factory=CpuUse)

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def per_transaction_ms(self) -> float:
        return 1e3 * self.seconds / max(1, self.transactions)


# ---- twinstore -----------------------------------------------------------------------------


async def seed_things(pool: asyncpg.Pool, things: int) -> None:
    """Create the things through the journal (not measured)."""
    journal = Journal(pool, recorder=await Recorder.load(pool))
    journal.start()
    try:
        for start in range(1, things + 1, 500):
            await asyncio.gather(
                *(
                    journal.write(
                        WriteRequest(
                            thing_id=thing_id(n), command=Create(value=seed_doc(n)), originator=ORIGINATOR
                        )
                    )
                    for n in range(start, min(things, start + 499) + 1)
                )
            )
    finally:
        await journal.stop()


async def bench_journal(pool: asyncpg.Pool, things: int, batch: int, duration: float) -> Measurement:
    """``Journal.write`` from ``2 * batch`` concurrent writers, ``max_batch = batch``."""
    journal = Journal(pool, max_batch=batch, recorder=await Recorder.load(pool))
    journal.start()
    try:
        batches0, events0 = journal.batches, journal.events_appended
        stop = time.monotonic() + duration
        counter = 0

        async def writer() -> None:
            nonlocal counter
            while time.monotonic() < stop:
                counter += 1
                n = 1 + secrets.randbelow(things)
                await journal.write(
                    WriteRequest(
                        thing_id=thing_id(n),
                        command=Modify(path=PROPERTY, value=counter),
                        originator=ORIGINATOR,
                        correlation_id=str(uuid.uuid4()),
                    )
                )

        t0 = time.monotonic()
        await asyncio.gather(*(writer() for _ in range(2 * batch)))
        elapsed = time.monotonic() - t0
        return Measurement(
            "twinstore Journal",
            batch,
            journal.events_appended - events0,
            elapsed,
            journal.batches - batches0,
        )
    finally:
        await journal.stop()


class Revisions:
    """Next revision per thing for contenders that write rows directly."""

    def __init__(self, start: dict[str, int]) -> None:
        self.current: defaultdict[str, int] = defaultdict(int, start)

    def next(self, tid: str) -> int:
        self.current[tid] += 1
        return self.current[tid]


async def bench_journal_sql(
    pool: asyncpg.Pool, things: int, batch: int, duration: float, revisions: Revisions, *, projection: bool
) -> Measurement:
    """The group-commit transaction's statements with prepared rows (no domain logic);
    without ``projection`` only the advisory lock and the event insert (what a recorder does)."""
    docs = {thing_id(n): seed_doc(n) for n in range(1, things + 1)}
    async with pool.acquire() as con:

        def prepare() -> tuple[list[str], list[list[Any]], list[list[Any]]]:
            ids = [thing_id(1 + secrets.randbelow(things)) for _ in range(batch)]
            now = datetime.now(UTC)
            events: list[list[Any]] = [[] for _ in range(9)]
            finals: dict[str, tuple[int, bytes]] = {}
            for i, tid in enumerate(ids):
                revision = revisions.next(tid)
                value = orjson.dumps(i)
                head = hashlib.sha256(value).digest()
                row = [
                    tid,
                    revision,
                    now,
                    "modified",
                    PROPERTY,
                    value.decode(),
                    ORIGINATOR,
                    str(uuid.uuid4()),
                    head,
                ]
                for column, item in zip(events, row, strict=True):
                    column.append(item)
                finals[tid] = (revision, head)
            upsert: list[list[Any]] = [[] for _ in range(7)]
            for tid, (revision, head) in finals.items():
                for column, item in zip(upsert, [tid, revision, now, now, tid, docs[tid], head], strict=True):
                    column.append(item)
            return list(set(ids)), events, upsert

        # Rows are prepared in chunks outside the timing; only the transactions are timed.
        transactions = 0
        elapsed = 0.0
        while elapsed < duration:
            chunk = [prepare() for _ in range(max(1, 2_000 // batch))]
            t0 = time.monotonic()
            for ids, events, upsert in chunk:
                async with con.transaction():
                    if projection:  # the journal's two statements (cache hit), no snapshot due
                        await con.fetch(LOCK_AND_HEADS, ids)
                        await con.execute(APPEND, *journal_parameters(events, upsert))
                    else:
                        await con.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
                        await con.execute(INSERT_APPEND, *events)
                transactions += 1
            elapsed += time.monotonic() - t0
    name = "twinstore journal SQL" if projection else "twinstore append SQL (lock + insert)"
    return Measurement(name, batch, transactions * batch, elapsed, transactions)


def journal_parameters(events: list[list[Any]], upsert: list[list[Any]]) -> tuple[str, str, str]:
    """The column lists as the journal's APPEND takes them: one JSON array per table."""
    event_keys = ("id", "revision", "ts", "action", "path", "value", "originator", "correlation_id", "hash")
    thing_keys = ("id", "revision", "created", "modified", "policy_id", "doc", "hash")
    rows = [dict(zip(event_keys, row, strict=True)) for row in zip(*events, strict=True)]
    things = [dict(zip(thing_keys, row, strict=True)) for row in zip(*upsert, strict=True)]
    for row in rows + things:
        row["hash"] = row["hash"].hex()
    return orjson.dumps(rows).decode(), orjson.dumps(things).decode(), "[]"


# The append-only contender writes a copy of the journal table (same keys and indexes), so the
# journal and its projection stay consistent for the other contenders.
APPEND_TABLE = "append_journal"
INSERT_APPEND = INSERT_EVENTS.replace("INSERT INTO journal", f"INSERT INTO {APPEND_TABLE}")
assert INSERT_APPEND != INSERT_EVENTS


async def bench_sql(
    pool: asyncpg.Pool, args: argparse.Namespace, batch: int, append_revisions: Revisions, *, projection: bool
) -> Measurement:
    revisions = Revisions(await journal_revisions(pool)) if projection else append_revisions
    return await bench_journal_sql(pool, args.things, batch, args.duration, revisions, projection=projection)


async def measured(cell: Callable[[], Awaitable[Measurement]], quiet_wait: float) -> Measurement:
    """Run one cell after the machine is idle, with the CPU it used."""
    wait_quiet(quiet_wait)
    meter = CpuMeter(None)
    begin = meter.start()
    own = time.process_time()
    result = await cell()
    result.cpu = meter.stop(begin, time.process_time() - own)
    return result


async def journal_revisions(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as con:
        rows = await con.fetch("SELECT id, revision FROM things")
    return {r["id"]: int(r["revision"]) for r in rows}


# ---- eventsourcing --------------------------------------------------------------------------


def datastore_for(database_url: str) -> PostgresDatastore:
    parts = urlsplit(database_url)
    return PostgresDatastore(
        dbname=parts.path.lstrip("/"),
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=unquote(parts.username or "postgres"),
        password=unquote(parts.password or ""),
        originator_id_type="text",
        pool_size=1,
    )


def bench_eventsourcing(
    recorder: PostgresApplicationRecorder, things: int, batch: int, duration: float, versions: Revisions
) -> Measurement:
    """``insert_events`` with ``batch`` stored events per call (one transaction each)."""
    counter = 0

    def stored_event() -> StoredEvent:
        nonlocal counter
        counter += 1
        tid = thing_id(1 + secrets.randbelow(things))
        version = versions.next(tid)
        state = orjson.dumps(
            {
                "thingId": tid,
                "revision": version,
                "timestamp": datetime.now(UTC).isoformat(),
                "action": "modified",
                "path": PROPERTY,
                "value": counter,
                "originator": ORIGINATOR,
                "correlationId": str(uuid.uuid4()),
            }
        )
        return StoredEvent(
            originator_id=tid, originator_version=version, topic="things:modified", state=state
        )

    transactions = 0
    t0 = time.monotonic()
    while time.monotonic() < t0 + duration:
        recorder.insert_events([stored_event() for _ in range(batch)])
        transactions += 1
    elapsed = time.monotonic() - t0
    return Measurement("eventsourcing recorder", batch, transactions * batch, elapsed, transactions)


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="twinstore journal appends vs the eventsourcing library's PostgreSQL recorder at "
        "equal batch sizes; prints a table and writes the section 'journal' of BENCHMARKS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per contender and batch size")
    parser.add_argument("--batches", default="1,10,100", help="comma-separated events per transaction")
    parser.add_argument("--things", type=int, default=1_000, help="distinct things (aggregates) written")
    parser.add_argument(
        "--database-url",
        default=default_database_url(),
        help="admin database; a fresh database is created and dropped",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each cell, wait up to this many seconds for the machine to be idle (shared machines)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="results file")
    parser.add_argument("--no-output", action="store_true", help="only print, do not write --output")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the database")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in str(args.batches).split(",") if b.strip()]
    return args


HEADERS = [
    "batch (events/txn)",
    "contender",
    "events/s",
    "ms per txn",
    "events",
    "vs eventsourcing",
    "CPU cores bench / rest of machine",
]


def rows_for(measurements: list[Measurement]) -> list[list[object]]:
    reference = {m.batch: m.rate for m in measurements if m.contender == "eventsourcing recorder"}
    out: list[list[object]] = []
    for m in measurements:
        ratio = reference.get(m.batch)
        out.append(
            [
                m.batch,
                m.contender,
                f"{m.rate:,.0f}",
                f"{m.per_transaction_ms:.2f}",
                f"{m.events:,}",
                "-" if ratio is None else f"{m.rate / ratio:.2f}x",
                f"{m.cpu.client:.2f} / {m.cpu.postgres + m.cpu.other:.2f}",
            ]
        )
    return out


async def main_async(args: argparse.Namespace) -> int:
    notes = await machine_notes(args.database_url)
    print("\n".join(notes), flush=True)
    name, url = await create_database(args.database_url, "twinstore_bench_journal")
    measurements: list[Measurement] = []
    try:
        pool = await create_pool(url, 4)
        try:
            async with pool.acquire() as con:
                await migrate(con)
                await con.execute(f"CREATE TABLE {APPEND_TABLE} (LIKE journal INCLUDING ALL)")
            datastore = datastore_for(url)
            recorder = PostgresApplicationRecorder(datastore, events_table_name="es_events")
            recorder.create_table()
            await seed_things(pool, args.things)
            versions, append_revisions = Revisions({}), Revisions({})
            try:
                for batch in args.batch_sizes:
                    cells: list[Callable[[], Awaitable[Measurement]]] = [
                        partial(
                            asyncio.to_thread,
                            bench_eventsourcing,
                            recorder,
                            args.things,
                            batch,
                            args.duration,
                            versions,
                        ),
                        partial(bench_journal, pool, args.things, batch, args.duration),
                        partial(bench_sql, pool, args, batch, append_revisions, projection=True),
                        partial(bench_sql, pool, args, batch, append_revisions, projection=False),
                    ]
                    for cell in cells:
                        measurements.append(await measured(cell, args.quiet_wait))
                    print(markdown_table(HEADERS, rows_for(measurements[-len(cells) :])), flush=True)
            finally:
                datastore.close()
        finally:
            await pool.close()
    finally:
        if not args.keep_database:
            await drop_database(args.database_url, name)
    text = report(args, notes, measurements)
    print("\n" + text)
    if not args.no_output:
        write_section(args.output, "journal", text)
        print(f"wrote {args.output}")
    return 0


def report(args: argparse.Namespace, notes: list[str], measurements: list[Measurement]) -> str:
    lines = [
        "## Journal appends vs eventsourcing's PostgreSQL recorder (bench/journal.py)",
        "",
        "```",
        command_line(),
        "```",
        "",
        *(f"- {n}" for n in notes),
        f"- eventsourcing {_version('eventsourcing')} `PostgresApplicationRecorder` on psycopg "
        f"{psycopg.__version__} ({psycopg.pq.__impl__} implementation); twinstore on asyncpg "
        f"{_version('asyncpg')}; {args.things:,} things, {args.duration:.0f} s per cell, one write "
        "transaction at a time for every contender, durable commits (synchronous_commit=on); CPU "
        "columns: cores busy in this process and in the rest of the machine (PostgreSQL, plus any "
        "other work on a shared machine; each cell first waits for the machine to be idle)",
        "",
        markdown_table(HEADERS, rows_for(measurements)),
        "",
        summary(notes, [], findings(rows_for(measurements))),
        "",
    ]
    return "\n".join(lines) + "\n"


def findings(rows: list[list[object]]) -> list[str]:
    """Each twinstore contender against eventsourcing's recorder, per batch size, as the table's
    ratio column shows it (no target: the comparison is the finding)."""
    out = []
    for contender in dict.fromkeys(str(r[1]) for r in rows if r[1] != "eventsourcing recorder"):
        mine = [r for r in rows if r[1] == contender]
        batches = " / ".join(str(r[0]) for r in mine)
        ratios = " / ".join(str(r[5]) for r in mine)
        out.append(f"{contender} vs eventsourcing recorder at {batches} events/txn: {ratios}")
    return out


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    # uvloop, as `twinstore serve` runs (uvicorn picks it when installed).
    sys.exit(uvloop.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
