"""The cost of issue 15's checks (header and depth bounds, read checks, filtered ETags, rate
limits, connection limits) on GET and PUT: this tree against a baseline tree, same run.

The baseline is another checkout of the project (``--baseline-ref``, default the commit before
the checks: made with ``git worktree add`` into a temporary folder and removed afterwards). Both
trees run as real ``twinstore serve`` processes, each on its own fresh database on the same
PostgreSQL and NATS, seeded alike; wrk drives them in alternating rounds (baseline, this tree,
baseline, ...) so that drift of the machine hits both:

* ``GET /api/2/things/{id}`` of random seeded things (basic auth, policy, projection read);
* ``PUT .../features/f/properties/temp`` (one durable write per request).

The figures are the median over the rounds of requests per second and of the server's CPU
time per request (the server process and its children; PostgreSQL's CPU is not counted), and
the ratio this tree / baseline. The target is < 3 % more CPU per request for each.

Run ``.venv/bin/python bench/security_cost.py --help``; needs ``wrk`` (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from api import (
    AUTHORIZATION,
    GET_LUA,
    NAMESPACE_PREFIX,
    PROPERTY,
    WRITE_LUA,
    Server,
    _errors,
    run_wrk,
    seed,
)
from benchlib import (
    ROOT,
    CpuMeter,
    Verdict,
    add_run_arguments,
    command_line,
    create_database,
    drop_database,
    machine_notes,
    markdown_table,
    summary,
    wait_quiet,
    write_section,
)

from twinstore.auth import write_users_file

BASELINE_REF = "0845462"  # main before issue 15's checks
TARGET = 0.03


@dataclass
class Samples:
    rate: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU microseconds per request
    p99_ms: list[float] = field(default_factory=list)
    errors: int = 0


def _round(server: Server, test: str, args: argparse.Namespace, tmp: Path, into: Samples) -> None:
    assert server.proc is not None
    meter = CpuMeter(server.proc.pid)
    wait_quiet(args.quiet_wait)
    if test == "GET":
        script = tmp / "get.lua"
        out, cpu = run_wrk(
            ["-t", "1", "-c", str(args.clients), "-d", f"{args.duration:.0f}s"],
            script,
            server.url,
            [NAMESPACE_PREFIX, str(args.things), AUTHORIZATION],
            busy=args.duration - 0.2,
            meter=meter,
        )
        rate = out["requests"] / (out["duration_us"] / 1e6)
    else:
        script = tmp / "write.lua"
        grace = 3.0
        out, cpu = run_wrk(
            ["-t", str(args.clients), "-c", str(args.clients), "-d", f"{args.duration + grace:.0f}s"],
            script,
            server.url,
            [
                "PUT",
                NAMESPACE_PREFIX,
                str(args.things),
                PROPERTY,
                "%d",
                str(args.duration),
                AUTHORIZATION,
                "application/json",
            ],
            busy=args.duration,
            meter=meter,
        )
        rate = out["acked"] / out["elapsed"]
        into.errors += int(out["failed"])
    into.errors += _errors(out)
    into.rate.append(rate)
    into.cpu_us.append(cpu.server / rate * 1e6)
    into.p99_ms.append(out["p99_us"] / 1e3)
    print(
        f"  {test:3} {server.root.name:>10}: {rate:8.0f}/s  {cpu.server / rate * 1e6:7.0f} us CPU/request"
        f"  p99 {out['p99_us'] / 1e3:.1f} ms",
        flush=True,
    )


async def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("bench/security_cost.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    notes = await machine_notes(args.database_url)
    tmp = Path(tempfile.mkdtemp(prefix="twinstore-bench-security-"))
    (tmp / "get.lua").write_text(GET_LUA)
    (tmp / "write.lua").write_text(WRITE_LUA)
    baseline_tree = tmp / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(baseline_tree), args.baseline_ref],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    users = tmp / "users"
    write_users_file(users, {"bench": "bench-password"})
    servers: dict[str, Server] = {}
    databases: list[str] = []
    samples = {(name, test): Samples() for name in ("baseline", "current") for test in ("GET", "PUT")}
    try:
        for name, root in (("baseline", baseline_tree), ("current", ROOT)):
            db_name, url = await create_database(args.database_url, f"twinstore_bench_sec_{name}")
            databases.append(db_name)
            server = Server(url, args.nats_url, users, 1, tmp / f"{name}.log", root=root)
            server.start()
            servers[name] = server
            await seed(server.url, args.things)
            # warm-up: caches, the pool, the JIT-less interpreter's first paths
            _round(server, "GET", argparse.Namespace(**{**vars(args), "duration": 3.0}), tmp, Samples())
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            for test in ("GET", "PUT"):
                order = ("baseline", "current") if index % 2 == 0 else ("current", "baseline")
                for name in order:
                    _round(servers[name], test, args, tmp, samples[(name, test)])
    finally:
        for server in servers.values():
            server.stop()
            await server.delete_stream()
        for db_name in databases:
            await drop_database(args.database_url, db_name)
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(baseline_tree)], cwd=ROOT, capture_output=True
        )
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    verdicts: list[Verdict] = []
    ok = True
    for test in ("GET", "PUT"):
        base, cur = samples[("baseline", test)], samples[("current", test)]
        b_cpu, c_cpu = statistics.median(base.cpu_us), statistics.median(cur.cpu_us)
        b_rate, c_rate = statistics.median(base.rate), statistics.median(cur.rate)
        overhead = c_cpu / b_cpu - 1
        ok = ok and overhead < TARGET
        verdict = Verdict(
            f"{test} {'thing' if test == 'GET' else 'property'}",
            f"CPU change {overhead:+.1%}",
            f"CPU change < +{TARGET:.0%}",
            overhead < TARGET,
        )
        verdicts.append(verdict)
        rows.append(
            [
                f"{test} {'thing' if test == 'GET' else 'property'}",
                f"{b_rate:,.0f}",
                f"{c_rate:,.0f}",
                f"{c_rate / b_rate:.2f}x",
                f"{b_cpu:,.0f}",
                f"{c_cpu:,.0f}",
                f"{overhead:+.1%}",
                f"{statistics.median(base.p99_ms):.1f} / {statistics.median(cur.p99_ms):.1f}",
                f"{base.errors} / {cur.errors}",
                verdict.cell(),
            ]
        )
    table = markdown_table(
        [
            "request",
            "baseline /s",
            "this tree /s",
            "ratio",
            "baseline CPU us/req",
            "this tree CPU us/req",
            "CPU change",
            "p99 ms baseline / this",
            "errors",
            "target (CPU per request)",
        ],
        rows,
    )
    print(
        f"\nbaseline {args.baseline_ref}, {args.rounds} alternating rounds of {args.duration:.0f} s, "
        f"{args.clients} connections, medians\n"
    )
    print(table)
    text = "\n".join(
        [
            "## Cost of the security checks (bench/security_cost.py)",
            "",
            "Command: `" + command_line() + "`",
            "",
            *[f"- {n}" for n in notes],
            f"- baseline: `{args.baseline_ref}` in a git worktree; {args.rounds} alternating rounds of "
            f"{args.duration:.0f} s per request kind, {args.clients} connections, {args.things:,} things, "
            "medians; "
            "CPU is the server process's own (PostgreSQL not counted)",
            "",
            table,
            "",
            summary(notes, verdicts),
        ]
    )
    if not args.no_output:
        write_section(args.output, "security-cost", text)
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_run_arguments(parser)
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the baseline tree")
    parser.add_argument("--things", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--quiet-wait", type=float, default=10.0, help="max seconds to wait for a quiet machine"
    )
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
