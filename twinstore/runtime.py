"""Open and close what a twinstore process runs on: pool, NATS, journal, relay, service, auth."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import nats
import orjson
from nats.aio.client import Client as NATS

from twinstore.anomaly.worker import AnomalyWorker
from twinstore.auth import Authenticator
from twinstore.bus.connection import servers
from twinstore.bus.ingest import IngestSubjects
from twinstore.bus.relay import Relay, check_event_bound, ensure_events_stream
from twinstore.bus.subjects import Subjects
from twinstore.enforcement import PolicyCache
from twinstore.fanout import FanOut
from twinstore.ingest import IngestWorker, ensure_ingest_streams
from twinstore.messages import MessageService
from twinstore.metrics import Metrics
from twinstore.model import rql
from twinstore.model.limits import configure as configure_limits
from twinstore.operations import OperationsListener
from twinstore.policy_service import PolicyService
from twinstore.search import SearchService
from twinstore.service import ThingService
from twinstore.settings import Settings
from twinstore.shutdown import phase
from twinstore.store import connection
from twinstore.store.codec import dumps
from twinstore.store.journal import Journal
from twinstore.store.policies import PolicyStore
from twinstore.store.recorder import Recorder
from twinstore.store.schema import (
    MIGRATIONS,
    current_version,
    ensure_search_indexes,
    migrate,
    stored_partitions,
)

__all__ = ["Runtime", "connect", "create_pool"]

log = logging.getLogger("twinstore")

CONNECT_TIMEOUT = 60.0  # asyncpg's own, when no bound is given


async def _init_connection(con: asyncpg.Connection) -> None:
    await con.set_type_codec("jsonb", encoder=dumps, decoder=orjson.loads, schema="pg_catalog")


async def _keep_session(con: asyncpg.Connection) -> None:
    """Pool release hook: nothing to undo (asyncpg still rolls back an open transaction).

    twinstore keeps no session state on pooled connections (no LISTEN, SET, cursors or
    session advisory locks: the relay's lock lives on a connection of its own), so asyncpg's
    default reset, one more round trip per request, is skipped.
    """


async def create_pool(url: str, size: int = 10, timeout: float | None = None) -> asyncpg.Pool:
    """One pool per process; JSON codecs set once per connection; every statement (a commit
    included) and every host's connection attempt bounded by ``timeout`` seconds
    (``database_timeout_seconds``).

    ``url`` keeps its meaning: a multi-host URL with ``target_session_attrs=read-write``
    (README "High availability: PostgreSQL") makes every new connection find the writable host,
    each host tried for at most ``timeout`` (:func:`twinstore.store.connection.connect`). A
    connection that breaks (its server gone) is closed by asyncpg and replaced at the next
    acquire, so after a failover the pool refills from the promoted server.

    A statement past ``timeout`` is cancelled and raises :class:`TimeoutError`, which
    :func:`twinstore.store.is_unavailable` makes a 503. For a COMMIT this is the one safe answer:
    PostgreSQL may have committed it locally (a cancelled wait for a synchronous standby still
    commits), so the write is reported as not done, never acknowledged.
    """
    pool = await asyncpg.create_pool(
        url,
        min_size=1,
        max_size=size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=timeout,
        connect=functools.partial(connection.connect, timeout=timeout or CONNECT_TIMEOUT),
    )
    assert pool is not None
    return pool


def connect(url: str, timeout: float | None = None) -> Callable[[], Awaitable[asyncpg.Connection]]:
    """How the workers open connections of their own (relay LISTEN, partition locks, policy
    listener): the pool's URL and bounds, a new connection per call (so a lost one is replaced
    by one to whichever host is writable now)."""

    def open_connection() -> Awaitable[asyncpg.Connection]:
        return connection.connect(url, timeout=timeout or CONNECT_TIMEOUT, command_timeout=timeout)

    return open_connection


class Runtime:
    """Everything a process needs, opened in order and closed in reverse."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Envelopes are decoded where no settings are at hand (WebSocket, NATS ingestion)
        configure_limits(settings.max_header_bytes, settings.max_json_depth)
        # The RQL and fields parsers run where no settings are at hand (protocol envelopes)
        rql.configure(settings.query_limits)
        # Set by open() from the database's partition count (see the properties below)
        self._subjects: Subjects | None = None
        self._ingest_subjects: IngestSubjects | None = None
        self.ingest: IngestWorker | None = None
        self.anomaly: AnomalyWorker | None = None
        self.pool: asyncpg.Pool | None = None
        self.nc: NATS | None = None
        self.journal: Journal | None = None
        self.recorder: Recorder | None = None
        self.relay: Relay | None = None
        self.service: ThingService | None = None
        self.policies: PolicyService | None = None
        self.search: SearchService | None = None
        self.fanout: FanOut | None = None
        self.messages: MessageService | None = None
        self._listener: asyncio.Task[None] | None = None
        self._stop_listener = asyncio.Event()
        self.auth = Authenticator.from_settings(settings)
        self._owned: list[str] = []
        self.metrics = Metrics(self)
        # Shutdown (twinstore.api.server): ``draining`` goes up first, so /ready answers 503 and
        # new WebSocket/SSE sessions are turned away; ``stopping`` asks the open sessions
        # (``sessions``, the WebSocket sessions) to finish their commands and close.
        self.draining = False
        self.stopping = asyncio.Event()
        self.sessions: set[object] = set()
        # /metrics, /health, /ready of a worker process (serve has them on its API port)
        self.listener: OperationsListener | None = None

    @property
    def subjects(self) -> Subjects:
        """The events and messages subjects, partitioned by the database's partition count."""
        if self._subjects is None:
            raise RuntimeError("Runtime.open() first: the subjects use the database's partition count")
        return self._subjects

    @property
    def ingest_subjects(self) -> IngestSubjects:
        """The ingest subjects, partitioned by the database's partition count."""
        if self._ingest_subjects is None:
            raise RuntimeError("Runtime.open() first: the subjects use the database's partition count")
        return self._ingest_subjects

    async def open(
        self,
        *,
        pool: asyncpg.Pool | None = None,
        nc: NATS | None = None,
        ingest: bool | None = None,
        clients: bool = True,
        anomaly: bool | None = None,
    ) -> None:
        """Open everything; ``ingest`` (default: the ``ingest_enabled`` setting) runs an ingest
        worker; ``clients=False`` (``twinstore ingest``) leaves out what serves WebSocket/SSE
        clients and live messages (the event fan-out and message delivery); ``anomaly``
        (default: the ``anomaly_enabled`` setting) runs an anomaly scoring worker. Without
        ``clients`` and with ``metrics_port`` set, /metrics, /health and /ready are served on that
        port from the start (/ready says 503 until everything is open)."""
        s = self.settings
        if s.database_url is None or s.nats_url is None:
            raise RuntimeError("database_url and nats_url must be set (or embedded servers started)")
        if not clients and s.metrics_port is not None and self.listener is None:
            self.listener = OperationsListener(self, "0.0.0.0", s.metrics_port)
            await self.listener.start()
        if pool is None:
            pool = await create_pool(s.database_url, s.pool_size, s.database_timeout_seconds)
            self._owned.append("pool")
        self.pool = pool
        # Not on the pool: migrations are not bounded by database_timeout_seconds.
        con = await connection.connect(s.database_url, timeout=s.database_timeout_seconds)
        try:
            await _init_connection(con)
            await migrate(con, s.partitions)
            await ensure_search_indexes(con, s.search_index_paths)
            partitions = await stored_partitions(con)
        finally:
            await con.close()
        # One partition count end to end: a thing's ingest subject and consumer, its journal
        # partition, its relay, its events subject and its anomaly scorer (twinstore.model.partition).
        self.recorder = Recorder(partitions)
        self._subjects = Subjects(s.nats_prefix, partitions)
        self._ingest_subjects = IngestSubjects(s.nats_prefix, partitions)
        if nc is None:
            nc = await nats.connect(
                servers(s.nats_url), name="twinstore", max_reconnect_attempts=-1, reconnect_time_wait=1
            )
            self._owned.append("nats")
        self.nc = nc
        check_event_bound(nc.max_payload, s.max_thing_bytes, s.max_header_bytes)
        await ensure_events_stream(nc.jetstream(), self.subjects, s.events_max_age_seconds, s.nats_replicas)
        database_url = s.database_url
        own_connection = connect(database_url, s.database_timeout_seconds)
        self.relay = Relay(
            pool,
            nc,
            self.subjects,
            poll_interval=s.relay_poll_interval,
            connect=own_connection,
            group_size=s.journal_partitions_per_transaction,
        )
        relay = self.relay
        self.journal = Journal(
            pool,
            snapshot_every=s.snapshot_every,
            max_batch=s.max_batch,
            max_thing_bytes=s.max_thing_bytes,
            max_patch_ops=s.max_patch_ops,
            max_header_bytes=s.max_header_bytes,
            on_commit=lambda events: relay.notify(),
            writers=max(1, min(s.journal_writers, s.pool_size // 2)),
            group_size=s.journal_partitions_per_transaction,
            recorder=self.recorder,
        )
        self.journal.start()
        self.relay.start()
        store = PolicyStore(
            pool, refuse_delete_in_use=s.policy_delete_in_use == "refuse", recorder=self.recorder
        )
        cache = PolicyCache(store)
        self.policies = PolicyService(store, cache)
        self.service = ThingService(self.journal, self.policies)
        self.search = SearchService(pool, cache, frozenset(s.search_index_paths))
        # Every process can send (the anomaly worker's outbox messages); only those serving
        # clients subscribe to deliver them.
        self.messages = MessageService(nc, self.subjects, cache, self.journal.load)
        if clients:
            self.fanout = FanOut(nc, self.subjects, cache, self.journal.load)
            await self.fanout.start()
            await self.messages.start()
        self._listener = asyncio.create_task(
            store.listen(own_connection, cache.invalidate, self._stop_listener),
            name="twinstore-policy-listener",
        )
        await ensure_ingest_streams(
            nc.jetstream(), self.ingest_subjects, s.ingest_max_age_seconds, s.nats_replicas
        )
        if s.ingest_enabled if ingest is None else ingest:
            self.ingest = IngestWorker(
                nc,
                self.service,
                self.ingest_subjects,
                connect=own_connection,
                pool=pool,
                sources=s.ingest_sources,
                default_subjects=s.ingest_default_subjects,
                batch=s.ingest_batch,
                max_rows=s.ingest_max_rows_per_message,
            )
            self.ingest.start()
        if s.anomaly_enabled if anomaly is None else anomaly:
            self.anomaly = self.anomaly_worker()
            self.anomaly.start()

    def anomaly_worker(self, **options: Any) -> AnomalyWorker:
        """A new (not started) anomaly scoring worker on this runtime's connections."""
        assert self.nc is not None and self.journal is not None and self.pool is not None
        s = self.settings
        database_url = s.database_url
        assert database_url is not None
        messages = self.messages

        async def send(thing_id: str, feature_id: str, value: dict[str, Any], policy_id: str | None) -> None:
            assert messages is not None
            await messages.send_from_feature(thing_id, feature_id, "anomaly", value, policy_id=policy_id)

        return AnomalyWorker(
            self.nc,
            self.journal,
            self.subjects,
            pool=self.pool,
            connect=connect(database_url, s.database_timeout_seconds),
            send=send,
            cache=self.service.cache if self.service is not None else None,
            checkpoint_every=s.anomaly_checkpoint_every,
            checkpoint_seconds=s.anomaly_checkpoint_seconds,
            **options,
        )

    def begin_shutdown(self) -> None:
        """Stop taking new work: readiness down, WebSocket sessions asked to close, SSE
        streams ended (their subscriptions dropped)."""
        self.draining = True
        self.stopping.set()
        if self.fanout is not None:
            self.fanout.drop_all("server shutting down")

    async def close_sessions(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, until the WebSocket sessions have closed."""
        self.begin_shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.sessions:
                    await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Finish in-flight writes, publish what was committed, then disconnect (one log line
        per step, with its duration)."""
        self.draining = True
        if self.ingest is not None:
            with phase("ingest batches in flight committed and acknowledged"):
                await self.ingest.stop()
        if self.anomaly is not None:
            with phase("anomaly state checkpointed and acknowledged"):
                await self.anomaly.stop()
        if self.fanout is not None:
            await self.fanout.stop()
        if self.messages is not None:
            await self.messages.stop()
        if self._listener is not None:
            self._stop_listener.set()
            await self._listener
        if self.journal is not None:
            with phase("journal writes in flight committed"):
                await self.journal.stop()
        if self.relay is not None:
            with phase("relay published what was committed", leader=self.relay.is_leader):
                if self.relay.is_leader:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._flush_relay(), 5)
                await self.relay.stop()
        if self.nc is not None and "nats" in self._owned:
            with phase("nats drained"), contextlib.suppress(Exception):
                await self.nc.drain()
        if self.pool is not None and "pool" in self._owned:
            with phase("database pool closed"):
                await self.pool.close()
        if self.listener is not None:
            await self.listener.stop()

    async def _flush_relay(self) -> None:
        assert self.relay is not None
        while await self.relay.publish_pending():
            pass
        await self.relay.save_cursor()

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness (``/ready``): the database answers with the current schema, NATS is
        connected and the process is not shutting down; Ditto's health shape (``UP`` / ``DOWN``)."""
        db: dict[str, Any] = {"status": "DOWN"}
        if self.pool is not None:
            try:
                start = time.perf_counter()
                async with self.pool.acquire(timeout=2) as con:
                    version = await asyncio.wait_for(current_version(con), 2)
                db = {
                    "status": "UP" if version >= len(MIGRATIONS) else "DOWN",
                    "schemaVersion": version,
                    "latencyMs": round((time.perf_counter() - start) * 1000, 2),
                }
            except Exception as exc:  # any failure means the database is not usable
                db = {"status": "DOWN", "reason": str(exc) or type(exc).__name__}
        bus: dict[str, Any] = {"status": "DOWN"}
        if self.nc is not None and self.nc.is_connected:
            bus = {"status": "UP", "relayLeader": bool(self.relay and self.relay.is_leader)}
        children: dict[str, Any] = {"database": db, "nats": bus}
        if self.draining:  # shutting down: no new work, whatever the servers say
            children["process"] = {"status": "DOWN", "reason": "shutting down"}
        ok = all(c["status"] == "UP" for c in children.values())
        return ok, {"status": "UP" if ok else "DOWN", "children": children}
