"""Journal appends side by side with the ``eventsourcing`` library's PostgreSQL recorder.

Same PostgreSQL, same fresh database (its journal in 64 partitions, twinstore's default), same
batch sizes (events per transaction), each contender for ``--duration`` seconds, every cell
``--runs`` times (ratios to the same run's eventsourcing cell; the tables give the median and
the range over the runs):

* ``twinstore Journal``: :class:`twinstore.store.journal.Journal` itself with ``max_batch`` set
  to the batch size, writing single-property commands (decide, hash chain, event insert,
  projection upsert, all in the measurement). A journal transaction holds the writes of one
  partition and a process commits one batch of a partition at a time, so ``2 * batch``
  concurrent writers write the things of as many partitions as the journal has commit loops
  (``writers``, 2; the partitions holding the most things), ``batch`` writers each: every
  transaction carries up to ``batch`` events, and the two loops commit two partitions at once
  (what partitioning is for: eventsourcing's application recorder locks its table, one
  transaction at a time whatever the concurrency). The table gives the events per transaction
  each contender actually had.
* ``twinstore Journal.write_unit``: the same Journal, ``batch`` requests per call (one
  transaction each, as ``insert_events`` takes ``batch`` events per call; ingestion writes
  this way), two callers per commit loop (one builds its next unit while the other's commits),
  each loop on its own partition: the per-request future and
  wake-up of ``Journal.write`` are not in it.
* ``twinstore journal SQL``: the statements one group-commit transaction runs
  (``twinstore_lock_and_heads`` locking the batch's one partition and reading its things' heads,
  the journal's ``APPEND``: the recorder's numbered insert with the projection upsert), rows
  prepared outside the timing (JSON encoding inside), one connection, one transaction at a time:
  the storage cost without the domain logic;
* ``twinstore append SQL (lock + insert)``: what the recorder alone does, with its own code:
  :meth:`Recorder.lock` of the batch's one partition and :meth:`Recorder.append` (chain-hashed
  records numbered after the partition's head, the head moved, NOTIFY), one transaction at a
  time, into the journal itself as entity ``bench-append`` (its own revisions and chains, so the
  things, their projection and the other contenders' revisions are untouched);
* ``eventsourcing recorder``: ``PostgresApplicationRecorder.insert_events`` (psycopg 3, table
  lock, NOTIFY, insert returning notification ids: the recorder that gives the global order a
  relay needs, as twinstore's partitions do per partition), with events carrying the same
  information (thing id, revision, timestamp, action, path, value, originator, correlation id).

The two SQL contenders write ``batch`` events of things of one partition (drawn at random per
transaction) per transaction, as the journal's transactions are.

Run ``.venv/bin/python bench/journal.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import statistics
import sys
import time
import uuid
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
    ROOT,
    CpuMeter,
    CpuUse,
    Verdict,
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
from twinstore.store.codec import GENESIS, dumps
from twinstore.store.journal import APPEND, LOCK_AND_HEADS, Journal, WriteRequest
from twinstore.store.recorder import Record, Recorder, record
from twinstore.store.recorder import rows as record_rows
from twinstore.store.schema import migrate

ORIGINATOR = "nginx:bench"
PROPERTY = "/features/f/properties/temp"
APPEND_ENTITY = "bench-append"  # the append-only contender's events (see the module)


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
    run: int = 0

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def per_transaction_ms(self) -> float:
        return 1e3 * self.seconds / max(1, self.transactions)


# ---- twinstore -----------------------------------------------------------------------------


async def seed_things(pool: asyncpg.Pool, recorder: Recorder, things: int) -> None:
    """Create the things through the journal (not measured)."""
    journal = Journal(pool, recorder=recorder)
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


def things_by_partition(recorder: Recorder, things: int) -> dict[int, list[str]]:
    """The thing ids of each partition that holds any."""
    out: dict[int, list[str]] = {}
    for n in range(1, things + 1):
        out.setdefault(recorder.partition(thing_id(n)), []).append(thing_id(n))
    return out


async def bench_journal(
    pool: asyncpg.Pool,
    recorder: Recorder,
    by_partition: dict[int, list[str]],
    batch: int,
    duration: float,
    *,
    unit: bool = False,
) -> Measurement:
    """The Journal with ``max_batch = batch`` on as many partitions as it has commit loops (the
    partitions holding the most things; see the module). ``Journal.write`` from ``2 * batch``
    concurrent writers, or (``unit``) ``Journal.write_unit`` with ``batch`` requests per call, as
    ``insert_events`` takes ``batch`` events per call (ingestion writes this way): two callers
    per partition, one building its next unit while the other's commits."""
    journal = Journal(pool, max_batch=batch, recorder=recorder)
    busiest = sorted(by_partition, key=lambda p: (-len(by_partition[p]), p))
    partitions = busiest[: journal.writers]
    journal.start()
    try:
        batches0, events0 = journal.batches, journal.events_appended
        stop = time.monotonic() + duration
        values = itertools.count(1)

        def request(ids: list[str]) -> WriteRequest:
            return WriteRequest(
                thing_id=secrets.choice(ids),
                command=Modify(path=PROPERTY, value=next(values)),
                originator=ORIGINATOR,
                correlation_id=str(uuid.uuid4()),
            )

        async def caller(ids: list[str]) -> None:
            while time.monotonic() < stop:
                if unit:
                    await journal.write_unit([request(ids) for _ in range(batch)])
                else:
                    await journal.write(request(ids))

        if unit:
            assigned = [p for p in partitions for _ in range(2)]
        else:
            assigned = [partitions[i % len(partitions)] for i in range(2 * batch)]
        t0 = time.monotonic()
        await asyncio.gather(*(caller(by_partition[p]) for p in assigned))
        elapsed = time.monotonic() - t0
        return Measurement(
            UNIT if unit else JOURNAL,
            batch,
            journal.events_appended - events0,
            elapsed,
            journal.batches - batches0,
        )
    finally:
        await journal.stop()


class Chains:
    """Revision and chain head per id, for contenders that write rows directly."""

    def __init__(self, start: dict[str, tuple[int, bytes]] | None = None) -> None:
        self.current: dict[str, tuple[int, bytes]] = dict(start or {})

    def next(self, tid: str) -> int:
        """The next revision of ``tid`` (no chain: eventsourcing's events)."""
        revision = self.current.get(tid, (0, GENESIS))[0] + 1
        self.current[tid] = (revision, GENESIS)
        return revision

    def record(self, entity: str, partition: int, tid: str, ts: datetime, value: int) -> Record:
        """The next event of ``tid`` (a single-property modify), chained onto its head."""
        revision, head = self.current.get(tid, (0, GENESIS))
        event = record(
            head, partition, entity, tid, revision + 1, ts, "modified", PROPERTY, orjson.dumps(value),
            ORIGINATOR, str(uuid.uuid4()),
        )
        self.current[tid] = (revision + 1, event.hash)
        return event


async def bench_journal_sql(
    pool: asyncpg.Pool,
    recorder: Recorder,
    by_partition: dict[int, list[str]],
    batch: int,
    duration: float,
    chains: Chains,
    *,
    projection: bool,
) -> Measurement:
    """One transaction of ``batch`` events of one partition at a time, rows prepared outside the
    timing: the journal's statements (lock and heads, numbered insert with the projection) or,
    without ``projection``, the recorder's lock and append (see the module)."""
    docs = {thing_id(n): seed_doc(n) for n in range(1, sum(map(len, by_partition.values())) + 1)}
    partitions = list(by_partition)
    entity = "thing" if projection else APPEND_ENTITY
    async with pool.acquire() as con:

        def prepare() -> tuple[int, list[Record], list[dict[str, Any]]]:
            partition = secrets.choice(partitions)
            ids = [secrets.choice(by_partition[partition]) for _ in range(batch)]
            now = datetime.now(UTC)
            records = [chains.record(entity, partition, tid, now, i) for i, tid in enumerate(ids)]
            finals = {r.id: r for r in records}  # the last event of each thing
            upsert = [
                {
                    "partition": partition,
                    "id": r.id,
                    "revision": r.revision,
                    "created": now,
                    "modified": now,
                    "doc": docs[r.id],
                    "hash": r.hash.hex(),
                }
                for r in finals.values()
            ]
            return partition, records, upsert

        # Rows are prepared in chunks outside the timing; only the transactions are timed.
        transactions = 0
        elapsed = 0.0
        while elapsed < duration:
            chunk = [prepare() for _ in range(max(1, 2_000 // batch))]
            t0 = time.monotonic()
            for partition, records, upsert in chunk:
                async with con.transaction():
                    if projection:  # the journal's two statements (cache hit), no snapshot due
                        await con.fetch(LOCK_AND_HEADS, [partition], [u["id"] for u in upsert])
                        await con.execute(APPEND, record_rows(records), dumps(upsert), "[]")
                    else:
                        await recorder.lock(con, [partition])
                        await Recorder.append(con, records)
                transactions += 1
            elapsed += time.monotonic() - t0
    name = "twinstore journal SQL" if projection else "twinstore append SQL (lock + insert)"
    return Measurement(name, batch, transactions * batch, elapsed, transactions)


async def bench_sql(
    pool: asyncpg.Pool,
    args: argparse.Namespace,
    recorder: Recorder,
    by_partition: dict[int, list[str]],
    batch: int,
    append_chains: Chains,
    *,
    projection: bool,
) -> Measurement:
    chains = Chains(await journal_heads(pool)) if projection else append_chains
    return await bench_journal_sql(
        pool, recorder, by_partition, batch, args.duration, chains, projection=projection
    )


async def measured(cell: Callable[[], Awaitable[Measurement]], quiet_wait: float) -> Measurement:
    """Run one cell after the machine is idle, with the CPU it used."""
    wait_quiet(quiet_wait)
    meter = CpuMeter(None)
    begin = meter.start()
    own = time.process_time()
    result = await cell()
    result.cpu = meter.stop(begin, time.process_time() - own)
    return result


async def journal_heads(pool: asyncpg.Pool) -> dict[str, tuple[int, bytes]]:
    """Revision and chain head of every thing (the projection's)."""
    async with pool.acquire() as con:
        found = await con.fetch("SELECT id, revision, hash FROM things")
    return {r["id"]: (int(r["revision"]), bytes(r["hash"])) for r in found}


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
    recorder: PostgresApplicationRecorder, things: int, batch: int, duration: float, versions: Chains
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
    parser.add_argument("--runs", type=int, default=3, help="runs of every cell (ranges reported)")
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
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


REFERENCE = "eventsourcing recorder"
JOURNAL = "twinstore Journal"
UNIT = "twinstore Journal.write_unit"
TARGET = 1.5  # issue 17, figure 4: Journal.write vs eventsourcing's recorder, every batch size
HEADERS = [
    "batch (events/txn)",
    "contender",
    "events/s",
    "ms per txn",
    "events per txn",
    "events",
    "vs eventsourcing",
    "CPU cores bench / rest of machine",
    "target (issue 17)",
]


def _spread(values: list[float], fmt: str, unit: str = "") -> str:
    """The median, and the range when there is more than one run."""
    middle = format(statistics.median(values), fmt) + unit
    if len(values) == 1:
        return middle
    return f"{middle} ({format(min(values), fmt)} to {format(max(values), fmt)}{unit})"


def _cells(measurements: list[Measurement]) -> dict[tuple[int, str], list[Measurement]]:
    """The runs of each (batch, contender), in the order measured."""
    cells: dict[tuple[int, str], list[Measurement]] = {}
    for m in measurements:
        cells.setdefault((m.batch, m.contender), []).append(m)
    return cells


def _ratios(measurements: list[Measurement]) -> dict[tuple[int, str], list[float]]:
    """Each run's rate over the same run's eventsourcing rate, per (batch, contender)."""
    reference = {(m.batch, m.run): m.rate for m in measurements if m.contender == REFERENCE}
    out: dict[tuple[int, str], list[float]] = {}
    for m in measurements:
        base = reference.get((m.batch, m.run))
        if base:
            out.setdefault((m.batch, m.contender), []).append(m.rate / base)
    return out


def verdicts(measurements: list[Measurement]) -> dict[tuple[int, str], Verdict]:
    """The Journal's target per batch size, for concurrent single writes (``Journal.write``, group
    commit) and for batches per call (``write_unit``): at least 1.5x in every run."""
    out = {}
    for (batch, contender), ratios in _ratios(measurements).items():
        if contender in (JOURNAL, UNIT):
            out[(batch, contender)] = Verdict(
                f"{contender} vs {REFERENCE} at {batch} events/txn",
                _spread(ratios, ".2f", "x"),
                f"≥ {TARGET}x in every run",
                min(ratios) >= TARGET,
            )
    return out


def _ratio_cell(ratios: list[float] | None, contender: str) -> str:
    if contender == REFERENCE:
        return "1.00x"
    return "-" if not ratios else _spread(ratios, ".2f", "x")


def rows_for(measurements: list[Measurement]) -> list[list[object]]:
    ratios = _ratios(measurements)
    targets = verdicts(measurements)
    out: list[list[object]] = []
    for (batch, contender), runs in _cells(measurements).items():
        events = sum(m.events for m in runs)
        transactions = sum(m.transactions for m in runs)
        target = targets.get((batch, contender))
        out.append(
            [
                batch,
                contender,
                _spread([m.rate for m in runs], ",.0f"),
                _spread([m.per_transaction_ms for m in runs], ".2f"),
                f"{events / max(1, transactions):.1f}",
                f"{events:,}",
                _ratio_cell(ratios.get((batch, contender)), contender),
                f"{statistics.median(m.cpu.client for m in runs):.2f} / "
                f"{statistics.median(m.cpu.postgres + m.cpu.other for m in runs):.2f}",
                "" if target is None else target.cell(),
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
            recorder = await Recorder.load(pool)
            args.partitions = recorder.partitions
            by_partition = things_by_partition(recorder, args.things)
            datastore = datastore_for(url)
            es_recorder = PostgresApplicationRecorder(datastore, events_table_name="es_events")
            es_recorder.create_table()
            await seed_things(pool, recorder, args.things)
            versions, append_chains = Chains(), Chains()
            try:
                for batch in args.batch_sizes:
                    cells: list[Callable[[], Awaitable[Measurement]]] = [
                        partial(
                            asyncio.to_thread,
                            bench_eventsourcing,
                            es_recorder,
                            args.things,
                            batch,
                            args.duration,
                            versions,
                        ),
                        partial(bench_journal, pool, recorder, by_partition, batch, args.duration),
                        partial(bench_journal, pool, recorder, by_partition, batch, args.duration, unit=True),
                        *(
                            partial(
                                bench_sql, pool, args, recorder, by_partition, batch, append_chains,
                                projection=projection,
                            )
                            for projection in (True, False)
                        ),
                    ]
                    for run in range(args.runs):
                        for cell in cells:
                            result = await measured(cell, args.quiet_wait)
                            result.run = run
                            measurements.append(result)
                        print(f"batch {batch}, run {run + 1} of {args.runs}:", flush=True)
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
        f"{_version('asyncpg')}; {args.things:,} things in {args.partitions} partitions, "
        f"{args.duration:g} s per cell, {args.runs} run(s) of every cell (figures: median, range "
        "over the runs in brackets; ratios against the same run's eventsourcing cell); durable "
        "commits (synchronous_commit=on); eventsourcing and the SQL contenders one transaction at a "
        "time, the Journal one transaction per partition at a time on 2 partitions (see the "
        "script's docstring); CPU columns: cores busy in this process and in the rest of the "
        "machine (PostgreSQL, plus any other work on a shared machine; each cell first waits for "
        "the machine to be idle)",
        "",
        markdown_table(HEADERS, rows_for(measurements)),
        "",
        summary(notes, list(verdicts(measurements).values()), findings(rows_for(measurements))),
        "",
    ]
    return "\n".join(lines) + "\n"


def findings(rows: list[list[object]]) -> list[str]:
    """Each twinstore SQL contender against eventsourcing's recorder, per batch size, as the
    table's ratio column shows it (no target: the comparison is the finding; the Journal's is a
    verdict)."""
    ratio = HEADERS.index("vs eventsourcing")
    out = []
    for contender in dict.fromkeys(str(r[1]) for r in rows if r[1] not in (REFERENCE, JOURNAL, UNIT)):
        mine = [r for r in rows if r[1] == contender]
        batches = " / ".join(str(r[0]) for r in mine)
        ratios = " / ".join(str(r[ratio]) for r in mine)
        out.append(f"{contender} vs {REFERENCE} at {batches} events/txn: {ratios}")
    return out


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    # uvloop, as `twinstore serve` runs (uvicorn picks it when installed).
    sys.exit(uvloop.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
