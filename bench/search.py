"""Search and count at 100,000 things: page latency and count time, against raw SQL.

Issue 4's search figures, measured in one run on a fresh database:

* **Seed** ``--things`` things (default 100,000) through :class:`twinstore.service.ThingService`
  (the same path an HTTP create takes: validation, policy creation, journal, projection), over
  ten namespaces. Each thing has attributes ``serial`` (unique), ``manufacturer`` (one of 50),
  ``floor`` (0..99) and a feature ``env`` with ``temperature`` (0..100) and ``status``. 90 % of
  the things get their own default policy (owner ``alice``); 10 % share one policy under which
  ``alice`` reads everything and ``bob`` reads everything but ``attributes/serial`` and the
  feature ``env`` -- so ``bob``'s searches take the policy-aware path on every candidate.
* **Queries** over HTTP against ``twinstore serve`` (one worker), sequentially: every query of
  :data:`QUERIES` ``--repeat`` times as a page (``size(25)``, default sort) and as a count;
  p50 / p95 / max latency per query. Targets: an indexed equality or range filter returns a
  page in p95 <= 20 ms, count in <= 50 ms.
* **Baseline** in the same run: the equivalent hand-written SQL on the ``things`` table with
  asyncpg (no policies, no HTTP), the floor of what any search on this projection costs.

Run ``.venv/bin/python bench/search.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from api import Server
from benchlib import (
    Verdict,
    add_run_arguments,
    markdown_table,
    percentile,
    run_on_fresh_database,
)

from twinstore.auth import AuthContext, write_users_file
from twinstore.model.policy import PolicyModify
from twinstore.model.thing import Create
from twinstore.policy_service import PolicyWrite
from twinstore.runtime import Runtime
from twinstore.settings import load_settings
from twinstore.store.journal import WriteRequest

SHARED_POLICY = "bench:shared"
PASSWORD = "bench-pass"


def shared_policy() -> dict[str, Any]:
    rights = {"grant": ["READ", "WRITE"], "revoke": []}
    return {
        "entries": {
            "OWNER": {
                "subjects": {"nginx:alice": {"type": "user"}},
                "resources": {"thing:/": rights, "policy:/": rights},
            },
            "READER": {
                "subjects": {"nginx:bob": {"type": "user"}},
                "resources": {
                    "thing:/": {"grant": ["READ"], "revoke": []},
                    "thing:/attributes/serial": {"grant": [], "revoke": ["READ"]},
                    "thing:/features/env": {"grant": [], "revoke": ["READ"]},
                },
            },
        }
    }


def document(i: int, rng: random.Random) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "attributes": {
            "serial": f"SN{i:07d}",
            "manufacturer": f"m{rng.randrange(50):02d}",
            "floor": rng.randrange(100),
        },
        "features": {
            "env": {
                "properties": {
                    "temperature": round(rng.uniform(0, 100), 3),
                    "status": "alarm" if rng.random() < 0.01 else "ok",
                }
            }
        },
    }
    if i % 10 == 0:
        doc["policyId"] = SHARED_POLICY
    return doc


def thing_id(i: int) -> str:
    return f"ns{i % 10}:thing-{i:07d}"


async def seed(rt: Runtime, things: int, concurrency: int = 64) -> float:
    """Create ``things`` things through the service; returns things/s."""
    assert rt.service is not None and rt.policies is not None
    alice = AuthContext(("nginx:alice",))
    await rt.policies.write(
        PolicyWrite(
            policy_id=SHARED_POLICY, command=PolicyModify(parts=[], value=shared_policy()), auth=alice
        ),
    )
    rng = random.Random(7)
    docs = [document(i, rng) for i in range(things)]
    queue = iter(range(things))
    done = 0
    t0 = time.monotonic()

    async def worker() -> None:
        nonlocal done
        assert rt.service is not None
        for i in queue:
            command = Create(value=docs[i])
            await rt.service.write(
                alice, WriteRequest(thing_id=thing_id(i), command=command, originator="alice")
            )
            done += 1
            if done % 10_000 == 0:
                rate = done / (time.monotonic() - t0)
                print(f"  seeded {done:,} things ({rate:,.0f}/s)", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return things / (time.monotonic() - t0)


@dataclass(frozen=True)
class Query:
    """One search: its RQL filter, the user running it, and the same search as plain SQL."""

    name: str
    user: str
    filter: str
    sql_where: str  # the baseline: the same condition on the things table, no policies
    sort: str | None = None
    sql_order: str = 'id COLLATE "C"'


def _number(path: str) -> str:
    """The value the search index of ``path`` holds (the baseline uses the same indexes)."""
    return f"(CASE WHEN jsonb_typeof(doc #> '{{{path}}}') = 'number' THEN (doc #> '{{{path}}}')::numeric END)"


SEARCH_INDEXES = ["attributes/floor", "features/env/properties/temperature"]
QUERIES = [
    Query(
        "equality, 2 % match",
        "alice",
        'eq(attributes/manufacturer,"m07")',
        'doc @> \'{"attributes":{"manufacturer":"m07"}}\'',
    ),
    Query(
        "equality, 1 match",
        "alice",
        'eq(attributes/serial,"SN0012345")',
        'doc @> \'{"attributes":{"serial":"SN0012345"}}\'',
    ),
    Query(
        "range (search index), 2 % match",
        "alice",
        "and(ge(attributes/floor,40),lt(attributes/floor,42))",
        f"{_number('attributes,floor')} >= 40 AND {_number('attributes,floor')} < 42",
    ),
    Query(
        "range (search index), 0.1 % match",
        "alice",
        "gt(features/env/properties/temperature,99.9)",
        f"{_number('features,env,properties,temperature')} > 99.9",
    ),
    Query(
        "equality 2 %, sorted by -attributes/floor",
        "alice",
        'eq(attributes/manufacturer,"m07")',
        'doc @> \'{"attributes":{"manufacturer":"m07"}}\'',
        sort="-attributes/floor",
        sql_order=f'{_number("attributes,floor")} DESC NULLS LAST, id COLLATE "C"',
    ),
    Query(
        "equality, 99 % match",
        "alice",
        'eq(features/env/properties/status,"ok")',
        'doc @> \'{"features":{"env":{"properties":{"status":"ok"}}}}\'',
    ),
    Query(
        "range without search index, 0.1 % match",
        "alice",
        'lt(attributes/serial,"SN0000100")',
        "(doc #>> '{attributes,serial}') COLLATE \"C\" < 'SN0000100'",
    ),
    Query(
        "equality, as bob (partial reader of 10 %)",
        "bob",
        'eq(attributes/manufacturer,"m10")',
        'doc @> \'{"attributes":{"manufacturer":"m10"}}\' AND policy_id = \'bench:shared\'',
    ),
]


@dataclass
class Timing:
    query: Query
    kind: str  # "page" or "count"
    samples: list[float]
    result: int

    def row(self, baseline: list[float]) -> list[object]:
        s = sorted(self.samples)
        b = sorted(baseline)
        return [
            self.query.name,
            self.kind,
            f"{self.result:,}",
            f"{statistics.median(s):.1f}",
            f"{percentile(s, 0.95):.1f}",
            f"{s[-1]:.1f}",
            f"{statistics.median(b):.1f}",
            f"{percentile(b, 0.95):.1f}",
        ]


async def time_http(client: httpx.AsyncClient, query: Query, kind: str, repeat: int) -> Timing:
    path = "/api/2/search/things" + ("/count" if kind == "count" else "")
    params = {"filter": query.filter}
    if kind == "page":
        params["option"] = "size(25)" + (f",sort({query.sort})" if query.sort else "")
    samples: list[float] = []
    result = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = await client.get(path, params=params, auth=(query.user, PASSWORD))
        samples.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"{query.name}: {r.status_code} {r.text}")
        result = r.json() if kind == "count" else len(r.json()["items"])
    return Timing(query, kind, samples, result)


async def time_sql(pool: asyncpg.Pool, query: Query, kind: str, repeat: int) -> list[float]:
    if kind == "count":
        sql = f"SELECT count(*) FROM things WHERE doc IS NOT NULL AND {query.sql_where}"
    else:
        sql = (
            f"SELECT id, doc FROM things WHERE doc IS NOT NULL AND {query.sql_where} "
            f"ORDER BY {query.sql_order} LIMIT 26"
        )
    samples: list[float] = []
    async with pool.acquire() as con:
        for _ in range(repeat):
            t0 = time.perf_counter()
            await con.fetch(sql)
            samples.append((time.perf_counter() - t0) * 1000)
    return samples


HEADERS = [
    "query", "kind", "result", "p50 ms", "p95 ms", "max ms", "SQL p50 ms", "SQL p95 ms", "target (issue 4)"
]  # fmt: skip
# Issue 4's targets hold for an indexed equality or range filter; the other queries are measured
# for honesty (a sort over every match, a count of nearly all things, a path without an index).
TARGET_QUERIES = {q.name for q in QUERIES[:4]}
TARGET_MS = {"page": 20.0, "count": 50.0}  # p95


def verdict_of(query: Query, kind: str, row: list[object]) -> Verdict | None:
    if query.name not in TARGET_QUERIES:
        return None
    p95 = str(row[4])
    return Verdict(
        f"{query.name}, {kind}",
        f"p95 {p95} ms",
        f"p95 ≤ {TARGET_MS[kind]:.0f} ms",
        float(p95.replace(",", "")) <= TARGET_MS[kind],
    )


async def run(
    args: argparse.Namespace, database_url: str, tmp: Path
) -> tuple[list[str], list[list[object]], list[Verdict]]:
    facts: list[str] = []
    settings = load_settings(
        {},
        database_url=database_url,
        nats_url=args.nats_url,
        nats_prefix=f"bs{secrets.token_hex(4)}",
        search_indexes=SEARCH_INDEXES,
    )
    rt = Runtime(settings)
    await rt.open()
    try:
        print(f"seeding {args.things:,} things", flush=True)
        rate = await seed(rt, args.things)
        facts.append(f"seeded {args.things:,} things through ThingService at {rate:,.0f} things/s")
    finally:
        await rt.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    async with pool.acquire() as con:
        await con.execute("VACUUM ANALYZE things")
        await con.execute("VACUUM ANALYZE policies")
        size = await con.fetchval("SELECT pg_size_pretty(pg_total_relation_size('things'))")
        facts.append(f"things table with indexes: {size}")
    users = tmp / "users"
    write_users_file(users, {"alice": PASSWORD, "bob": PASSWORD})
    server = Server(database_url, args.nats_url, users, 1, tmp / "server.log")
    server.env["TWINSTORE_SEARCH_INDEXES"] = json.dumps(SEARCH_INDEXES)
    facts.append(f"search indexes (settings.search_indexes): {', '.join(SEARCH_INDEXES)}")
    rows: list[list[object]] = []
    verdicts: list[Verdict] = []
    try:
        server.start()
        load_before = os.getloadavg()[0]
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            for query in QUERIES:
                for kind in ("page", "count"):
                    await time_http(client, query, kind, 3)  # warm caches and plans
                    timing = await time_http(client, query, kind, args.repeat)
                    baseline = await time_sql(pool, query, kind, args.repeat)
                    row = timing.row(baseline)
                    verdict = verdict_of(query, kind, row)
                    if verdict is not None:
                        verdicts.append(verdict)
                    rows.append([*row, verdict.cell() if verdict else "-"])
                    print(markdown_table(HEADERS, [rows[-1]]).splitlines()[-1], flush=True)
        facts.append(
            f"load average (1 min) on the 2-core machine: {load_before:.2f} when the queries began, "
            f"{os.getloadavg()[0]:.2f} at their end (requests are sequential: about 1 core is the run's own)"
        )
    finally:
        server.stop()
        await server.delete_stream()
        await pool.close()
    return facts, rows, verdicts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--things", type=int, default=100_000, help="things to seed (default 100,000)")
    parser.add_argument("--repeat", type=int, default=100, help="requests per query and kind")
    add_run_arguments(parser)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    async def report(url: str, tmp: Path) -> tuple[list[str], str, list[Verdict]]:
        facts, rows, verdicts = await run(args, url, tmp)
        return facts, markdown_table(HEADERS, rows), verdicts

    return await run_on_fresh_database(args, name="search", title="Search (issue 4)", run=report)


def main() -> None:
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
