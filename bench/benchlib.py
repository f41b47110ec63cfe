"""Helpers shared by the benchmarks: throw-away databases, machine notes, tables, BENCHMARKS.md.

The benchmarks are scripts (``python bench/api.py``, ``python bench/journal.py``); this module
sits beside them and is imported as ``benchlib``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

__all__ = [
    "ROOT",
    "CpuMeter",
    "CpuUse",
    "Verdict",
    "add_run_arguments",
    "command_line",
    "create_database",
    "default_database_url",
    "default_nats_url",
    "drop_database",
    "latency_cells",
    "machine_notes",
    "markdown_table",
    "percentile",
    "process_cpu",
    "rebuild_index",
    "run_date",
    "run_on_fresh_database",
    "summary",
    "verdicts_of_tables",
    "wait_quiet",
    "write_section",
]

ROOT = Path(__file__).resolve().parent.parent


def default_database_url() -> str:
    """The admin database the benchmarks create their own databases from."""
    return os.environ.get("TWINSTORE_TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"


def default_nats_url() -> str:
    return os.environ.get("TWINSTORE_TEST_NATS_URL") or "nats://127.0.0.1:4222"


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database (keeps host, port, user and query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def create_database(admin_url: str, prefix: str) -> tuple[str, str]:
    """Create an empty database; returns (name, URL)."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    con = await asyncpg.connect(admin_url)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    return name, with_database(admin_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    con = await asyncpg.connect(admin_url)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def latency_cells(values: list[float]) -> list[str]:
    """p50, p99, max (ms, one decimal) and the count of ``values`` (sorted) as table cells."""
    if not values:
        return ["-", "-", "-", "-"]
    return [
        f"{percentile(values, 0.5):.1f}",
        f"{percentile(values, 0.99):.1f}",
        f"{max(values):.1f}",
        f"{len(values):,}",
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table that also reads well on a terminal (columns padded)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown CPU"


def _memory_gib() -> str:
    try:
        for row in Path("/proc/meminfo").read_text().splitlines():
            if row.startswith("MemTotal:"):
                return f"{int(row.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return "unknown memory"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "twinstore"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + (" (twinstore/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def machine_notes(database_url: str) -> list[str]:
    """One line each: date, CPU, PostgreSQL and its durability settings, Python, commit."""
    con = await asyncpg.connect(database_url)
    try:
        version = await con.fetchval("SHOW server_version")
        settings = {
            name: await con.fetchval(f"SHOW {name}")
            for name in ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers", "commit_delay")
        }
    finally:
        await con.close()
    pg = ", ".join(f"{k}={v}" for k, v in settings.items())
    return [
        f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {os.cpu_count()} cores ({_cpu_model()}), {_memory_gib()}, {platform.platform()}",
        f"PostgreSQL {version} on the same machine ({pg})",
        f"Python {platform.python_version()}, twinstore commit {_git_commit()}",
    ]


@dataclass
class CpuUse:
    """CPU used during a phase, in cores (1.0 = one core busy all the time).

    ``other`` is every other process on the machine (the machine may be shared: other test
    runs compete for the same cores and make the figures lower than on a quiet machine).
    """

    server: float = 0.0
    postgres: float = 0.0
    client: float = 0.0
    other: float = 0.0

    def __str__(self) -> str:
        return f"{self.server:.2f} / {self.postgres:.2f} / {self.client:.2f} / {self.other:.2f}"


def process_cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


Snapshot = tuple[float, dict[int, float], dict[int, float], float]


class CpuMeter:
    """CPU seconds of the server's processes, of PostgreSQL's and of the whole machine."""

    def __init__(self, server_pid: int | Sequence[int] | None) -> None:
        """``server_pid``: the server's process, or several (each with its children)."""
        if server_pid is None:
            self.server_pids: list[int] = []
        else:
            self.server_pids = [server_pid] if isinstance(server_pid, int) else list(server_pid)

    def _server(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in self.server_pids:
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            out.update({p.pid: process_cpu(p) for p in procs})
        return out

    @staticmethod
    def _postgres() -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in psutil.pids():
            try:
                proc = psutil.Process(pid)
                if proc.name().startswith("postgres"):
                    out[pid] = process_cpu(proc)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def _busy() -> float:
        """CPU seconds the whole machine spent busy so far."""
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def start(self) -> Snapshot:
        return time.monotonic(), self._server(), self._postgres(), self._busy()

    def stop(self, begin: Snapshot, client_seconds: float) -> CpuUse:
        """Cores used since ``begin``; ``client_seconds``: CPU the load generator used meanwhile."""
        t0, server0, pg0, busy0 = begin
        elapsed = max(time.monotonic() - t0, 1e-9)
        server1, pg1 = self._server(), self._postgres()
        server = sum(v - server0.get(pid, 0.0) for pid, v in server1.items())
        pg = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items())
        other = max(0.0, self._busy() - busy0 - server - pg - client_seconds)
        return CpuUse(server / elapsed, pg / elapsed, client_seconds / elapsed, other / elapsed)


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait up to ``max_wait`` s until the machine's busy cores (1 s sample) drop below
    ``threshold``: the machine may be shared with other work. Returns the last sample."""
    deadline = time.monotonic() + max_wait
    busy = psutil.cpu_percent(interval=1.0) * (os.cpu_count() or 1) / 100
    while busy >= threshold and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0) * (os.cpu_count() or 1) / 100
    return busy


def command_line() -> str:
    """How this benchmark was started, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(ROOT))
    except ValueError:
        shown = str(script)
    return shlex.join([".venv/bin/python", shown, *sys.argv[1:]])


DATE = re.compile(r"\bdate: (\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC)")
SECTION = re.compile(r"<!-- bench:([\w-]+):start -->\n(.*?)<!-- bench:\1:end -->", re.DOTALL)
INDEX_START, INDEX_END = "<!-- bench-index:start -->", "<!-- bench-index:end -->"
SUMMARY_HEADING = "**Summary** (generated from the tables of this run"
HEADER = (
    "# Benchmarks\n\nFigures measured by the scripts in `bench/`; each section is rewritten by its script "
    "(`make bench` runs them all) and says how it was run, on what, and what limits the figures. "
    "A section's **Summary** and the index below are generated from the same numbers as its tables; "
    "the parts titled *Analysis* are written by hand and cite figures only from the tables of the run "
    "they name (`tests/test_benchmarks_doc.py` checks both).\n\n"
)


def run_date(notes: Sequence[str]) -> str:
    """The run's date as :func:`machine_notes` printed it (``YYYY-MM-DD HH:MM UTC``)."""
    for note in notes:
        match = DATE.search(note)
        if match:
            return match.group(1)
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Verdict:
    """One target of a benchmark, judged on this run's figures.

    ``measured`` holds the figures exactly as a row of the section's tables prints them, and the
    same row carries :meth:`cell` in its target column: the summary line and the table are made
    from one object, so they cannot disagree.
    """

    label: str
    measured: str
    target: str
    ok: bool

    @property
    def word(self) -> str:
        return "met" if self.ok else "MISSED"

    def cell(self) -> str:
        """The table's target cell, e.g. ``≥ 5,000/s, p99 ≤ 20 ms: MISSED``."""
        return f"{self.target}: {self.word}"

    def line(self) -> str:
        return f"- {self.label}: {self.measured} (target {self.target}): {self.word}"


def summary(notes: Sequence[str], verdicts: Sequence[Verdict], findings: Sequence[str] = ()) -> str:
    """The section's generated summary: one line per target, then ``findings`` (figures copied
    from the tables, no verdict). Every number in it must be one the section's tables show."""
    lines = [f"{SUMMARY_HEADING}, {run_date(notes)}):", ""]
    lines += [v.line() for v in verdicts]
    lines += [f"- {f}" for f in findings]
    return "\n".join(lines)


def verdicts_of_tables(text: str) -> list[Verdict]:
    """The verdicts of every Markdown table in ``text`` with a column headed ``target...`` whose
    cells read ``<target>: met`` or ``<target>: MISSED``: the row's first cell is the label, its
    other filled cells (header and value) the figures."""
    out: list[Verdict] = []
    rows = [ln.strip() for ln in text.splitlines()]
    headers: list[str] = []
    for i, row in enumerate(rows):
        if not row.startswith("|"):
            headers = []
            continue
        cells = [c.strip() for c in row.strip("|").split("|")]
        if i + 1 < len(rows) and re.fullmatch(r"\|[\s\-:|]+\|", rows[i + 1]):
            headers = cells
            continue
        if not headers or re.fullmatch(r"\|[\s\-:|]+\|", row):
            continue
        column = next((j for j, h in enumerate(headers) if h.lower().startswith("target")), None)
        if column is None or column >= len(cells):
            continue
        match = re.fullmatch(r"(.*): (met|MISSED)", cells[column])
        if not match:
            continue
        figures = ", ".join(
            f"{h} {c}"
            for j, (h, c) in enumerate(zip(headers, cells, strict=False))
            if j not in (0, column) and c not in ("", "-")
        )
        out.append(Verdict(cells[0], figures, match.group(1), match.group(2) == "met"))
    return out


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _index_line(key: str, body: str) -> str:
    title = next((ln[3:].strip() for ln in body.splitlines() if ln.startswith("## ")), key)
    date = DATE.search(body)
    lines = body.splitlines()
    verdicts: list[str] = []
    first = ""
    if any(ln.startswith(SUMMARY_HEADING) for ln in lines):
        start = next(i for i, ln in enumerate(lines) if ln.startswith(SUMMARY_HEADING))
        bullets = []
        for ln in lines[start + 1 :]:
            if ln.startswith("- "):
                bullets.append(ln[2:])
            elif bullets and not ln.strip():
                break
        verdicts = [b for b in bullets if re.search(r": (met|MISSED)$", b)]
        first = bullets[0] if bullets else ""
    if verdicts:
        missed = [v.split(":", 1)[0] for v in verdicts if v.endswith(": MISSED")]
        met = len(verdicts) - len(missed)
        verdict = f"{met} of {len(verdicts)} targets met"
        if missed:
            verdict += f"; MISSED: {' / '.join(missed)}"
    else:
        verdict = first or "no generated summary"
    return f"| [{title}](#{_anchor(title)}) | {date.group(1) if date else '-'} | {verdict} |"


def rebuild_index(text: str) -> str:
    """``text`` with its index (one row per benchmark section: run date, verdicts) regenerated."""
    rows = [
        _index_line(m.group(1), m.group(2))
        for m in SECTION.finditer(text)
        if not m.group(1).endswith("-analysis")
    ]
    index = "\n".join(
        [
            INDEX_START,
            "| section | run | targets (from the section's summary) |",
            "| --- | --- | --- |",
            *rows,
            INDEX_END,
        ]
    )
    if INDEX_START in text and INDEX_END in text:
        before, rest = text.split(INDEX_START, 1)
        return before + index + rest.split(INDEX_END, 1)[1]
    first = text.find("<!-- bench:")
    if first < 0:
        return text.rstrip("\n") + "\n\n" + index + "\n"
    return text[:first] + index + "\n\n" + text[first:]


def write_section(path: Path, key: str, text: str) -> None:
    """Replace the section ``key`` of the results file (or append it), keeping the others, and
    regenerate the index at the top from every section."""
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else current + "\n" + block
    path.write_text(rebuild_index(updated))


# ---- the raw baselines' copy of the journal ------------------------------------------------
# A table like the journal (same columns, keys and indexes) with its own copy of partition_heads,
# so a baseline numbers its rows as the recorder does without touching the journal's heads.


async def create_journal_copy(con: asyncpg.Connection, table: str) -> int:
    """Create ``table`` like ``journal`` and ``<table>_heads`` like ``partition_heads`` (one row
    per partition of the migrated database, at seq 0); the partition count."""
    heads = f"{table}_heads"
    await con.execute(f"DROP TABLE IF EXISTS {table}, {heads}")
    await con.execute(f"CREATE TABLE {table} (LIKE journal INCLUDING ALL)")
    await con.execute(
        f"CREATE TABLE {heads} (LIKE partition_heads INCLUDING ALL) WITH (fillfactor = 50)"
    )
    await con.execute(f"INSERT INTO {heads} (partition) SELECT partition FROM partition_heads")
    return int(await con.fetchval("SELECT count(*) FROM partition_heads"))


async def drop_journal_copy(con: asyncpg.Connection, table: str) -> None:
    await con.execute(f"DROP TABLE IF EXISTS {table}, {table}_heads")


def insert_events(table: str) -> str:
    """The raw insert of event rows of one partition into a journal copy, in one statement:
    partition ``$1``'s head row is locked and moved by the row count (the partition's write lock
    until commit, as the recorder's: so ``seq`` follows commit order), the rows, given as nine
    columns ``$2``..``$10`` (id, revision, ts, action, path, value, originator, correlation id,
    hash), are numbered after it in their order and inserted with ``INSERT ... unnest``."""
    return f"""
WITH head AS (
    UPDATE {table}_heads SET seq = seq + cardinality($2::text[]) WHERE partition = $1
    RETURNING seq - cardinality($2::text[]) AS seq
)
INSERT INTO {table} (partition, seq, entity, id, revision, ts, action, path, value, originator,
                     correlation_id, hash)
SELECT $1, head.seq + e.n, 'thing', e.id, e.revision, e.ts, e.action, e.path, e.value, e.originator,
       e.correlation_id, e.hash
FROM head, unnest($2::text[], $3::bigint[], $4::timestamptz[], $5::text[], $6::text[], $7::json[],
                  $8::text[], $9::text[], $10::bytea[])
    WITH ORDINALITY AS e(id, revision, ts, action, path, value, originator, correlation_id, hash, n)
"""


def number_events(table: str) -> str:
    """Lock partition ``$1``'s head row of a journal copy and move it by ``$2`` rows: the seq
    before them (the rows get the next ``$2`` seqs; the lock is held until commit)."""
    return f"UPDATE {table}_heads SET seq = seq + $2 WHERE partition = $1 RETURNING seq - $2"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark on its own fresh database takes (see :func:`run_on_fresh_database`)."""
    parser.add_argument("--database-url", default=default_database_url(), help="admin database URL")
    parser.add_argument("--nats-url", default=default_nats_url())
    parser.add_argument("--keep-database", action="store_true", help="do not drop the seeded database")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-output", action="store_true", help="print only; do not update BENCHMARKS.md")


async def run_on_fresh_database(
    args: argparse.Namespace,
    *,
    name: str,
    title: str,
    run: Callable[[str, Path], Awaitable[tuple[list[str], str] | tuple[list[str], str, list[Verdict]]]],
) -> int:
    """Create a database, ``run(database_url, tmp_dir)`` -> (facts, body[, verdicts]), drop the
    database (unless ``--keep-database``), print the report and write it as the section ``name`` of
    ``--output`` (unless ``--no-output``). The section ends with the generated summary of
    ``verdicts``, or, when ``run`` gives none, of the verdicts in the body's target columns."""
    notes = await machine_notes(args.database_url)
    print("\n".join(notes))
    tmp = Path(tempfile.mkdtemp(prefix=f"twinstore-bench-{name}-"))
    db_name, url = await create_database(args.database_url, f"twinstore_bench_{name}")
    try:
        result = await run(url, tmp)
    finally:
        if args.keep_database:
            print(f"kept database {db_name}")
        else:
            await drop_database(args.database_url, db_name)
    facts, body = result[0], result[1]
    verdicts = result[2] if len(result) > 2 else verdicts_of_tables(body)
    text = "\n".join(
        [
            f"## {title}",
            "",
            "Command: `" + " ".join(["python", *sys.argv]) + "`",
            "",
            *[f"- {n}" for n in notes + facts],
            "",
            body.rstrip(),
            *(["", summary(notes, verdicts)] if verdicts else []),
        ]
    )
    print("\n" + text)
    if not args.no_output:
        write_section(args.output, name, text)
    return 0
