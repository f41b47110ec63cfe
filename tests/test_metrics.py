"""``/metrics``, ``/health``, ``/ready`` (API and worker listener) and the Grafana dashboard.

One load over a real socket (uvicorn in this process, the session runtime with its ingest and
anomaly workers): HTTP writes and reads, a WebSocket session, an SSE stream, NATS ingestion, a
watched feature, a slow subscriber; every series the README lists moves or is there. The
dashboard's PromQL may name only what a scrape shows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.api.test_ws import serving
from tests.conftest import ROOT, bounded, new_thing_id
from tests.test_ingest import Source
from twinstore.api.app import create_app
from twinstore.bus.ingest import Update
from twinstore.runtime import Runtime
from twinstore.settings import Settings

AUTH = ("ditto", "ditto")
BASIC = {"authorization": "Basic " + base64.b64encode(b"ditto:ditto").decode()}
DASHBOARD = ROOT / "deploy" / "grafana" / "twinstore.json"
DETECTOR = {"algorithm": "mahalanobis", "parameters": {"warmup": 5, "k": 1}, "properties": ["t"]}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """(family name -> type, (sample name, labels text) -> value) of a text exposition."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, line
            samples[(m[1], m[2] or "")] = float(m[3])
    return types, samples


def exposed_names(types: dict[str, str]) -> set[str]:
    """Every series name a query may use, from the families (also those without samples yet)."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count")}  # a counter's family name ends in _total
    names: set[str] = set()
    for family, kind in types.items():
        names.add(family)
        names.update(family + s for s in suffixes.get(kind, ()))
    return names


def total(samples: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for (n, lab), v in samples.items() if n == name and all(w in lab for w in wanted))


async def scrape(http: httpx.AsyncClient) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_metrics_move_under_load(settings: Settings, runtime: Runtime) -> None:
    async with (
        serving(settings, runtime) as ws_base,
        httpx.AsyncClient(base_url=ws_base.replace("ws://", "http://"), auth=AUTH, timeout=10) as http,
    ):
        _, before = await scrape(http)
        thing_id = new_thing_id("org.metrics")
        body = {"features": {"f": {"properties": {"t": 20.0}}, "flow": {"properties": {}}}}
        assert (await http.put(f"/api/2/things/{thing_id}", json=body)).status_code == 201
        r = await http.put(f"/api/2/things/{thing_id}/features/f/anomaly/detector", json=DETECTOR)
        assert r.status_code == 201, r.text
        for i in range(12):
            r = await http.put(f"/api/2/things/{thing_id}/features/f/properties/t", json=20.0 + (i % 3) * 0.1)
            assert r.status_code == 204
        assert (await http.get(f"/api/2/things/{thing_id}")).status_code == 200
        assert (await http.get("/no/such/route")).status_code == 404

        # NATS ingestion: a telemetry batch for the same thing
        await Source(runtime, "ditto-user").values(
            [Update(thing_id, "/features/flow/properties/value", float(i)) for i in range(3)]
        )

        # a live subscriber that reads nothing is dropped as too slow
        assert runtime.fanout is not None
        slow = runtime.fanout.subscribe(("nginx:ditto",), thing_ids=frozenset([thing_id]), maxsize=1)
        await runtime.fanout.listening()
        for i in range(3):
            await http.put(f"/api/2/things/{thing_id}/attributes/n", json=i)

        # an SSE stream and a WebSocket session, open while scraping
        async with (
            http.stream(
                "GET", "/api/2/things", params={"ids": thing_id}, headers={"accept": "text/event-stream"}
            ),
            connect(ws_base + "/ws/2", additional_headers=BASIC) as ws,
        ):
            await ws.send("START-SEND-EVENTS")
            assert await asyncio.wait_for(ws.recv(), 10) == "START-SEND-EVENTS:ACK"

            async def moved() -> bool:
                _, now = await scrape(http)
                return (
                    total(now, "twinstore_ingest_events_applied_total")
                    >= total(before, "twinstore_ingest_events_applied_total") + 3
                    and total(now, "twinstore_anomaly_scored_total")
                    >= total(before, "twinstore_anomaly_scored_total") + 10
                    and total(now, "twinstore_slow_consumers_dropped_total", kind="events")
                    > total(before, "twinstore_slow_consumers_dropped_total", kind="events")
                )

            await until(moved)
            types, after = await scrape(http)
            assert total(after, "twinstore_websocket_sessions") >= 1
            assert total(after, "twinstore_sse_sessions") >= 1
        slow.close()

    def grew(name: str, by: float = 1, **labels: str) -> None:
        assert total(after, name, **labels) >= total(before, name, **labels) + by, name

    grew("twinstore_http_requests_total", 12, method="PUT", status="204")
    grew("twinstore_http_requests_total", method="GET", route="/api/2/things/{thingId}", status="200")
    grew("twinstore_http_requests_total", method="GET", route="other", status="404")
    grew("twinstore_http_request_duration_seconds_count", 12, method="PUT")
    grew("twinstore_http_request_duration_seconds_bucket", 12, method="PUT", le="+Inf")
    grew("twinstore_journal_events_appended_total", 16)
    grew("twinstore_journal_commits_total")
    grew("twinstore_journal_commit_batch_size_count")
    grew("twinstore_journal_commit_duration_seconds_count")
    grew("twinstore_ingest_messages_total")
    grew("twinstore_ingest_batches_total")
    grew("twinstore_anomaly_score_count", 10)
    assert total(after, "twinstore_anomaly_watched_features") >= 1
    assert total(after, "twinstore_anomaly_partitions_owned") >= 1
    assert total(after, "twinstore_ingest_partitions_owned") >= 1
    lagging = {lab for (n, lab) in after if n == "twinstore_ingest_lag_messages"}
    assert lagging, "the lag of the partitions this process owns"
    assert lagging <= {f'{{partition="{p}"}}' for p in range(settings.partitions)}
    assert (
        total(after, "twinstore_db_pool_connections", state="idle")
        + total(after, "twinstore_db_pool_connections", state="in_use")
        >= 1
    )
    assert total(after, "twinstore_db_pool_max_connections") == settings.pool_size
    assert total(after, "twinstore_info") == 1
    assert total(after, "process_resident_memory_bytes") > 0
    for family in (
        "twinstore_ingest_redeliveries_total",
        "twinstore_anomaly_lag_messages",
        "twinstore_anomaly_messages_total",
    ):
        assert family in types, family


async def test_health_and_ready_are_in_the_openapi_without_auth(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path, auth=None)).status_code == 200, path
    paths = (await client.get("/api/2/openapi/openapi.json")).json()["paths"]
    for path in ("/health", "/ready", "/metrics"):
        assert paths[path]["get"]["tags"] == ["Operations"]


async def test_ready_is_503_on_a_dead_database_port(settings: Settings, runtime: Runtime) -> None:
    dead = Runtime(settings)
    dead.nc = runtime.nc
    # a pool that connects lazily, to a port nothing listens on
    dead.pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/test", min_size=0, max_size=1)
    app = create_app(settings, dead)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/ready")
        assert r.status_code == 503
        assert r.json()["status"] == "DOWN" and r.json()["children"]["database"]["status"] == "DOWN"
        assert (await c.get("/health")).json() == {"status": "UP"}
        assert (await c.get("/metrics")).status_code == 200  # metrics of what is there
    await dead.pool.close()


async def test_worker_listener_serves_metrics_health_ready(settings: Settings, runtime: Runtime) -> None:
    worker = Runtime(msgspec.structs.replace(settings, metrics_port=0))
    await worker.open(pool=runtime.pool, nc=runtime.nc, ingest=False, anomaly=False, clients=False)
    try:
        assert worker.listener is not None
        base = f"http://127.0.0.1:{worker.listener.port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            r = await http.get("/health")
            assert (r.status_code, r.json()) == (200, {"status": "UP"})
            r = await http.get("/ready")
            assert r.status_code == 200 and r.json()["children"]["nats"]["status"] == "UP"
            types, samples = await scrape(http)
            assert "twinstore_journal_events_appended_total" in types
            assert total(samples, "twinstore_db_pool_max_connections") == settings.pool_size
            assert (await http.get("/nope")).status_code == 404
            assert (await http.post("/metrics")).status_code == 405
            assert (await http.head("/health")).status_code == 200
            worker.nc = None  # NATS away: not ready, still alive
            assert (await http.get("/ready")).status_code == 503
            assert (await http.get("/health")).status_code == 200
            worker.nc = runtime.nc
            worker.draining = True  # SIGTERM: not ready any more, whatever the servers say
            r = await http.get("/ready")
            assert r.status_code == 503 and r.json()["children"]["process"]["status"] == "DOWN"
            assert r.json()["children"]["database"]["status"] == "UP"
    finally:
        await bounded(worker.close(), 30, "closing the worker")
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health", timeout=2)


async def test_dashboard_queries_only_exposed_metrics(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    types, _ = parse(r.text)
    exposed = exposed_names(types)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(_exprs(dashboard))
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        used.update(re.findall(r"\b((?:twinstore|process|python)_[a-zA-Z0-9_]+)", expr))
    assert used, exprs
    assert used <= exposed, sorted(used - exposed)
    # every twinstore family is on the dashboard or at least documented in the README
    readme = (ROOT / "README.md").read_text()
    families = {t.removesuffix("_total") for t in types if t.startswith("twinstore_")}
    undocumented = {f for f in families if f not in readme}
    assert not undocumented, sorted(undocumented)


def _exprs(node: Any) -> Any:
    """Every PromQL expression of the dashboard (panel targets and variable queries)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == "expr" and isinstance(value, str)) or (
                key == "query" and isinstance(value, str) and "(" in value
            ):
                yield value
            elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                yield value["query"]
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert any(i["name"] == "DS_PROMETHEUS" for i in dashboard["__inputs"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert orjson.loads(orjson.dumps(dashboard)) == dashboard


def test_readme_operations_section() -> None:
    text = Path(ROOT / "README.md").read_text()
    assert "### Metrics and health" in text and "metrics_port" in text
