"""Writes that scale out (issue 17, figure 1): HTTP PUT from 64 clients on 1, 2 and 3 processes.

``--counts`` ``twinstore serve`` processes (each its own port, all on one database and NATS
prefix, like a Deployment with replicas; started afresh per count) take PUTs of one property of
random things among ``--things`` things from ``--connections`` wrk connections spread
round-robin over the processes (bench/footprint.py's scripts). One process is the baseline: the
target is 2 and 3 processes each at least 1.2x its writes/s, in the same run.

Per count it reports writes/s, p50/p99, where the CPU goes (server processes / PostgreSQL / wrk
/ the rest), and from the processes' /metrics: write requests per transaction, the share of
writes decided again under the lock (another process wrote the thing since this one's cached
state), the mean wait for the partition lock per transaction
(``twinstore_journal_lock_seconds``) and the mean time it is held
(``twinstore_journal_lock_held_seconds``: the serial section of a partition).

From this tree's one-process row it projects the writes/s of 8, 32 and 128 cores (figure 5):
CPU per write (twinstore and PostgreSQL) is the parallel part, the lock held per transaction the
serial part of each partition; see :func:`projection`.

Run ``.venv/bin/python bench/write_scale.py --help``; needs ``wrk`` (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
from api import PASSWORD, USER, _errors
from benchlib import (
    ROOT,
    CpuUse,
    Verdict,
    add_run_arguments,
    create_database,
    drop_database,
    markdown_table,
    run_on_fresh_database,
    wait_quiet,
)
from footprint import Cluster, create_missing, create_policy, raise_nofile, run_put, write_lua

from twinstore.auth import write_users_file

TARGET = 1.2
COUNTERS = (
    "twinstore_journal_events_appended_total",
    "twinstore_journal_commits_total",
    "twinstore_journal_replans_total",
    "twinstore_journal_lock_seconds_sum",
    "twinstore_journal_lock_seconds_count",
    "twinstore_journal_lock_held_seconds_sum",
    "twinstore_journal_lock_held_seconds_count",
)
PARTITIONS = 64  # the default `partitions` every run's database has
GROUP = 8  # the default journal_partitions_per_transaction: one transaction locks such a group
# Ditto's published figure the issue compares with: modify commands per second per instance.
DITTO_MODIFIES_PER_INSTANCE = 800
CORES = (8, 32, 128)


def counters(urls: list[str]) -> dict[str, float]:
    """The journal's counters of /metrics, summed over the processes."""
    total = dict.fromkeys(COUNTERS, 0.0)
    for url in urls:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            name, _, value = line.partition(" ")
            if name in total:
                total[name] += float(value)
    return total


@dataclass
class Row:
    tree: str
    processes: int
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: CpuUse
    per_commit: float
    replanned: float
    lock_ms: float | None  # None: the tree does not measure it
    held_ms: float | None
    ratio: float = 1.0
    verdict: Verdict | None = None

    def cells(self) -> list[str]:
        return [
            self.tree,
            str(self.processes),
            f"{self.rate:,.0f}",
            f"{self.ratio:.2f}x" if self.processes > 1 else "baseline",
            f"{self.p50_ms:.1f}",
            f"{self.p99_ms:.1f}",
            str(self.errors),
            str(self.cpu),
            f"{self.per_commit:.1f}",
            f"{self.replanned:.1%}",
            "-" if self.lock_ms is None else f"{self.lock_ms:.2f}",
            "-" if self.held_ms is None else f"{self.held_ms:.2f}",
            self.verdict.cell() if self.verdict else "",
        ]


HEADERS = [
    "tree",
    "processes",
    "PUT/s",
    "vs one process",
    "p50 ms",
    "p99 ms",
    "errors",
    "CPU cores servers / postgres / wrk / other",
    "writes per transaction",
    "decided again under the lock",
    "lock wait ms per transaction",
    "lock held ms per transaction",
    "target",
]


async def measure(args: argparse.Namespace, cluster: Cluster, tmp: Path, tree: str) -> list[Row]:
    """Seed the things through one process, then the PUT runs for each count."""
    _, write_script = write_lua(tmp)
    rows: list[Row] = []
    (first,) = cluster.start(1)
    await create_policy(first.url)
    created = await create_missing(first, args.things)
    print(f"{tree}: created {created:,} things", flush=True)
    cluster.stop([first])
    for count in args.counts:
        print(f"== {tree}: {count} process(es)", flush=True)
        servers = cluster.start(count)
        try:
            urls = [s.url for s in servers]
            run_put(servers, write_script, args.things, args.warmup, args.connections)
            wait_quiet(args.quiet_wait, threshold=0.5)
            before = counters(urls)
            out, cpu = run_put(servers, write_script, args.things, args.duration, args.connections)
            after = counters(urls)
            d = {k: after[k] - before[k] for k in COUNTERS}
            events = d["twinstore_journal_events_appended_total"]
            commits = d["twinstore_journal_commits_total"]
            locks = d["twinstore_journal_lock_seconds_count"]
            held = d["twinstore_journal_lock_held_seconds_count"]
            rows.append(
                Row(
                    tree,
                    count,
                    out["acked"] / out["elapsed"],
                    out["p50_us"] / 1e3,
                    out["p99_us"] / 1e3,
                    _errors(out) + int(out["failed"]),
                    cpu,
                    events / max(1.0, commits),
                    d["twinstore_journal_replans_total"] / max(1.0, events),
                    1e3 * d["twinstore_journal_lock_seconds_sum"] / locks if locks else None,
                    1e3 * d["twinstore_journal_lock_held_seconds_sum"] / held if held else None,
                )
            )
            print(markdown_table(HEADERS, [rows[-1].cells()]).splitlines()[-1], flush=True)
        finally:
            cluster.stop(servers)
    return rows


def worktree(ref: str, tmp: Path) -> Path:
    """A checkout of ``ref`` (the baseline tree) next to this one, for the run."""
    path = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True)
    return path


async def run(args: argparse.Namespace, database_url: str, tmp: Path) -> tuple[list[str], str]:
    users = tmp / "users.htpasswd"
    write_users_file(users, {USER: PASSWORD})
    rows: list[Row] = []
    if args.baseline:
        base_tree = worktree(args.baseline, tmp)
        name, base_url = await create_database(args.database_url, "twinstore_bench_write_scale_base")
        cluster = Cluster(base_url, args, users, tmp, root=base_tree)
        try:
            rows += await measure(args, cluster, tmp, f"before ({args.baseline})")
        finally:
            await cluster.close()
            await drop_database(args.database_url, name)
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False
            )
    settings = {f"TWINSTORE_{k.upper()}": v for k, _, v in (kv.partition("=") for kv in args.set)}
    cluster = Cluster(database_url, args, users, tmp, env=settings)
    try:
        rows += await measure(args, cluster, tmp, "this tree" + "".join(f", {kv}" for kv in args.set))
    finally:
        await cluster.close()
    for tree in dict.fromkeys(r.tree for r in rows):
        base = next((r for r in rows if r.tree == tree and r.processes == 1), None)
        for row in rows:
            if row.tree != tree or base is None or row.processes == 1:
                continue
            row.ratio = row.rate / base.rate
            if tree.startswith("this tree"):
                row.verdict = Verdict(
                    f"PUT with {row.processes} processes vs 1",
                    f"{row.rate:,.0f}/s vs {base.rate:,.0f}/s = {row.ratio:.2f}x",
                    f"≥ {TARGET:.1f}x",
                    row.ratio >= TARGET and row.errors == 0,
                )
    facts = [
        f"{args.connections} wrk connections spread round-robin over the processes, PUT of one property "
        f"of random things among {args.things:,}; {args.duration:.0f} s measured after {args.warmup:.0f} s "
        "of warm-up per count; every process runs its share of the relay (serve --no-ingest --no-anomaly).",
        "The baseline tree runs on its own database with its own schema, in the same run, before this tree.",
    ]
    body = markdown_table(HEADERS, [r.cells() for r in rows])
    one = next((r for r in rows if r.tree.startswith("this tree") and r.processes == 1), None)
    if one is not None and one.held_ms is not None:
        chosen = dict(kv.partition("=")[::2] for kv in args.set)
        body += "\n\n" + projection(one, int(chosen.get("journal_partitions_per_transaction", GROUP)))
    return facts, body  # the summary is generated from the table's target column


PROJECTION_HEADERS = [
    "cores",
    "CPU bound writes/s",
    "serial bound writes/s",
    "projected writes/s",
    "per core",
]


def projection(one: Row, group: int) -> str:
    """Writes/s beyond this machine from the one-process row's measurements (see the module):
    CPU per write (twinstore + PostgreSQL, both spread over processes and backends) bounds
    N cores at N / cpu; the partitions' serial sections bound the whole at partitions x
    (writes per transaction / lock held per transaction)."""
    cpu = (one.cpu.server + one.cpu.postgres) / one.rate  # core-seconds per write
    assert one.held_ms is not None
    # A transaction locks its group of `group` partitions: the group is the serial unit.
    units = PARTITIONS // group
    unit_rate = one.per_commit / (one.held_ms / 1e3)  # one group's writes/s, serially
    rows = []
    for cores in CORES:
        cpu_bound = cores / cpu
        serial_bound = units * unit_rate
        rate = min(cpu_bound, serial_bound)
        rows.append(
            [str(cores), f"{cpu_bound:,.0f}", f"{serial_bound:,.0f}", f"{rate:,.0f}", f"{rate / cores:,.0f}"]
        )
    return "\n".join(
        [
            f"Scale beyond this machine, projected from the one-process row above: CPU per write "
            f"{1e3 * one.cpu.server / one.rate:.2f} ms in twinstore + "
            f"{1e3 * one.cpu.postgres / one.rate:.2f} ms "
            f"in PostgreSQL (parallel: more processes and backends on more cores); serial per group "
            f"of {group} partitions (journal_partitions_per_transaction) {one.held_ms:.2f} ms of lock "
            f"held per transaction of {one.per_commit:.1f} writes ({unit_rate:,.0f} writes/s per group, "
            f"{units} groups of {PARTITIONS} partitions). Projected writes/s = min(cores / CPU per write, "
            "groups x writes/s per group), i.e. Amdahl's law with no cluster-wide serial section left "
            "but each group's; the lock held time measured here includes waits for this machine's "
            "saturated CPU, so the serial bound is pessimistic; the WAL's fsyncs, network hops "
            f"and a sharded database's coordinator are not in it. Ditto publishes "
            f"{DITTO_MODIFIES_PER_INSTANCE} modifies/s per instance.",
            "",
            markdown_table(PROJECTION_HEADERS, rows),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--counts", default="1,2,3", help="comma-separated process counts (1 first: the baseline)"
    )
    parser.add_argument(
        "--baseline",
        default="2c95477",
        help="git ref of the tree to compare with in the same run ('' for none; default: the last "
        "commit before the partitioned journal)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a setting of this tree's processes"
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--things", type=int, default=10_000, help="things the PUTs address")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up PUTs per count")
    parser.add_argument(
        "--quiet-wait", type=float, default=15.0, help="wait up to this long for an idle machine before a run"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.counts = [int(n) for n in str(args.counts).split(",") if n.strip()]
    return args


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("bench/write_scale.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    raise_nofile()
    return await run_on_fresh_database(
        args,
        name="write-scale",
        title="Writes that scale out (issue 17): HTTP PUT on 1, 2 and 3 processes",
        run=lambda url, tmp: run(args, url, tmp),
    )


def main() -> None:
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
