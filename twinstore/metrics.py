"""What ``/metrics`` shows: one Prometheus registry per :class:`~twinstore.runtime.Runtime`.

Almost everything is read at scrape time from counters the parts keep anyway (the journal's
batches and histograms, the ingest and anomaly workers' stats, the fan-out's drops, the pool's
sizes), by a custom collector: no cost in the hot paths beyond what they already counted. What
only a scrape can ask for is fetched by :meth:`Metrics.refresh` just before rendering: the
JetStream consumers' pending messages of the partitions this process owns (one request per
owned partition) and the number of configured detectors (one query).

HTTP requests are counted by :class:`~twinstore.api.operations.HttpMetrics` into
:attr:`Metrics.requests` / :attr:`Metrics.durations` (a dict update and a bisect per request),
WebSocket and SSE sessions into :attr:`Metrics.ws_sessions` / :attr:`Metrics.sse_sessions`.

Each runtime has its own registry (tests run several in one process); the process and GC
collectors of prometheus_client are added to it. With ``twinstore serve --workers N`` each
worker process has its own registry and a scrape sees the process that answered it: scale
with replicas of one worker each (the Helm chart does) to see every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

import twinstore
from twinstore.histogram import SECONDS_BUCKETS, Histogram

if TYPE_CHECKING:
    from twinstore.runtime import Runtime

__all__ = ["CONTENT_TYPE", "Metrics"]

log = logging.getLogger("twinstore.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
REFRESH_TIMEOUT = 1.0  # a scrape answers with what it has after this long
COUNT_DETECTORS = "SELECT count(*) FROM anomaly_detectors"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """The registry of one runtime and the HTTP / session counts the API keeps in it."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_RuntimeCollector(self))
        # (method, route template, status) -> requests; (method, route) -> seconds to the status line
        self.requests: dict[tuple[str, str, int], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.ws_sessions = 0
        self.sse_sessions = 0
        # fetched by refresh(): partition -> pending messages of this process's consumers
        self.ingest_lag: dict[int, int] = {}
        self.anomaly_lag: dict[int, int] = {}
        self.detectors: int | None = None

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request (O(1): two dict look-ups and a bisect)."""
        if method not in METHODS:
            method = "other"
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.durations.get((method, route))
        if histogram is None:
            histogram = self.durations[(method, route)] = Histogram(SECONDS_BUCKETS)
        histogram.observe(seconds)

    async def refresh(self) -> None:
        """Fetch what only a scrape asks for (consumer lag, detector count), within a second."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REFRESH_TIMEOUT):
                await asyncio.gather(self._lag(), self._detectors(), return_exceptions=True)

    async def render(self) -> bytes:
        """The Prometheus text exposition of this runtime's registry."""
        await self.refresh()
        return generate_latest(self.registry)

    async def _lag(self) -> None:
        rt = self.runtime
        # the workers' durable consumer names (twinstore.ingest._PartitionRun, anomaly._Scorer)
        if rt.ingest is not None:
            self.ingest_lag = await _pending(
                rt.ingest.js, rt.ingest.subjects.stream, "ingest-{}", rt.ingest.partitions
            )
        if rt.anomaly is not None:
            self.anomaly_lag = await _pending(
                rt.anomaly.js, rt.anomaly.subjects.events_stream, "anomaly-{}", rt.anomaly.partitions
            )

    async def _detectors(self) -> None:
        rt = self.runtime
        if rt.anomaly is None or rt.pool is None:
            return
        async with rt.pool.acquire(timeout=REFRESH_TIMEOUT) as con:
            self.detectors = int(await con.fetchval(COUNT_DETECTORS))


async def _pending(
    js: JetStreamContext, stream: str, durable: str, partitions: Iterable[int]
) -> dict[int, int]:
    """Messages not yet acknowledged (pending + delivered unacknowledged) per owned partition;
    a partition whose consumer does not exist (just claimed, no detector) is left out."""

    async def one(p: int) -> tuple[int, int] | None:
        try:
            info = await js.consumer_info(stream, durable.format(p))
        except Exception:
            return None
        return p, int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    found = await asyncio.gather(*(one(p) for p in list(partitions)))
    return dict(f for f in found if f is not None)


def _histogram(
    family: HistogramMetricFamily, labels: list[str], histogram: Histogram
) -> HistogramMetricFamily:
    cumulative = histogram.cumulative()
    bounds = [str(float(b)) for b in histogram.bounds] + ["+Inf"]
    family.add_metric(labels, list(zip(bounds, cumulative, strict=True)), histogram.sum)
    return family


class _RuntimeCollector(Collector):
    """Reads the runtime's parts at scrape time (see the module docstring for each series)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        rt = m.runtime
        info = GaugeMetricFamily("twinstore_info", "twinstore's version (always 1)", labels=["version"])
        info.add_metric([twinstore.__version__], 1)
        yield info
        yield from self._http(m)
        yield from self._journal(rt)
        yield from self._relay(rt)
        yield from self._pool(rt)
        yield from self._live(m, rt)
        yield from self._ingest(m, rt)
        yield from self._anomaly(m, rt)

    def _http(self, m: Metrics) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "twinstore_http_requests",
            "HTTP requests answered, by method, route template ('other': no route) and status",
            labels=["method", "route", "status"],
        )
        for (method, route, status), n in list(m.requests.items()):
            requests.add_metric([method, route, str(status)], n)
        yield requests
        durations = HistogramMetricFamily(
            "twinstore_http_request_duration_seconds",
            "Seconds from the request to its status line, by method and route template",
            labels=["method", "route"],
        )
        for (method, route), histogram in list(m.durations.items()):
            _histogram(durations, [method, route], histogram)
        yield durations

    def _journal(self, rt: Runtime) -> Iterator[Metric]:
        journal = rt.journal
        if journal is None:
            return
        yield CounterMetricFamily(
            "twinstore_journal_events_appended",
            "Events committed to the journal",
            value=journal.events_appended,
        )
        yield CounterMetricFamily(
            "twinstore_journal_commits", "Group-commit transactions committed", value=journal.batches
        )
        yield CounterMetricFamily(
            "twinstore_journal_replans",
            "Writes decided again under the lock (the cached state was stale)",
            value=journal.replans,
        )
        yield CounterMetricFamily(
            "twinstore_journal_prefetches",
            "Things a write transaction read and decided before taking the lock (not in this "
            "process's cache, or stale in it)",
            value=journal.prefetches,
        )
        yield _histogram(
            HistogramMetricFamily(
                "twinstore_journal_commit_batch_size",
                "Write requests per group-commit transaction",
            ),
            [],
            journal.batch_sizes,
        )
        yield _histogram(
            HistogramMetricFamily(
                "twinstore_journal_commit_duration_seconds",
                "Seconds per group-commit transaction (plan, lock, append, commit)",
            ),
            [],
            journal.commit_seconds,
        )
        yield _histogram(
            HistogramMetricFamily(
                "twinstore_journal_lock_seconds",
                "Seconds per journal transaction waiting for its partition's write lock (and reading "
                "its things' heads): the time writes in one partition queue behind each other",
            ),
            [],
            journal.lock_seconds,
        )
        yield _histogram(
            HistogramMetricFamily(
                "twinstore_journal_lock_held_seconds",
                "Seconds a journal transaction holds its partitions' write locks (granted to "
                "committed): the serial section of a partition, what bounds one partition's writes/s",
            ),
            [],
            journal.lock_held_seconds,
        )

    def _relay(self, rt: Runtime) -> Iterator[Metric]:
        relay = rt.relay
        if relay is None:
            return
        yield CounterMetricFamily(
            "twinstore_relay_events_skipped",
            "Committed events the relay could never publish (over NATS' max_payload, not encodable, "
            "refused by JetStream): logged and passed over, kept in the journal",
            value=relay.skipped,
        )
        yield GaugeMetricFamily(
            "twinstore_relay_partitions",
            "Journal partitions this process's relay publishes (the others are published by other "
            "processes: the sum over the processes is the partition count)",
            value=len(relay.partitions),
        )

    def _pool(self, rt: Runtime) -> Iterator[Metric]:
        pool = rt.pool
        if pool is None:
            return
        size, idle = pool.get_size(), pool.get_idle_size()
        connections = GaugeMetricFamily(
            "twinstore_db_pool_connections", "Open database pool connections by state", labels=["state"]
        )
        connections.add_metric(["idle"], idle)
        connections.add_metric(["in_use"], max(0, size - idle))
        yield connections
        yield GaugeMetricFamily(
            "twinstore_db_pool_max_connections", "Size limit of the database pool", value=pool.get_max_size()
        )

    def _live(self, m: Metrics, rt: Runtime) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "twinstore_websocket_sessions", "Open WebSocket sessions", value=m.ws_sessions
        )
        yield GaugeMetricFamily(
            "twinstore_sse_sessions", "Open server-sent event streams", value=m.sse_sessions
        )
        dropped = CounterMetricFamily(
            "twinstore_slow_consumers_dropped",
            "Live subscribers dropped because their queue was full, by kind (events, messages)",
            labels=["kind"],
        )
        dropped.add_metric(["events"], rt.fanout.dropped if rt.fanout is not None else 0)
        dropped.add_metric(["messages"], rt.messages.dropped if rt.messages is not None else 0)
        yield dropped

    def _ingest(self, m: Metrics, rt: Runtime) -> Iterator[Metric]:
        worker = rt.ingest
        if worker is None:
            return
        stats = worker.stats
        for name, doc, value in (
            ("messages", "Ingest messages acknowledged or terminated", stats.messages),
            ("events_applied", "Ingested writes committed as events", stats.applied),
            ("duplicates", "Ingest messages dropped as already applied", stats.duplicates),
            ("refused", "Ingest messages or rows refused and reported on the errors subject", stats.refused),
            ("batches", "Ingest batches applied", stats.batches),
            (
                "retries",
                "Ingest commits retried (database outage, conflict) and partition restarts",
                stats.retries,
            ),
        ):
            yield CounterMetricFamily(f"twinstore_ingest_{name}", doc, value=value)
        owned = GaugeMetricFamily(
            "twinstore_ingest_partitions_owned", "Ingest partitions this process applies"
        )
        owned.add_metric([], len(worker.partitions))
        yield owned
        lag = GaugeMetricFamily(
            "twinstore_ingest_lag_messages",
            "Messages of an owned ingest partition not yet acknowledged (JetStream consumer)",
            labels=["partition"],
        )
        owned_now = set(worker.partitions)
        for p, n in sorted(m.ingest_lag.items()):
            if p in owned_now:
                lag.add_metric([str(p)], n)
        yield lag
        redelivered = CounterMetricFamily(
            "twinstore_ingest_redeliveries",
            "Ingest messages received again (delivered more than once), by partition",
            labels=["partition"],
        )
        for p, n in sorted(stats.redeliveries.items()):
            redelivered.add_metric([str(p)], n)
        yield redelivered

    def _anomaly(self, m: Metrics, rt: Runtime) -> Iterator[Metric]:
        worker = rt.anomaly
        if worker is None:
            return
        stats = worker.stats
        yield CounterMetricFamily("twinstore_anomaly_scored", "Feature updates scored", value=stats.scored)
        yield CounterMetricFamily(
            "twinstore_anomaly_messages",
            "Anomalies found, each published on NATS and sent as the feature's 'anomaly' message",
            value=stats.anomalies,
        )
        yield CounterMetricFamily(
            "twinstore_anomaly_skipped",
            "Updates skipped as already scored (redeliveries)",
            value=stats.skipped,
        )
        yield CounterMetricFamily(
            "twinstore_anomaly_checkpoints", "Detector checkpoint transactions", value=stats.checkpoints
        )
        yield _histogram(
            HistogramMetricFamily("twinstore_anomaly_score", "Anomaly scores of the updates scored"),
            [],
            stats.scores,
        )
        if m.detectors is not None:
            yield GaugeMetricFamily(
                "twinstore_anomaly_watched_features",
                "Features with a detector (the whole deployment)",
                value=m.detectors,
            )
        owned = GaugeMetricFamily(
            "twinstore_anomaly_partitions_owned", "Event partitions this process scores"
        )
        owned.add_metric([], len(worker.partitions))
        yield owned
        lag = GaugeMetricFamily(
            "twinstore_anomaly_lag_messages",
            "Events of an owned partition not yet acknowledged by the scorer (JetStream consumer)",
            labels=["partition"],
        )
        owned_now = set(worker.partitions)
        for p, n in sorted(m.anomaly_lag.items()):
            if p in owned_now:
                lag.add_metric([str(p)], n)
        yield lag
