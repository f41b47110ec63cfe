"""Anomaly detection through the live pipeline (issue 7's figures).

    .venv/bin/python bench/anomaly_live.py [--dataset ../shared/datasets/skab] [--help]

One run on a fresh database and NATS prefix, with real processes: ``twinstore serve
--no-ingest --no-anomaly`` (HTTP API, WebSocket, relay), one ``twinstore ingest`` and one
``twinstore anomaly``. Every update goes the whole way: a telemetry row published to JetStream,
applied by the ingest worker (a journal event), relayed to the events stream, scored by the
anomaly worker, and an anomaly arrives as a Ditto live message (outbox, subject ``anomaly``)
on a WebSocket (``START-SEND-MESSAGES``) and on NATS ``<prefix>.anomalies.>``.

* **SKAB through the pipeline.** One thing per SKAB file (34 pumps), feature ``pump`` with a
  detector of the default algorithm on the eight signals; every row one telemetry row (a merge
  of the eight values, one event), the 34 files streamed side by side. Predictions are the
  anomaly messages received over the WebSocket (revision r is row r - 2); precision, recall and
  F1 as SKAB's leaderboard scores them (point-wise, counts summed over all rows of all files,
  first 400 rows the warm-up). Baseline in the same run: the same detector fed the same rows in
  this process (``twinstore.anomaly.skab.run_file``); the predictions must be identical.
* **Scoring rate.** ``--things`` features (default detector) get ``--updates`` updates each
  while the anomaly process is stopped (SIGSTOP: the backlog waits on the events stream); after
  SIGCONT its CPU seconds until every update is scored give updates per CPU-second (one core).
  Baseline: the detector alone on the same rows in this process.
* **Latency.** ``--rate`` updates/s for ``--seconds`` s over those features, some of them
  pushed into an anomalous regime for a stretch; per anomaly message the time from its event's
  journal timestamp (decided, just before the commit) to its arrival on the WebSocket and NATS.
* **Memory.** ``--memory-features`` more watched features, ``--memory-updates`` updates each;
  resident memory of the anomaly process before and after (all detectors live in it).

Writes the section ``anomaly-live`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import orjson
import psutil
from api import Server
from benchlib import (
    ROOT,
    Verdict,
    add_run_arguments,
    markdown_table,
    percentile,
    run_on_fresh_database,
    wait_quiet,
)
from benchlib import (
    latency_cells as stats,
)

from twinstore.anomaly import create, step
from twinstore.anomaly.skab import Confusion, SkabFile, load_skab, run_file
from twinstore.auth import write_users_file
from twinstore.bus.ingest import IngestSubjects, Update, initial_seq, telemetry_messages
from twinstore.bus.relay import CURSOR as RELAY_CURSOR

SOURCE = "bench-plc"
SUBJECT = "integration:bench-plc"
USER = ("bench", "bench")
OWNER = "nginx:bench"
FEATURE = "pump"
PATH = f"/features/{FEATURE}/properties"
PARTITIONS = 16
SIGNALS = [f"s{i}" for i in range(8)]  # the synthetic pumps' signals


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "skab")
    p.add_argument("--things", type=int, default=250, help="features of the rate and latency phases")
    p.add_argument("--updates", type=int, default=800, help="updates per feature in the rate phase")
    p.add_argument("--rate", type=int, default=1000, help="updates/s in the latency phase")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the latency phase")
    p.add_argument("--memory-features", type=int, default=10_000)
    p.add_argument("--memory-updates", type=int, default=40, help="updates per feature in the memory phase")
    p.add_argument("--worker-log-level", default="warning", help="log level of the worker processes")
    p.add_argument("--quiet-wait", type=float, default=10.0, help="wait up to s for an idle machine first")
    return p.parse_args()


def policy() -> dict[str, Any]:
    return {
        "entries": {
            "owner": {
                "subjects": {OWNER: {"type": "bench"}},
                "resources": {
                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "message:/": {"grant": ["READ", "WRITE"], "revoke": []},
                },
            },
            "plc": {
                "subjects": {SUBJECT: {"type": "ingest source"}},
                "resources": {f"thing:/features/{FEATURE}": {"grant": ["READ", "WRITE"], "revoke": []}},
            },
        }
    }


async def create_things(url: str, ids: list[str], detector: dict[str, Any], concurrency: int = 16) -> None:
    """PUT each thing (with its own policy and an empty feature) and its feature's detector."""
    queue = iter(ids)

    async def worker(client: httpx.AsyncClient) -> None:
        for thing_id in queue:
            body = {"_policy": policy(), "features": {FEATURE: {"properties": {}}}}
            r = await client.put(f"/api/2/things/{thing_id}", json=body)
            if r.status_code not in (201, 204):
                raise RuntimeError(f"creating {thing_id}: {r.status_code} {r.text}")
            r = await client.put(
                f"/api/2/things/{thing_id}/features/{FEATURE}/anomaly/detector", json=detector
            )
            if r.status_code not in (201, 204):
                raise RuntimeError(f"detector of {thing_id}: {r.status_code} {r.text}")

    async with httpx.AsyncClient(base_url=url, auth=USER, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


class Receiver:
    """Anomaly messages on a WebSocket (Ditto Protocol) and on NATS, with arrival times."""

    def __init__(self) -> None:
        self.ws: dict[tuple[str, int], float] = {}
        self.nats: dict[tuple[str, int], float] = {}
        self.events: dict[tuple[str, int], float] = {}  # relayed events (latency phase only)
        self.ws_duplicates = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, server: Server, nc: Any) -> None:
        from websockets.asyncio.client import connect

        auth = httpx.BasicAuth(*USER)._auth_header
        sock = await connect(
            server.url.replace("http://", "ws://") + "/ws/2",
            additional_headers={"Authorization": auth},
            max_queue=None,
            ping_interval=None,
        )
        await sock.send("START-SEND-MESSAGES")
        ack = await asyncio.wait_for(sock.recv(), 30)
        if ack != "START-SEND-MESSAGES:ACK":
            raise RuntimeError(f"no ACK: {ack!r}")

        async def read() -> None:
            async for text in sock:
                now = time.time()
                envelope = orjson.loads(text)
                if not str(envelope.get("topic", "")).endswith("/things/live/messages/anomaly"):
                    continue
                value = envelope["value"]
                key = (value["thingId"], int(value["revision"]))
                if key in self.ws:
                    self.ws_duplicates += 1
                self.ws.setdefault(key, now)

        async def on_nats(msg: Any) -> None:
            value = orjson.loads(msg.data)
            self.nats.setdefault((value["thingId"], int(value["revision"])), time.time())

        self._sock = sock
        self._tasks.append(asyncio.create_task(read()))
        await nc.subscribe(f"{server.prefix}.anomalies.>", cb=on_nats)
        self._nc, self._prefix = nc, server.prefix

    async def watch_events(self) -> Any:
        """Arrival times of relayed events on NATS (to split the latency); unsubscribe when done."""

        async def on_event(msg: Any) -> None:
            thing = (msg.headers or {}).get("Ditto-Thing-Id", "")
            self.events[(thing, int(orjson.loads(msg.data)["revision"]))] = time.time()

        return await self._nc.subscribe(f"{self._prefix}.events.>", cb=on_event)

    async def stop(self) -> None:
        await self._sock.close()
        for task in self._tasks:
            task.cancel()


class Publisher:
    """Telemetry rows to JetStream as an adapter sends them (one source, rising sequence)."""

    def __init__(self, nc: Any, prefix: str) -> None:
        self.js = nc.jetstream()
        self.subjects = IngestSubjects(prefix, PARTITIONS)
        self.seq = initial_seq()

    async def send(self, rows: list[Update]) -> None:
        msgs = telemetry_messages(self.subjects, SOURCE, self.seq, rows)
        self.seq += len(msgs)
        await asyncio.gather(*(self.js.publish(m.subject, m.payload, headers=m.headers) for m in msgs))

    async def send_all(self, rows: list[Update], per_message: int = 200, window: int = 32) -> None:
        pending: list[Any] = []
        for start in range(0, len(rows), per_message):
            pending.append(self.send(rows[start : start + per_message]))
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)


async def wait_scored(database_url: str, final: dict[str, int], timeout: float) -> float:
    """Until every thing's detector has checkpointed its final revision; when that was seen."""
    con = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        ids = list(final)
        while True:
            rows = await con.fetch(
                f"SELECT thing_id, revision FROM anomaly_state WHERE thing_id = any($1::text[]) "
                f"AND feature_id = '{FEATURE}'",
                ids,
            )
            done = sum(1 for r in rows if r["revision"] >= final[r["thing_id"]])
            if done == len(final):
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{done} of {len(final)} features fully scored after {timeout} s")
            await asyncio.sleep(0.1)
    finally:
        await con.close()


def skab_thing(file: SkabFile) -> str:
    return "bench.skab:" + file.name.replace("/", "-").removesuffix(".csv")


async def skab_phase(
    args: argparse.Namespace, server: Server, database_url: str, pub: Publisher, rx: Receiver
) -> dict[str, Any]:
    files = load_skab(args.dataset)
    ids = {f.name: skab_thing(f) for f in files}
    # the signals named: their order is SKAB's, as offline (a jsonb document sorts its keys)
    detector = {"algorithm": "mahalanobis", "properties": list(files[0].rows[0])}
    await create_things(server.url, list(ids.values()), detector)
    await asyncio.sleep(1.5)  # the scorer sees the new detectors (it re-reads them every 0.25 s)
    rows: list[Update] = []
    for index in range(max(len(f.rows) for f in files)):
        for f in files:  # the pumps side by side, each in its own order
            if index < len(f.rows):
                rows.append(Update(ids[f.name], PATH, f.rows[index]))
    started = time.monotonic()
    await pub.send_all(rows)
    # thing created at revision 1, row i is revision i + 2
    await wait_scored(database_url, {ids[f.name]: len(f.rows) + 1 for f in files}, 600)
    seconds = time.monotonic() - started
    await asyncio.sleep(2)  # the last messages on their way
    live_ws, live_nats, offline = Confusion(), Confusion(), Confusion()
    identical = 0
    for f in files:
        thing = ids[f.name]
        _, baseline = run_file(create("mahalanobis"), f)  # the rows in SKAB's column order
        ws = [(thing, i + 2) in rx.ws for i in range(len(f.rows))]
        bus = [(thing, i + 2) in rx.nats for i in range(len(f.rows))]
        identical += ws == baseline
        for label, a, b, c in zip(f.labels, ws, bus, baseline, strict=True):
            live_ws.add(label, a)
            live_nats.add(label, b)
            offline.add(label, c)
    return {
        "files": len(files),
        "rows": len(rows),
        "seconds": seconds,
        "ws": live_ws,
        "nats": live_nats,
        "offline": offline,
        "identical": identical,
        "duplicates": rx.ws_duplicates,
    }


class Pumps:
    """Synthetic pumps: eight correlated signals, and an anomalous regime on demand."""

    def __init__(self, ids: list[str], seed: int = 7) -> None:
        self.ids = ids
        self.rng = random.Random(seed)
        self.t = dict.fromkeys(ids, 0)
        self.faulty: dict[str, int] = {}  # thing -> anomalous updates left

    def sample(self, thing: str) -> dict[str, float]:
        self.t[thing] += 1
        base = self.rng.gauss(0.0, 1.0)
        row = {
            name: 10.0 * (i + 1) + base * (i + 1) * 0.5 + self.rng.gauss(0.0, 0.3)
            for i, name in enumerate(SIGNALS)
        }
        left = self.faulty.get(thing, 0)
        if left:
            row["s0"] += 12.0  # vibration up while the others do not follow
            row["s3"] -= 8.0
            self.faulty[thing] = left - 1
        return row

    def rows(self, per_thing: int) -> list[Update]:
        return [Update(t, PATH, self.sample(t)) for _ in range(per_thing) for t in self.ids]


def detector_rate(rows: list[dict[str, float]], per_detector: int) -> float:
    """Updates per CPU-second of the default detector alone, fed the same kind of rows."""
    detectors = [create("mahalanobis") for _ in range(len(rows) // per_detector)]
    started = time.process_time()
    for i, row in enumerate(rows[: len(detectors) * per_detector]):
        step(detectors[i % len(detectors)], row)
    return len(detectors) * per_detector / (time.process_time() - started)


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def rate_phase(
    args: argparse.Namespace,
    server: Server,
    database_url: str,
    pub: Publisher,
    scorer: subprocess.Popen[bytes],
) -> tuple[dict[str, Any], Pumps]:
    ids = [f"bench.anomaly:pump-{i:05d}" for i in range(args.things)]
    await create_things(server.url, ids, {"algorithm": "mahalanobis"})
    await asyncio.sleep(1.5)
    pumps = Pumps(ids)
    rows = pumps.rows(args.updates)
    proc = psutil.Process(scorer.pid)
    os.kill(scorer.pid, signal.SIGSTOP)  # the backlog builds up on the events stream
    try:
        await pub.send_all(rows)
        con = await asyncpg.connect(database_url)
        try:  # every update committed and relayed before the scorer goes on
            total = len(rows) + len(ids)
            while (
                await con.fetchval(
                    "SELECT count(*) FROM journal j JOIN relay_cursors c ON c.name = $1 "
                    "AND c.partition = j.partition AND j.seq <= c.seq "
                    "WHERE j.entity = 'thing' AND j.id LIKE 'bench.anomaly:%'",
                    RELAY_CURSOR,
                )
                < total
            ):
                await asyncio.sleep(0.2)
        finally:
            await con.close()
        wait_quiet(args.quiet_wait)
    finally:
        cpu0 = cpu_seconds(proc)
        started = time.monotonic()
        os.kill(scorer.pid, signal.SIGCONT)
    end = await wait_scored(database_url, dict.fromkeys(ids, args.updates + 1), 900)
    cpu = cpu_seconds(proc) - cpu0
    alone = detector_rate(
        [u.value for u in Pumps(ids, seed=8).rows(min(args.updates, 800))], min(args.updates, 800)
    )
    n = len(rows)
    return {"updates": n, "cpu": cpu, "seconds": end - started, "rate_cpu": n / cpu, "alone": alone}, pumps


async def latency_phase(
    args: argparse.Namespace, database_url: str, pub: Publisher, rx: Receiver, pumps: Pumps
) -> dict[str, Any]:
    before_ws, before_nats = set(rx.ws), set(rx.nats)
    events = await rx.watch_events()
    total = int(args.rate * args.seconds)
    tick = 0.02
    per_tick = max(1, round(args.rate * tick))
    sent = 0
    started = time.monotonic()
    next_at = started
    turn = 0
    while sent < total:
        if int((time.monotonic() - started) / 0.5) >= len(pumps.faulty) + 1:
            # every half second another pump goes anomalous for 12 updates
            pumps.faulty[pumps.ids[len(pumps.faulty) * 7 % len(pumps.ids)]] = 12
        rows = []
        for _ in range(min(per_tick, total - sent)):
            thing = pumps.ids[turn % len(pumps.ids)]
            turn += 1
            rows.append(Update(thing, PATH, pumps.sample(thing)))
        await pub.send(rows)
        sent += len(rows)
        next_at += tick
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    achieved = total / (time.monotonic() - started)
    await asyncio.sleep(3)
    await events.unsubscribe()
    new_ws = {k: v for k, v in rx.ws.items() if k not in before_ws}
    new_nats = {k: v for k, v in rx.nats.items() if k not in before_nats}
    con = await asyncpg.connect(database_url)
    try:
        keys = list(new_ws.keys() | new_nats.keys())
        rows_ts = await con.fetch(
            "SELECT id, revision, ts FROM journal j JOIN unnest($1::text[], $2::bigint[]) AS k(id, revision) "
            "USING (id, revision) WHERE j.entity = 'thing'",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
    finally:
        await con.close()
    ts = {(r["id"], r["revision"]): r["ts"].timestamp() for r in rows_ts}
    ws_ms = sorted((t - ts[k]) * 1000 for k, t in new_ws.items() if k in ts)
    nats_ms = sorted((t - ts[k]) * 1000 for k, t in new_nats.items() if k in ts)
    relayed_ms = sorted((rx.events[k] - ts[k]) * 1000 for k in new_ws if k in ts and k in rx.events)
    scored_ms = sorted((t - rx.events[k]) * 1000 for k, t in new_ws.items() if k in rx.events)
    return {
        "updates": total,
        "rate": achieved,
        "ws": ws_ms,
        "nats": nats_ms,
        "relayed": relayed_ms,
        "scored": scored_ms,
        "faulty": len(pumps.faulty),
    }


async def memory_phase(
    args: argparse.Namespace,
    server: Server,
    database_url: str,
    pub: Publisher,
    scorer: subprocess.Popen[bytes],
) -> dict[str, Any]:
    proc = psutil.Process(scorer.pid)
    rss0 = proc.memory_info().rss
    con = await asyncpg.connect(database_url)
    try:
        watched0 = int(await con.fetchval("SELECT count(*) FROM anomaly_detectors"))
    finally:
        await con.close()
    ids = [f"bench.memory:pump-{i:05d}" for i in range(args.memory_features)]
    started = time.monotonic()
    await create_things(server.url, ids, {"algorithm": "mahalanobis"}, concurrency=32)
    created = time.monotonic() - started
    await asyncio.sleep(1.5)
    pumps = Pumps(ids, seed=9)
    for _ in range(args.memory_updates):
        await pub.send_all(pumps.rows(1))
    await wait_scored(database_url, dict.fromkeys(ids, args.memory_updates + 1), 900)
    await asyncio.sleep(2)
    rss1 = proc.memory_info().rss
    return {
        "features": len(ids),
        "watched_before": watched0,
        "rss0": rss0,
        "rss1": rss1,
        "per_feature": (rss1 - rss0) / len(ids),
        "create_seconds": created,
    }


def confusion_row(label: str, c: Confusion) -> list[str]:
    return [label, f"{c.f1:.3f}", f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.far:.2f}", f"{c.mar:.2f}"]


async def run(database_url: str, tmp: Path) -> tuple[list[str], str, list[Verdict]]:
    args = ARGS
    users = tmp / "users"
    write_users_file(users, {"bench": "bench"})
    server = Server(database_url, args.nats_url, users, 1, tmp / "server.log")
    server.env.update(
        TWINSTORE_INGEST_SOURCES=orjson.dumps({SOURCE: [SUBJECT]}).decode(),
        TWINSTORE_PARTITIONS=str(PARTITIONS),
        TWINSTORE_INGEST_ENABLED="false",
        TWINSTORE_ANOMALY_ENABLED="false",
    )
    wait_quiet(args.quiet_wait)
    server.start()
    workers: list[subprocess.Popen[bytes]] = []
    print(f"logs in {tmp}")
    nc = await nats.connect(args.nats_url)
    rx = Receiver()
    try:
        for role in ("ingest", "anomaly"):
            with (tmp / f"{role}.log").open("ab") as out:
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "twinstore.cli", role],
                        env={**server.env, "TWINSTORE_LOG_LEVEL": args.worker_log_level},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )
        scorer = workers[1]
        assert server.proc is not None
        print(f"pids: serve {server.proc.pid} ingest {workers[0].pid} anomaly {scorer.pid}", flush=True)
        await asyncio.sleep(4)  # the workers claim their partitions
        await rx.start(server, nc)
        pub = Publisher(nc, server.prefix)
        skab = await skab_phase(args, server, database_url, pub, rx)
        print(
            f"SKAB live: F1 {skab['ws'].f1:.3f} (offline {skab['offline'].f1:.3f}), "
            f"{skab['identical']}/{skab['files']} identical"
        )
        rate, pumps = await rate_phase(args, server, database_url, pub, scorer)
        print(
            f"scoring: {rate['rate_cpu']:,.0f} updates per CPU-second "
            f"({rate['updates']:,} in {rate['seconds']:.1f} s)"
        )
        wait_quiet(args.quiet_wait)
        lat = await latency_phase(args, database_url, pub, rx, pumps)
        print(f"latency: ws {stats(lat['ws'])}, nats {stats(lat['nats'])}, relayed {stats(lat['relayed'])}")
        mem = await memory_phase(args, server, database_url, pub, scorer)
        print(
            f"memory: {mem['rss0'] / 2**20:.0f} -> {mem['rss1'] / 2**20:.0f} MiB "
            f"for {mem['features']:,} more features"
        )
    finally:
        await rx.stop() if rx._tasks else None
        await nc.close()
        for proc in workers:
            proc.terminate()
            proc.wait(60)
        server.stop()
        await server.delete_stream()
    per_kib = mem["per_feature"] / 1024
    fit = 2**30 / mem["per_feature"] if mem["per_feature"] > 0 else float("inf")
    ws_p99 = percentile(lat["ws"], 0.99) if lat["ws"] else float("inf")
    facts = [
        "processes: `twinstore serve --no-ingest --no-anomaly`, one `twinstore ingest`, one "
        f"`twinstore anomaly` ({PARTITIONS} partitions); this script "
        "publishes telemetry to JetStream "
        "and receives anomalies on a WebSocket (START-SEND-MESSAGES) and NATS; everything shares 2 cores",
        f"SKAB: {skab['files']} files, {skab['rows']:,} rows through the pipeline in "
        f"{skab['seconds']:.1f} s; "
        f"predictions identical to the detector fed offline in {skab['identical']} of {skab['files']} files; "
        f"duplicate WebSocket messages: {skab['duplicates']}",
    ]
    f1 = Verdict(
        "SKAB outlier F1 through the pipeline (WebSocket)", f"F1 {skab['ws'].f1:.3f}", "F1 ≥ 0.80",
        skab["ws"].f1 >= 0.8,
    )  # fmt: skip
    scoring = Verdict(
        "scoring by `twinstore anomaly`",
        f"{rate['rate_cpu']:,.0f} updates per CPU-second",
        "≥ 10,000/s per core",
        rate["rate_cpu"] >= 10_000,
    )
    ws_cells = stats(lat["ws"])
    delay = Verdict(
        "journal ts -> anomaly message on the WebSocket",
        f"p99 {ws_cells[1]} ms",
        "p99 ≤ 100 ms",
        ws_p99 <= 100,
    )
    memory = Verdict(
        "memory of the anomaly process",
        f"{per_kib:.1f} KiB per feature, {fit:,.0f} features per GiB",
        "10,000 features in 1 GiB",
        mem["rss1"] <= 2**30,
    )
    table1 = markdown_table(
        ["SKAB, default detector", "F1", "precision", "recall", "FAR %", "MAR %", "target (issue 7)"],
        [
            [*confusion_row("live: anomaly messages on the WebSocket", skab["ws"]), f1.cell()],
            [*confusion_row("live: anomaly messages on NATS", skab["nats"]), ""],
            [*confusion_row("baseline: the same detector offline, same run", skab["offline"]), ""],
        ],
    )
    table2 = markdown_table(
        ["scoring", "updates", "CPU s", "wall s", "updates per CPU-second", "target (issue 7)"],
        [
            [
                f"`twinstore anomaly` draining a backlog ({args.things} features x {args.updates})",
                f"{rate['updates']:,}",
                f"{rate['cpu']:.1f}",
                f"{rate['seconds']:.1f}",
                f"{rate['rate_cpu']:,.0f}",
                scoring.cell(),
            ],
            [
                "baseline: the detector alone (score, classify, learn), this process",
                "-",
                "-",
                "-",
                f"{rate['alone']:,.0f}",
                "",
            ],
        ],
    )
    table3 = markdown_table(
        [
            f"journal ts -> anomaly message at {lat['rate']:,.0f} updates/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "messages",
            "target (issue 7)",
        ],
        [
            ["WebSocket (Ditto live message)", *ws_cells, delay.cell()],
            ["NATS anomalies subject", *stats(lat["nats"]), ""],
            ["part: journal ts -> event relayed on NATS", *stats(lat["relayed"]), ""],
            ["part: event relayed -> anomaly on the WebSocket", *stats(lat["scored"]), ""],
        ],
    )
    table4 = markdown_table(
        [
            "memory of the anomaly process",
            "watched features added",
            "RSS MiB before",
            "RSS MiB after",
            "KiB per feature",
            "features per GiB",
            "target (issue 7)",
        ],
        [
            [
                f"after {args.memory_updates} updates each",
                f"{mem['features']:,}",
                f"{mem['rss0'] / 2**20:,.0f}",
                f"{mem['rss1'] / 2**20:,.0f}",
                f"{per_kib:.1f}",
                f"{fit:,.0f}",
                memory.cell(),
            ]
        ],
    )
    body = "\n".join(
        [
            table1,
            "",
            table2,
            "",
            table3,
            "",
            table4,
            "",
            f"- scoring: the detector alone {rate['alone']:,.0f}/s, the rest is NATS, decoding, folding "
            "state and checkpoints",
            f"- latency: {lat['faulty']} pumps pushed anomalous for 12 updates each",
            f"- memory: {mem['watched_before']:,} features watched before",
        ]
    )
    return facts, body, [f1, scoring, delay, memory]


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    ARGS = parse_args()
    return asyncio.run(
        run_on_fresh_database(
            ARGS,
            name="anomaly-live",
            title="Anomaly detection through the pipeline (issue 7, bench/anomaly_live.py)",
            run=run,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
