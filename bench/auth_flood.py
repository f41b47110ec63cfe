"""Wrong-password flood (issue 15 item 10): does a flood of failed logins slow everyone else?

One ``twinstore serve`` process (users file with bcrypt cost 10, as ``write_users_file``), one
thing. A legitimate client GETs the thing with a correct password at a steady rate (each
request started on schedule, its latency counted from the scheduled time, so queueing in the
client is not hidden). Three phases of the same length in one run: without the flood, with 64
clients (a separate process, one connection each) sending wrong passwords as fast as they are
answered (half for the legitimate user's name, half for unknown names), and without again.

Target: the p99 of the legitimate requests with the flood within 2x of the p99 without it.

    .venv/bin/python bench/auth_flood.py [--seconds 30] [--rate 50] [--attackers 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import httpx
import psutil
from api import Server  # type: ignore[import-not-found]
from benchlib import (
    CpuMeter,
    Verdict,
    add_run_arguments,
    latency_cells,
    markdown_table,
    percentile,
    process_cpu,
    run_on_fresh_database,
    wait_quiet,
)

THING = "bench.flood:t1"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def legitimate(url: str, seconds: float, rate: float) -> list[float]:
    """GET the thing ``rate`` times a second for ``seconds``; latencies (ms) from the schedule."""
    latencies: list[float] = []
    headers = {"authorization": basic("ditto", "ditto")}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        assert (await c.get(f"/api/2/things/{THING}", headers=headers)).status_code == 200

        async def one(due: float) -> None:
            r = await c.get(f"/api/2/things/{THING}", headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"legitimate request answered {r.status_code}: {r.text[:200]}")
            latencies.append((time.monotonic() - due) * 1000)

        tasks = []
        start = time.monotonic()
        n = int(seconds * rate)
        for i in range(n):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    return sorted(latencies)


async def flood(url: str, attackers: int, seconds: float) -> dict[str, int]:
    """``attackers`` connections sending wrong passwords back to back for ``seconds``."""
    counts: dict[str, int] = {}
    stop = time.monotonic() + seconds

    # One client (one SSL context: making 64 takes seconds of CPU) with a connection per attacker.
    limits = httpx.Limits(max_connections=attackers, max_keepalive_connections=attackers)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def attacker(n: int) -> None:
            i = 0
            while time.monotonic() < stop:
                user = "ditto" if n % 2 == 0 else f"nobody{n}-{i}"
                try:
                    r = await c.get(f"/api/2/things/{THING}", headers={"authorization": basic(user, f"x{i}")})
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                counts[key] = counts.get(key, 0) + 1
                i += 1

        await asyncio.gather(*(attacker(n) for n in range(attackers)))
    return counts


def start_flood(url: str, attackers: int, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--flood-worker", url, str(attackers), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


async def measure(
    args: argparse.Namespace, database_url: str, tmp: Path
) -> tuple[list[str], str, list[Verdict]]:
    users = tmp / "users.htpasswd"
    users.write_text(f"ditto:{bcrypt.hashpw(b'ditto', bcrypt.gensalt(10)).decode()}\n")
    server = Server(database_url, args.nats_url, users, 1, tmp / "server.log")
    server.start()
    try:
        headers = {"authorization": basic("ditto", "ditto")}
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            r = await c.put(f"/api/2/things/{THING}", json={"attributes": {"a": 1}}, headers=headers)
            assert r.status_code in (201, 204), r.text
        assert server.proc is not None
        meter = CpuMeter(server.proc.pid)
        rows: list[list[object]] = []
        p99: dict[str, float] = {}
        for phase in ("without flood", "64 clients flooding", "without flood (again)"):
            print(f"machine busy before '{phase}': {wait_quiet(20):.2f} cores", flush=True)
            flooding = "flooding" in phase
            worker = start_flood(server.url, args.attackers, args.seconds + 2) if flooding else None
            if worker is not None:
                await asyncio.sleep(2)  # the flood runs before the measurement starts
            client_cpu0 = process_cpu(psutil.Process())
            begin = meter.start()
            latencies = await legitimate(server.url, args.seconds, args.rate)
            cpu = meter.stop(begin, process_cpu(psutil.Process()) - client_cpu0)
            counts: dict[str, int] = {}
            if worker is not None:
                out, _ = worker.communicate(timeout=120)
                counts = json.loads(out.strip().splitlines()[-1])
            flood_rate = sum(counts.values()) / (args.seconds + 2) if counts else 0.0
            answers = ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items())) or "-"
            p99[phase] = percentile(latencies, 0.99)
            rows.append(
                [
                    phase,
                    *latency_cells(latencies),
                    f"{flood_rate:,.0f}",
                    answers,
                    f"{cpu.server:.2f}",
                    f"{cpu.other:.2f}",
                ]
            )
            print(markdown_table(HEADERS, rows[-1:]), flush=True)
    finally:
        server.stop()
        await server.delete_stream()
    base = p99["without flood"]
    flooded = p99["64 clients flooding"]
    ratio = flooded / base if base else float("inf")
    flood_row = next(r for r in rows if r[0] == "64 clients flooding")
    verdict = Verdict(
        "legitimate GET during the flood",
        f"p99 {flood_row[2]} ms, {ratio:.2f}x without flood",
        "p99 ≤ 2x without flood",
        ratio <= 2.0,
    )
    for row in rows:
        phase_ratio = p99[str(row[0])] / base if base else float("inf")
        row += [f"{phase_ratio:.2f}x", verdict.cell() if row is flood_row else ""]
    facts = [
        f"legitimate: GET {THING} with a correct password, {args.rate:g}/s for {args.seconds:g} s a phase",
        f"flood: {args.attackers} connections, wrong passwords back to back (half 'ditto', half unknown)",
    ]
    body = markdown_table([*HEADERS, "p99 vs without flood", "target"], rows)
    return facts, body, [verdict]


HEADERS = [
    "phase",
    "p50 ms",
    "p99 ms",
    "max ms",
    "requests",
    "flood req/s",
    "flood answers",
    "server cores",
    "other cores",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=50.0, help="legitimate requests per second")
    parser.add_argument("--attackers", type=int, default=64)
    parser.add_argument(
        "--flood-worker", nargs=3, metavar=("URL", "ATTACKERS", "SECONDS"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.flood_worker:
        url, attackers, seconds = args.flood_worker
        counts = asyncio.run(flood(url, int(attackers), float(seconds)))
        print(json.dumps(counts), flush=True)
        return

    async def run(database_url: str, tmp: Path) -> tuple[list[str], str, list[Verdict]]:
        return await measure(args, database_url, tmp)

    sys.exit(
        asyncio.run(
            run_on_fresh_database(
                args, name="auth_flood", title="Wrong-password flood (bench/auth_flood.py)", run=run
            )
        )
    )


if __name__ == "__main__":
    main()
