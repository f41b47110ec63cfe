"""What per-feature policies cost: GET throughput with and without restrictions, and filtering big things.

Issue 3's two figures, measured in one run:

1. **HTTP** (``twinstore serve``, one worker, fresh database, wrk as in ``bench/api.py``): things
   with a realistic document (attributes, five features) whose policy grants user A (``alice``)
   READ/WRITE on ``thing:/`` and user B (``bob``) READ on ``thing:/`` minus ``features/f2`` and
   ``attributes/secret``, with READ granted back on ``features/f2/properties/public`` -- so B's
   reads take the real filtering path, A's the fast path (the whole document, no copy). GET
   /api/2/things/{id} is driven as A and as B alternately (A B, B A, A B, ...) so machine noise
   shows in both; target: B's throughput at least 0.90 of A's. Two variants: one policy shared by all
   things, and one policy per thing (the default policy created with the thing, then given B's
   entry through the policy API).
2. **In process**: ``SubjectView.filter`` of a thing with 1,000 features (properties and
   desiredProperties each) under a policy of 100 entries, the caller's subjects matching 26 of
   them with grants, revokes and re-grants spread over half the features; target ≤ 1 ms per
   read with the view cached. Also the cold cost (parsing the policy, building the enforcer,
   compiling the first view of a subject set), the hot ``Enforcer.view`` lookup and the fast
   path (a subject with full access).

Run ``.venv/bin/python bench/policy_cost.py --help``; needs ``wrk`` (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import gc
import io
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import orjson
from api import GET_LUA, Server, run_wrk
from benchlib import (
    ROOT,
    CpuMeter,
    CpuUse,
    Verdict,
    command_line,
    create_database,
    default_database_url,
    default_nats_url,
    drop_database,
    machine_notes,
    markdown_table,
    percentile,
    summary,
    wait_quiet,
    write_section,
)

import policies
from policies import MISSING, Enforcer
from twinstore.auth import AuthContext, write_users_file
from twinstore.enforcement import PolicyCache
from twinstore.model.thing import ThingState
from twinstore.service import ThingService

USERS = {"alice": "alice-password", "bob": "bob-password"}
FULL, RESTRICTED = "alice", "bob"
RATIO_TARGET = 0.90  # B's GET throughput at least this share of A's
FILTER_TARGET_MS = 1.0  # per filtered read of the 1,000-feature thing


def authorization(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()


def _rights(grant: list[str], revoke: list[str] | None = None) -> dict[str, list[str]]:
    return {"grant": grant, "revoke": revoke or []}


# ---- part 1: HTTP ---------------------------------------------------------------------------

ALL = ["READ", "WRITE"]
RESTRICTED_ENTRY: dict[str, Any] = {
    "subjects": {f"nginx:{RESTRICTED}": {"type": "bench reader"}},
    "resources": {
        "thing:/": _rights(["READ"]),
        "thing:/features/f2": _rights([], ["READ"]),
        "thing:/attributes/secret": _rights([], ["READ"]),
        "thing:/features/f2/properties/public": _rights(["READ"]),
    },
}
SHARED_POLICY: dict[str, Any] = {
    "entries": {
        "owner": {
            "subjects": {f"nginx:{FULL}": {"type": "bench owner"}},
            "resources": {
                "thing:/": _rights(ALL),
                "policy:/": _rights(ALL),
                "message:/": _rights(ALL),
            },
        },
        "reader": RESTRICTED_ENTRY,
    }
}


def thing_doc(i: int) -> dict[str, Any]:
    """A realistic small thing: a few attributes, five features with a few properties each."""
    return {
        "attributes": {
            "manufacturer": "ACME",
            "model": "bench-sensor",
            "serial": f"SN-{i:06d}",
            "location": {"site": "munich", "lat": 48.137, "lon": 11.575, "floor": i % 7},
            "secret": {"pin": f"{i % 10_000:04d}", "apiKey": f"k-{i:08x}"},
        },
        "features": {
            "f1": {"properties": {"temperature": 21.5, "unit": "C", "status": {"ok": True, "code": 0}}},
            "f2": {
                "properties": {
                    "public": {"state": "on", "since": "2026-01-01T00:00:00Z"},
                    "private": {"token": f"t-{i}", "owner": "ops"},
                    "counter": i,
                }
            },
            "f3": {"properties": {"humidity": 48, "pressure": 1013.2, "battery": {"level": 87}}},
            "f4": {
                "properties": {"firmware": {"version": "1.4.2", "channel": "stable"}, "uptime": 3600},
                "desiredProperties": {"firmware": {"version": "1.5.0"}},
            },
            "f5": {"properties": {"alarms": [], "threshold": {"high": 30, "low": 5}, "enabled": True}},
        },
    }


@dataclass
class Variant:
    name: str
    prefix: str  # thing ids are <prefix>1 .. <prefix>N
    title: str


VARIANTS = {
    "shared": Variant("shared", "org.bench:s", "one policy shared by all things"),
    "per-thing": Variant("per-thing", "org.bench:p", "one policy per thing (default policy + B's entry)"),
}


async def seed(url: str, variant: Variant, things: int, concurrency: int = 32) -> None:
    """Create the variant's things as A (and the shared policy, or B's entry in each default policy)."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": authorization(FULL)}, limits=limits, timeout=30
    ) as client:

        async def ok(r: httpx.Response, what: str) -> None:
            if r.status_code not in (201, 204):
                raise RuntimeError(f"{what}: {r.status_code} {r.text}")

        shared_id = f"{variant.prefix}hared-policy"
        if variant.name == "shared":
            await ok(await client.put(f"/api/2/policies/{shared_id}", json=SHARED_POLICY), "shared policy")
        queue = iter(range(1, things + 1))

        async def worker() -> None:
            for i in queue:
                thing_id = f"{variant.prefix}{i}"
                body = thing_doc(i)
                if variant.name == "shared":
                    body["policyId"] = shared_id
                await ok(await client.put(f"/api/2/things/{thing_id}", json=body), f"thing {thing_id}")
                if variant.name == "per-thing":  # the default policy (id = thing id), then B's entry
                    entry = f"/api/2/policies/{thing_id}/entries/reader"
                    await ok(await client.put(entry, json=RESTRICTED_ENTRY), f"policy entry of {thing_id}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def check_views(url: str, variant: Variant) -> str:
    """A reads the whole thing, B the filtered one (the benchmark must measure the filtering path)."""
    thing_id = f"{variant.prefix}1"
    expected = thing_doc(1)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        a, b = [
            await client.get(f"/api/2/things/{thing_id}", headers={"Authorization": authorization(user)})
            for user in (FULL, RESTRICTED)
        ]
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    full, part = a.json(), b.json()
    assert full["attributes"] == expected["attributes"] and full["features"] == expected["features"], full
    assert "secret" not in part["attributes"] and part["attributes"]["location"], part
    public = expected["features"]["f2"]["properties"]["public"]
    assert part["features"]["f2"] == {"properties": {"public": public}}, part
    assert part["features"]["f1"] == expected["features"]["f1"], part
    return (
        f"A: {len(a.content)} bytes, B: {len(b.content)} bytes "
        "(B without attributes/secret and f2 but f2's public)"
    )


@dataclass
class Run:
    variant: str
    user: str
    round: int
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    requests: int
    cpu: CpuUse

    @property
    def server_us(self) -> float:
        """Server CPU per request (µs): less noisy than the rate on a shared machine."""
        return self.cpu.server / self.rate * 1e6 if self.rate else float("nan")


def _errors(out: dict[str, Any]) -> int:
    keys = ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
    return sum(int(out[k]) for k in keys)


async def run_http(args: argparse.Namespace, database_url: str, tmp: Path) -> tuple[list[Run], list[str]]:
    users_file = tmp / "users.htpasswd"
    write_users_file(users_file, USERS)
    script = tmp / "get.lua"
    script.write_text(GET_LUA)
    server = Server(database_url, args.nats_url, users_file, 1, tmp / "server.log")
    runs: list[Run] = []
    notes: list[str] = []
    print(f"\n== twinstore serve --workers 1  (log: {server.log})", flush=True)
    server.start()
    try:
        meter = CpuMeter(server.proc.pid if server.proc else None)
        for name in args.variant_names:
            variant = VARIANTS[name]
            t0 = time.monotonic()
            await seed(server.url, variant, args.things)
            seeded = f"seeded {args.things:,} things ({variant.title}) in {time.monotonic() - t0:.1f} s"
            checked = await check_views(server.url, variant)
            print(f"{seeded}; {checked}", flush=True)
            notes.append(f"{variant.name}: {seeded}; GET of one thing: {checked}")
            get_args = ["-t", str(args.get_threads), "-c", str(args.clients)]
            prefix = f"/api/2/things/{variant.prefix}"
            for user in (FULL, RESTRICTED):  # warm-up: caches of both subject sets, pool, JIT-free paths
                run_wrk(
                    [*get_args, "-d", f"{args.warmup:.0f}s"],
                    script,
                    server.url,
                    [prefix, str(args.things), authorization(user)],
                    busy=args.warmup,
                    meter=meter,
                )
            for rnd in range(1, args.rounds + 1):  # A B, B A, A B, ...: a drift hits both alike
                for user in (FULL, RESTRICTED) if rnd % 2 else (RESTRICTED, FULL):
                    wait_quiet(args.quiet_wait)
                    out, cpu = run_wrk(
                        [*get_args, "-d", f"{args.duration:.0f}s"],
                        script,
                        server.url,
                        [prefix, str(args.things), authorization(user)],
                        busy=args.duration - 0.2,
                        meter=meter,
                    )
                    run = Run(
                        variant.name,
                        "A (full)" if user == FULL else "B (restricted)",
                        rnd,
                        out["requests"] / (out["duration_us"] / 1e6),
                        out["p50_us"] / 1e3,
                        out["p99_us"] / 1e3,
                        out["max_us"] / 1e3,
                        _errors(out),
                        out["requests"],
                        cpu,
                    )
                    runs.append(run)
                    print(markdown_table(RUN_HEADERS, [_run_row(run)]), flush=True)
    finally:
        server.stop()
        await server.delete_stream()
    return runs, notes


RUN_HEADERS = [
    "policy",
    "user",
    "round",
    "req/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "errors",
    "server CPU µs/req",
    "CPU cores server / postgres / client / other",
]


def _run_row(r: Run) -> list[object]:
    return [
        r.variant,
        r.user,
        r.round,
        f"{r.rate:,.0f}",
        f"{r.p50_ms:.1f}",
        f"{r.p99_ms:.1f}",
        f"{r.max_ms:.1f}",
        r.errors,
        f"{r.server_us:.0f}",
        str(r.cpu),
    ]


@dataclass
class Ratio:
    variant: str
    a_rate: float
    b_rate: float
    per_round: list[float]
    a_us: float
    b_us: float

    @property
    def ratio(self) -> float:
        return self.b_rate / self.a_rate if self.a_rate else float("nan")


def ratios(runs: list[Run]) -> list[Ratio]:
    out = []
    for name in dict.fromkeys(r.variant for r in runs):
        a = [r for r in runs if r.variant == name and r.user.startswith("A")]
        b = [r for r in runs if r.variant == name and r.user.startswith("B")]
        out.append(
            Ratio(
                name,
                statistics.fmean(r.rate for r in a),
                statistics.fmean(r.rate for r in b),
                [y.rate / x.rate for x, y in zip(a, b, strict=True)],
                statistics.fmean(r.server_us for r in a),
                statistics.fmean(r.server_us for r in b),
            )
        )
    return out


# ---- the same GET in process: ThingService.retrieve + the response's JSON, no HTTP, no database ----


@dataclass
class ServiceRead:
    a_us: float  # per GET of the small thing as A: retrieve + orjson.dumps of the value
    b_us: float
    reads: int


async def run_service_reads(reads: int, blocks: int = 10) -> ServiceRead:
    """Time ``ThingService.retrieve`` (enforcement included) and the response encoding for A and B on
    the small thing of part 1, with the journal and the policy store stubbed (the state is in memory).
    A and B alternate in blocks so drift hits both; returns the mean µs per read of each."""
    state = ThingState(
        thing_id="org.bench:s1",
        revision=1,
        created=datetime.now(UTC),
        modified=datetime.now(UTC),
        doc={"thingId": "org.bench:s1", "policyId": "org.bench:shared", **thing_doc(1)},
    )
    policy_state = SimpleNamespace(doc=SHARED_POLICY)

    class Journal:
        async def load(self, thing_id: str) -> ThingState:
            return state

    class Store:
        async def load(self, policy_id: str) -> Any:
            return policy_state

    cache = PolicyCache(Store())  # type: ignore[arg-type]
    service = ThingService(Journal(), SimpleNamespace(cache=cache))  # type: ignore[arg-type]
    auths = {user: AuthContext(subjects=(f"nginx:{user}",)) for user in (FULL, RESTRICTED)}
    sizes = {}
    for user, auth in auths.items():  # warm the caches; B's answer must be the filtered one
        got = await service.retrieve(auth, state.thing_id)
        sizes[user] = len(orjson.dumps(got.value))
    assert sizes[RESTRICTED] < sizes[FULL], sizes
    totals = dict.fromkeys(auths, 0.0)
    per_block = max(1, reads // blocks)
    for block in range(blocks):
        for user in (FULL, RESTRICTED) if block % 2 == 0 else (RESTRICTED, FULL):
            auth = auths[user]
            t0 = time.perf_counter()
            for _ in range(per_block):
                got = await service.retrieve(auth, "org.bench:s1")
                orjson.dumps(got.value)
            totals[user] += time.perf_counter() - t0
    n = per_block * blocks
    return ServiceRead(totals[FULL] / n * 1e6, totals[RESTRICTED] / n * 1e6, n)


# ---- part 2: in process -----------------------------------------------------------------------

CALLER = ("nginx:carol", "group:operators", "group:site-eu")  # the caller's subjects
ADMIN = ("nginx:admin",)  # full access: the fast path
ZONES = 50  # zone entries, each covering features//ZONES features; the caller is in every other one


def big_thing(features: int) -> dict[str, Any]:
    """A thing with ``features`` features, each with 3-5 properties and desiredProperties."""
    feats: dict[str, Any] = {}
    for i in range(features):
        props: dict[str, Any] = {
            "value": 20.0 + i % 13,
            "unit": "C",
            "status": {"ok": i % 11 != 0, "code": i % 5, "since": "2026-01-01T00:00:00Z"},
            "secret": {"token": f"tok-{i:05d}", "summary": {"valid": True, "rotated": i % 30}},
        }
        if i % 2:
            props["config"] = {"threshold": 10 + i % 7, "mode": "auto", "limits": [0, 100]}
        feats[f"sensor-{i:04d}"] = {
            "definition": ["org.bench:Sensor:1.0.0"],
            "properties": props,
            "desiredProperties": {"config": {"threshold": 12, "mode": "manual"}},
        }
    return {
        "thingId": "org.bench:big",
        "policyId": "org.bench:big",
        "attributes": {
            "manufacturer": "ACME",
            "site": {"name": "munich", "lat": 48.137, "lon": 11.575},
            "internal": {"costCenter": "4711", "notes": "x" * 40},
        },
        "features": feats,
    }


def big_policy(features: int, entries: int = 100) -> dict[str, Any]:
    """``entries`` entries: the caller's base entry, ZONES zone entries over the features (the caller
    matches every other one, through different subjects), the admin's full entry and entries of
    devices the caller is not."""
    per_zone = features // ZONES
    out: dict[str, Any] = {
        "operators": {
            "subjects": {"group:operators": {"type": "group"}},
            "resources": {
                "thing:/": _rights(["READ"]),
                "thing:/attributes/internal": _rights([], ["READ"]),
                "policy:/": _rights(["READ"]),
            },
        },
        "admin": {
            "subjects": {ADMIN[0]: {"type": "admin"}},
            "resources": {"thing:/": _rights(ALL), "policy:/": _rights(ALL)},
        },
    }
    for z in range(ZONES):
        resources: dict[str, Any] = {}
        for i in range(z * per_zone, (z + 1) * per_zone):
            f = f"thing:/features/sensor-{i:04d}"
            if i % 2 == 0:  # the secret hidden, its summary granted back
                resources[f"{f}/properties/secret"] = _rights([], ["READ"])
                if i % 4 == 0:
                    resources[f"{f}/properties/secret/summary"] = _rights(["READ"])
            if i % 5 == 0:
                resources[f"{f}/desiredProperties"] = _rights([], ["READ"])
            if i % 10 == 3:  # the whole feature hidden but its status
                resources[f] = _rights(["WRITE"], ["READ"])
                resources[f"{f}/properties/status"] = _rights(["READ"])
            if i % 10 == 9:  # the whole feature hidden
                resources[f] = _rights([], ["READ"])
            if i % 10 == 7:
                resources[f"{f}/properties/config"] = _rights(["READ", "WRITE"])
        subject = CALLER[z % 4 // 2 * 2] if z % 2 == 0 else f"group:site-{z}"  # carol or site-eu, or not
        out[f"zone-{z:02d}"] = {"subjects": {subject: {"type": "zone"}}, "resources": resources}
    d = 0
    while len(out) < entries:
        out[f"device-{d:02d}"] = {
            "subjects": {f"device:{d}": {"type": "device"}},
            "resources": {
                f"thing:/features/sensor-{(d * 17) % features:04d}": _rights(ALL),
                f"thing:/features/sensor-{(d * 31) % features:04d}/properties": _rights(["WRITE"]),
            },
        }
        d += 1
    return {"entries": out}


@dataclass
class Timing:
    name: str
    samples: list[float]  # seconds

    def row(self) -> list[object]:
        s = sorted(self.samples)
        return [
            self.name,
            f"{len(s):,}",
            f"{statistics.fmean(s) * 1e3:.3f}",
            f"{percentile(s, 0.5) * 1e3:.3f}",
            f"{percentile(s, 0.99) * 1e3:.3f}",
        ]

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples) * 1e3

    @property
    def p99_ms(self) -> float:
        return percentile(sorted(self.samples), 0.99) * 1e3


TIMING_HEADERS = ["operation", "samples", "mean ms", "p50 ms", "p99 ms"]


def _time(fn: Any, repeat: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(repeat):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def _count(value: Any) -> int:
    """Nodes (dict members and scalars) of a JSON value."""
    if isinstance(value, dict):
        return 1 + sum(_count(v) for v in value.values())
    return 1


@dataclass
class Micro:
    timings: list[Timing]
    facts: list[str]
    filter_ms: Timing
    hot_read: Timing
    profile: str
    service: ServiceRead


async def run_micro(args: argparse.Namespace) -> Micro:
    thing = big_thing(args.features)
    policy_doc = big_policy(args.features, args.entries)
    policy = policies.parse_policy(policy_doc, "org.bench:big")
    enforcer = Enforcer(policy)
    view = enforcer.view(CALLER)
    filtered = view.filter("thing", [], thing)

    # The benchmark must measure real work: something readable, something hidden, deep re-grants.
    assert filtered is not MISSING and filtered is not thing and filtered != thing
    kept = filtered["features"]
    assert 0 < len(kept) < args.features, len(kept)
    assert "internal" not in filtered["attributes"]
    assert kept["sensor-0000"]["properties"]["secret"] == {
        "summary": thing["features"]["sensor-0000"]["properties"]["secret"]["summary"]
    }
    assert kept["sensor-0003"] == {
        "properties": {"status": thing["features"]["sensor-0003"]["properties"]["status"]}
    }
    assert kept["sensor-0001"] is thing["features"]["sensor-0001"]  # no decision inside: shared
    outside = f"sensor-{args.features // ZONES:04d}"  # the first feature of zone 1 (not the caller's)
    assert kept[outside] is thing["features"][outside]
    resources = sum(len(e.resources) for e in policy.entries.values())
    applying = sum(len(policy.entries[label].resources) for label in view.labels)
    changed = sum(1 for k, v in kept.items() if v is not thing["features"][k])
    facts = [
        f"thing: {args.features:,} features, {_count(thing):,} JSON nodes, "
        f"{len(msgspec.json.encode(thing)) / 1024:.0f} KiB as JSON",
        f"policy: {len(policy.entries)} entries with {resources:,} resources; the caller's 3 subjects "
        f"match {len(view.labels)} entries with {applying:,} resources (grants, revokes, re-grants)",
        f"filtered read: {len(kept):,} of {args.features:,} features readable, {changed:,} of them "
        f"rebuilt (a revoke inside), {_count(filtered):,} JSON nodes "
        f"({len(msgspec.json.encode(filtered)) / 1024:.0f} KiB)",
    ]
    admin = enforcer.view(ADMIN)
    assert admin.filter("thing", [], thing) is thing

    def paused(fn: Any) -> Any:
        def run() -> None:
            gc.disable()
            try:
                fn()
            finally:
                gc.enable()

        return run

    reads = args.reads
    quiet = wait_quiet(args.quiet_wait)
    meter = CpuMeter(None)
    begin, cpu0 = meter.start(), time.process_time()
    gc.collect()
    timings = [
        Timing("filter, caller (restricted)", _time(lambda: view.filter("thing", [], thing), reads)),
        Timing(
            "filter, caller, garbage collector paused",
            _time(paused(lambda: view.filter("thing", [], thing)), reads),
        ),
        Timing(
            "Enforcer.view (hot) + filter, caller",
            _time(lambda: enforcer.view(CALLER).filter("thing", [], thing), reads),
        ),
        Timing("Enforcer.view (hot), caller", _time(lambda: enforcer.view(CALLER), reads)),
        Timing(
            "Enforcer.view (hot) + filter, admin (fast path)",
            _time(lambda: enforcer.view(ADMIN).filter("thing", [], thing), reads),
        ),
        Timing(
            "JSON encode of the filtered read (context)", _time(lambda: msgspec.json.encode(filtered), 500)
        ),
    ]
    cold = max(20, reads // 40)
    timings += [
        Timing("cold: parse_policy", _time(lambda: policies.parse_policy(policy_doc, "org.bench:big"), cold)),
        Timing("cold: Enforcer(policy)", _time(lambda: Enforcer(policy), cold)),
    ]
    first: list[float] = []
    for _ in range(cold):
        fresh = Enforcer(policy)
        t0 = time.perf_counter()
        fresh.view(CALLER)
        first.append(time.perf_counter() - t0)
    timings.append(Timing("cold: first view of the caller's subjects", first))

    # The HTTP benchmark's small thing under B's rights, for the analysis of part 1.
    small_policy = Enforcer(policies.parse_policy(SHARED_POLICY, "org.bench:small"))
    small = {"thingId": "org.bench:s1", "policyId": "org.bench:small", **thing_doc(1)}
    b_subjects = (f"nginx:{RESTRICTED}",)
    a_subjects = (f"nginx:{FULL}",)
    timings += [
        Timing(
            "small thing (part 1): view (hot) + filter, B",
            _time(lambda: small_policy.view(b_subjects).filter("thing", [], small), reads),
        ),
        Timing(
            "small thing (part 1): view (hot) + filter, A",
            _time(lambda: small_policy.view(a_subjects).filter("thing", [], small), reads),
        ),
    ]

    cpu = meter.stop(begin, time.process_time() - cpu0)
    facts.append(
        f"machine before the timings: {quiet:.2f} cores busy (1 s sample); during them: this process "
        f"{cpu.client:.2f} cores, everything else {cpu.other + cpu.postgres:.2f} cores"
    )
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        enforcer.view(CALLER).filter("thing", [], thing)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(6)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    profile = "\n".join(lines[start:])
    service = await run_service_reads(args.reads * 10)
    return Micro(timings, facts, timings[0], timings[2], profile, service)


# ---- report ---------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, notes: list[str], runs: list[Run], http_notes: list[str], micro: Micro
) -> str:
    lines = [
        "## Policies: cost of enforcement (bench/policy_cost.py)",
        "",
        "```",
        command_line(),
        "```",
        "",
        *(f"- {n}" for n in notes),
        "",
    ]
    summary_rows = ratios(runs) if runs else []
    ratio_verdicts = [
        Verdict(
            f"GET as B vs A, {s.variant} policy",
            f"B / A = {s.ratio:.3f} ({s.b_rate:,.0f} vs {s.a_rate:,.0f} req/s)",
            f"B / A ≥ {RATIO_TARGET:.2f}",
            s.ratio >= RATIO_TARGET,
        )
        for s in summary_rows
    ]
    hot = micro.hot_read
    hot_verdict = Verdict(
        f"big thing, view cached: {hot.name}",
        f"mean {hot.mean_ms:.3f} ms, p99 {hot.p99_ms:.3f} ms",
        f"mean ≤ {FILTER_TARGET_MS:.0f} ms per read",
        hot.mean_ms <= FILTER_TARGET_MS,
    )
    if runs:
        lines += [
            "### GET /api/2/things/{id}: full access (A) vs restricted (B), one server, one run",
            "",
            f"`twinstore serve --workers 1` on a fresh database; {args.things:,} things per policy variant "
            "(attributes incl. `secret`, five features f1..f5 with 2-3 properties each, ~0.8 KiB JSON); "
            f"wrk {args.clients} connections, {args.get_threads} thread, random things, basic auth "
            f"(bcrypt, cached); {args.warmup:.0f} s warm-up as A and as B, then {args.rounds} rounds "
            f"(A then B, B then A, ...: a drift hits both alike), {args.duration:.0f} s each. "
            "A is granted READ/WRITE on `thing:/` (the filter returns the stored document as is); "
            "B has READ on `thing:/` with `thing:/features/f2` and "
            "`thing:/attributes/secret` revoked and `thing:/features/f2/properties/public` granted back "
            "(the filter rebuilds the document).",
            "",
            *(f"- {n}" for n in http_notes),
            "",
            markdown_table(RUN_HEADERS, [_run_row(r) for r in runs]),
            "",
            markdown_table(
                [
                    "policy",
                    "A req/s (mean)",
                    "B req/s (mean)",
                    "B / A",
                    "B / A per round",
                    "server CPU µs/req A → B",
                    "target (issue 3: enforcement ≤ 10 % of GET throughput)",
                ],
                [
                    [
                        s.variant,
                        f"{s.a_rate:,.0f}",
                        f"{s.b_rate:,.0f}",
                        f"{s.ratio:.3f}",
                        ", ".join(f"{x:.3f}" for x in s.per_round),
                        f"{s.a_us:.0f} → {s.b_us:.0f} ({(s.b_us / s.a_us - 1) * 100:+.1f} %)",
                        v.cell(),
                    ]
                    for s, v in zip(summary_rows, ratio_verdicts, strict=True)
                ],
            ),
            "",
        ]
    lines += [
        f"### Filtering a thing with {args.features:,} features under a {args.entries}-entry policy "
        "(in process)",
        "",
        *(f"- {f}" for f in micro.facts),
        f"- {args.reads:,} reads per hot row (one after the other, one core, `time.perf_counter` per "
        "read); cold rows: a fresh `Enforcer` each time",
        "",
        markdown_table(
            [*TIMING_HEADERS, "target (issue 3)"],
            [[*t.row(), hot_verdict.cell() if t is hot else ""] for t in micro.timings],
        ),
        "",
        summary(notes, [*ratio_verdicts, hot_verdict]),
    ]
    lines += ["", "### What limits the figures", ""]
    by = {t.name: t for t in micro.timings}
    small_b = by["small thing (part 1): view (hot) + filter, B"].mean_ms * 1e3
    small_a = by["small thing (part 1): view (hot) + filter, A"].mean_ms * 1e3
    sr = micro.service
    delta = sr.b_us - sr.a_us
    lines.append(
        f"- Enforcement itself, in process (`ThingService.retrieve` of the small thing + the "
        f"response's `orjson.dumps`, journal and policy store stubbed, {sr.reads:,} reads each, A and B "
        f"alternating in blocks): A {sr.a_us:.1f} µs, B {sr.b_us:.1f} µs per GET, so B pays "
        f"{delta:+.1f} µs: the filter rebuilds the document where A's fast path "
        "returns the stored one after the view lookup and one check at the root (filter alone, "
        f"measured separately: B {small_b:.1f} µs, A {small_a:.1f} µs), and the rebuilt dicts are "
        "encoded instead of the stored one. The rest of a request (HTTP, routing, the auth cache, "
        "the asyncpg read) is the same for A and B."
    )
    for s in summary_rows:
        predicted = s.a_us / (s.a_us + delta) if s.a_us else float("nan")
        lines.append(
            f"- GET, {s.variant} policy: the server is one CPU-bound Python process at {s.a_us:.0f} µs "
            f"of CPU per request for A; B's {delta:+.1f} µs of enforcement predict B / A ≈ "
            f"{predicted:.3f} on a quiet machine. Measured over HTTP, B used {s.b_us - s.a_us:+.0f} µs "
            f"({s.a_us:.0f} → {s.b_us:.0f} µs) and reached {s.ratio:.3f} of A's rate (per round: "
            f"{', '.join(f'{x:.3f}' for x in s.per_round)}): the spread between rounds and the "
            "`other` CPU column (other work on the shared machine, up to a whole core) are larger "
            "than the effect measured, so the HTTP ratio is limited by noise, not by enforcement."
        )
    cold_parse = statistics.median(by["cold: parse_policy"].samples) * 1e3
    cold_view = statistics.median(by["cold: first view of the caller's subjects"].samples) * 1e3
    filt = micro.filter_ms
    lines += [
        f"- Filtering the big thing: {filt.mean_ms:.3f} ms mean for the filter alone, "
        f"{micro.hot_read.mean_ms:.3f} ms with the view lookup (measured one after the other; "
        "their difference is machine noise, the lookup is "
        f"{by['Enforcer.view (hot), caller'].mean_ms * 1e3:.1f} µs: a `datetime.now`, a frozenset "
        "and an LRU move). The profile below is all `_filter`: the work grows with the trie nodes "
        "visited on the way (features with a decision inside are rebuilt key by key, the others are "
        "kept as the same object after two set lookups), not with the size of the values kept "
        "whole; p99 is about twice p50 from the garbage collector (the rebuilt dicts trigger "
        "collections that traverse the big thing; compare the row with the collector paused) and "
        "from other work on the machine.",
        f"- Cold cost, once per policy revision (`parse_policy`: {cold_parse:.1f} ms median for this "
        f"{args.entries}-entry policy) and once per subject set and revision (compiling the view: "
        f"{cold_view:.1f} ms median); both are cached by the server (`PolicyCache`, the enforcer's "
        "view LRU).",
        "- A's server CPU per GET here is well above the `api` section's (a bigger document, ~0.8 KiB "
        "instead of ~0.2 KiB, and a busier machine); a separate check (1,000 sequential GETs each as "
        "A and B, `pg_stat_database`) counted one PostgreSQL transaction per GET for both, so "
        "enforcement does not go to the database (the policy comes from `PolicyCache`).",
        "- The machine is shared (2 cores, wrk + server + PostgreSQL): compare A and B within a "
        "round; the `other` CPU column shows foreign load during each run.",
        "",
        "cProfile of 200 hot reads of the big thing (view lookup + filter), by own time:",
        "",
        "```",
        micro.profile,
        "```",
    ]
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the cost of policy enforcement (GET as a full-access vs a restricted "
        "subject with wrk; filtering a 1,000-feature thing in process), print tables and write the "
        "section 'policies' of BENCHMARKS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per user and variant")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per variant: A B, B A, A B, ...")
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--get-threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--things", type=int, default=2_000, help="things per policy variant")
    parser.add_argument(
        "--variants", default="shared,per-thing", help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--features", type=int, default=1_000, help="features of the in-process thing")
    parser.add_argument("--entries", type=int, default=100, help="entries of the in-process policy")
    parser.add_argument("--reads", type=int, default=2_000, help="timed reads per in-process row")
    parser.add_argument("--skip-http", action="store_true", help="only the in-process benchmark")
    parser.add_argument(
        "--database-url", default=default_database_url(), help="admin database; a fresh one is created"
    )
    parser.add_argument("--nats-url", default=default_nats_url(), help="NATS with JetStream")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each run, wait up to this many seconds for the machine to be idle (shared machines)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="results file")
    parser.add_argument("--no-output", action="store_true", help="only print, do not write --output")
    parser.add_argument("--keep-databases", action="store_true", help="do not drop the database")
    args = parser.parse_args(argv)
    args.variant_names = [v.strip() for v in str(args.variants).split(",") if v.strip()]
    unknown = [v for v in args.variant_names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    if args.features < ZONES * 10:
        parser.error(f"--features must be at least {ZONES * 10}")
    return args


async def main_async(args: argparse.Namespace) -> int:
    if not args.skip_http and shutil.which("wrk") is None:
        print("bench/policy_cost.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    notes = await machine_notes(args.database_url)
    print("\n".join(notes))
    print("\n== in process: filtering a big thing", flush=True)
    micro = await run_micro(args)
    print("\n".join(micro.facts))
    print(markdown_table(TIMING_HEADERS, [t.row() for t in micro.timings]), flush=True)
    runs: list[Run] = []
    http_notes: list[str] = []
    if not args.skip_http:
        tmp = Path(tempfile.mkdtemp(prefix="twinstore-bench-policies-"))
        name, url = await create_database(args.database_url, "twinstore_bench_policies")
        try:
            runs, http_notes = await run_http(args, url, tmp)
        finally:
            if not args.keep_databases:
                await drop_database(args.database_url, name)
    text = report(args, notes, runs, http_notes, micro)
    print("\n" + text)
    if not args.no_output:
        write_section(args.output, "policies", text)
        print(f"wrote {args.output}")
    return 0


def main() -> None:
    sys.exit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
