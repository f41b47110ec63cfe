"""The scoring worker: committed thing events in, scores, checkpoints and anomalies out.

Not in the write path: it reads the events stream (``<PREFIX>_EVENTS``) that the relay fills
after each commit, so a slow model never slows a write.

* **Partitions.** The processes running it share the partitions as ingestion does
  (:class:`~twinstore.bus.partitions.PartitionGroup`: advisory locks, members counted in
  ``pg_locks``); per partition a durable pull consumer ``anomaly-<p>`` on ``<prefix>.events.<p>``.
  ``p`` is the thing's one partition (:mod:`twinstore.model.partition`, the database's count):
  its ingest partition, its journal partition and the relay that publishes its events. A new consumer starts
  at the earliest detector's config time (nothing before it can be scored), or at new events.
* **Scoring.** For every event touching the properties of a feature with a detector
  (``anomaly_detectors``): the feature's numeric leaves (``properties`` of the config, default
  all) from the thing's state, kept per thing and folded from the events (loaded from the
  journal at the event's revision on a cold start or a gap); revisions at or below the
  detector's last scored one are skipped; then score, classify, explain, learn
  (:mod:`twinstore.anomaly.base`).
* **Exactly-once scoring.** The detector's checkpoint, its last revision, the latest score and
  the anomalies found are written in one transaction every ``checkpoint_every`` updates or
  ``checkpoint_seconds`` and on stop; messages are acknowledged only after the checkpoint
  that contains them, so a crash redelivers exactly what the checkpoint has not seen (older
  revisions are skipped). A checkpoint is written only while its config is still the one
  stored (``modified``), so a replaced or removed detector's state never comes back.
* **Anomalies** are published at once (at least once: after a crash the same anomaly, scored
  again from the checkpoint with the same result, may be told twice) on core NATS
  ``<prefix>.anomalies.<partition>`` and as a Ditto live message from the feature's outbox,
  subject ``anomaly`` (receivers need READ on ``message:/features/<f>/outbox/messages/anomaly``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import nats.errors
import nats.js
import nats.js.api
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from twinstore.anomaly import rules as rules_module
from twinstore.anomaly import store
from twinstore.anomaly.base import Explainer, Filter, Teachable, checkpoint, restore
from twinstore.anomaly.detectors import create
from twinstore.bus.partitions import PartitionGroup, PullReader
from twinstore.bus.subjects import Subjects
from twinstore.enforcement import PolicyCache
from twinstore.fanout import decode_event
from twinstore.histogram import SCORE_BUCKETS, Histogram
from twinstore.model.errors import DittoError
from twinstore.model.ids import parse_pointer
from twinstore.model.thing import Event, ThingState, evolve
from twinstore.store.journal import Journal

__all__ = ["AnomalyStats", "AnomalyWorker", "Send"]

log = logging.getLogger("twinstore.anomaly")

ACK_WAIT_SECONDS = 120.0
FETCH_TIMEOUT = 1.0
THINGS_CACHED = 10_000
WATCHED_SECONDS = 0.25  # how stale the set of things with a detector may be

# (thing id, feature id, value, policy id) -> the live message is on its way
Send = Callable[[str, str, dict[str, Any], str | None], Awaitable[Any]]
# thing id -> feature id -> (config, modified)
Detectors = dict[str, dict[str, tuple[dict[str, Any], datetime]]]


@dataclass
class AnomalyStats:
    """Counters of one worker."""

    scored: int = 0
    anomalies: int = 0
    skipped: int = 0  # revisions already scored (redeliveries after a restart)
    taught: int = 0  # false alarms (operator labels) learnt as normal
    checkpoints: int = 0
    scores: Histogram = field(default_factory=lambda: Histogram(SCORE_BUCKETS))  # /metrics
    scored_revisions: list[tuple[str, str, int]] = field(default_factory=list)  # kept when tracing


@dataclass
class _Watched:
    """One live detector of one feature."""

    config: dict[str, Any]
    modified: datetime
    detector: Filter
    revision: int = 0
    score: float | None = None
    threshold: float | None = None
    anomalous: bool = False
    scored_at: datetime | None = None
    dirty: bool = False


class AnomalyWorker:
    """One member of the scoring group: claims event partitions and scores them."""

    def __init__(
        self,
        nc: NATS,
        journal: Journal,
        subjects: Subjects,
        *,
        pool: asyncpg.Pool,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        send: Send | None = None,
        cache: PolicyCache | None = None,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 1.0,
        batch: int = 500,
        trace: bool = False,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.journal = journal
        self.subjects = subjects
        self.pool = pool
        self.send = send
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.batch = batch
        self.trace = trace
        self.stats = AnomalyStats()
        self._detectors: Detectors = {}
        self._fingerprint: tuple[Any, ...] | None = None
        self._detectors_at = float("-inf")
        self._invalidations = self._seen_invalidations = 0
        self._detectors_lock = asyncio.Lock()
        self.generation = 0  # counts the times the detectors were re-read
        # definition -> its rules (config, subjects, owner), oldest first: attached to features as
        # they get the definition
        self.rules: dict[str, list[rules_module.Rule]] = {}
        self.cache = cache
        self.group = PartitionGroup(
            f"twinstore-anomaly:{subjects.events_stream}",
            subjects.partitions,
            self._partition,
            connect=connect,
            label="anomaly",
        )

    def start(self) -> None:
        self.group.start()

    async def stop(self) -> None:
        """Checkpoint and acknowledge what was scored, then give the partitions back."""
        await self.group.stop()

    @property
    def partitions(self) -> list[int]:
        return self.group.partitions

    def invalidate(self) -> None:
        """A detector was attached or removed in this process: re-read the detectors."""
        self._invalidations += 1

    async def detectors(self, fresh: bool = False) -> Detectors:
        """The detectors by thing and feature, checked at most every WATCHED_SECONDS (and after
        :meth:`invalidate`) by a cheap fingerprint and re-read only when it changed: events of
        things without one are not even decoded. A detector attached through another process
        scores the updates committed from about 2 x WATCHED_SECONDS after it was attached.
        ``fresh``: check now (after this process attached one itself)."""
        fresh = fresh or self._invalidations != self._seen_invalidations
        age = time.monotonic() - self._detectors_at
        if not fresh and age < WATCHED_SECONDS:
            return self._detectors
        if not fresh and self._detectors_lock.locked() and age < 2 * WATCHED_SECONDS:
            return self._detectors  # being re-read: the others go on with what they have
        async with self._detectors_lock:
            if fresh or time.monotonic() - self._detectors_at >= WATCHED_SECONDS:
                invalidations = self._invalidations  # those after this point read again
                async with self.pool.acquire() as con:
                    row = await con.fetchrow(store.SELECT_DETECTORS_FINGERPRINT)
                    fingerprint = tuple(row.values()) if row is not None else None
                    if fingerprint != self._fingerprint:
                        detectors: Detectors = {}
                        for r in await con.fetch(store.SELECT_DETECTORS):
                            detectors.setdefault(r["thing_id"], {})[r["feature_id"]] = (
                                r["config"],
                                r["modified"],
                            )
                        rules: dict[str, list[rules_module.Rule]] = {}
                        for r in await con.fetch(rules_module.SELECT_RULES):
                            rules.setdefault(r["definition"], []).append(
                                (r["config"], tuple(r["subjects"]), r["owner"])
                            )
                        self.rules = rules
                        self._detectors, self._fingerprint = detectors, fingerprint
                        self.generation += 1
                self._detectors_at = time.monotonic()
                self._seen_invalidations = invalidations
        return self._detectors

    async def _partition(self, partition: int, stop: asyncio.Event) -> None:
        """Score one partition until stopped (the group restarts it after a failure)."""
        await _Scorer(self, partition, stop).run()


def _brings_definition(event: Event) -> bool:
    """Whether ``event`` can give a feature a definition (a rule may then apply)."""
    if event.action == "deleted":
        return False
    parts = parse_pointer(event.path)
    if not parts:
        return True
    if parts[0] != "features":
        return False
    return len(parts) <= 2 or (len(parts) == 3 and parts[2] == "definition")


def _touches(parts: list[str], feature_id: str) -> bool:
    """Whether a change at ``parts`` can change the feature's properties."""
    if len(parts) <= 1:
        return not parts or parts == ["features"]
    if parts[0] != "features" or parts[1] != feature_id:
        return False
    return len(parts) == 2 or parts[2] == "properties"


class _Scorer:
    """One claim of one partition: its consumer, the detectors' state and the pending acks."""

    def __init__(self, worker: AnomalyWorker, partition: int, stop: asyncio.Event) -> None:
        self.w = worker
        self.partition = partition
        self.stop = stop
        self.durable = f"anomaly-{partition}"
        self.things: OrderedDict[str, ThingState] = OrderedDict()
        self.watched: dict[tuple[str, str], _Watched] = {}
        self.unacked: list[Msg] = []
        self.found: list[tuple[Any, ...]] = []  # anomalies rows not yet written
        self.generation = -1  # of the worker's detectors when ``watched`` was last pruned
        self.writer: asyncio.Task[None] | None = None  # the checkpoint being written
        self.feedback: list[asyncpg.Record] = []  # false alarms to learn at the next flush
        self.updates = 0
        self.last_flush = time.monotonic()

    async def _consumer(self) -> None:
        w = self.w
        stream = w.subjects.events_stream
        try:
            await w.js.consumer_info(stream, self.durable)
            return
        except nats.js.errors.NotFoundError:
            pass
        async with w.pool.acquire() as con:
            earliest = await con.fetchval(store.SELECT_EARLIEST_DETECTOR)
        config = nats.js.api.ConsumerConfig(
            durable_name=self.durable,
            filter_subject=f"{w.subjects.prefix}.events.{self.partition}",
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            deliver_policy=nats.js.api.DeliverPolicy.BY_START_TIME
            if earliest is not None
            else nats.js.api.DeliverPolicy.NEW,
            opt_start_time=earliest,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=max(4 * w.checkpoint_every, 4 * w.batch, 1000),
            max_deliver=-1,
        )
        await w.js.add_consumer(stream, config)

    async def run(self) -> None:
        """Score while some thing has a detector; with none anywhere, read nothing at all (the
        consumer is removed and made again, from the earliest detector's time, when one comes)."""
        dropped = False
        while not self.stop.is_set():
            if not await self.w.detectors() and not self.w.rules:
                if not dropped:
                    await self._drop_consumer()
                    dropped = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), WATCHED_SECONDS)
                continue
            await self._consumer()
            dropped = False
            sub = await self.w.js.pull_subscribe_bind(self.durable, self.w.subjects.events_stream)
            reader = PullReader(sub, self.w.batch, FETCH_TIMEOUT)
            try:
                while not self.stop.is_set():
                    msgs = await reader.next()
                    if msgs:
                        await self.score(msgs)
                        self.unacked.extend(msgs)
                    due = time.monotonic() - self.last_flush >= self.w.checkpoint_seconds
                    # also with nothing scored: labelled false alarms wait to be learnt
                    if due or (self.unacked and self.updates >= self.w.checkpoint_every):
                        await self.flush()
                    if not self.unacked and not await self.w.detectors() and not self.w.rules:
                        break  # the last detector is gone
                await self.flush()
                await self.written()
            finally:
                if self.writer is not None:  # failed or stopped mid-write: let it end
                    await asyncio.gather(self.writer, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _drop_consumer(self) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.w.js.delete_consumer(self.w.subjects.events_stream, self.durable)

    # ---- scoring ------------------------------------------------------------------------

    async def score(self, msgs: list[Msg]) -> None:
        configs = await self.w.detectors()
        if self.generation != self.w.generation:  # detectors came or went: forget removed ones
            self.generation = self.w.generation
            for key in [k for k in self.watched if k[1] not in configs.get(k[0], {})]:
                del self.watched[key]
        rules = self.w.rules if self.w.cache is not None else {}
        if not configs and not rules:
            return
        if not rules:
            # the relay names the thing in a header: events of unwatched things are not decoded
            msgs = [m for m in msgs if (m.headers or {}).get("Ditto-Thing-Id", "") in configs]
        for event in (decode_event(m.data, m.headers) for m in msgs):
            if event is None:
                continue
            state = None
            if rules and _brings_definition(event):
                state = await self._state(event)
                if state is not None and state.doc is not None:
                    configs = await self._attach(state, configs)
            features = configs.get(event.thing_id)
            if features:
                await self._event(event, features, state)
            else:
                self.things.pop(event.thing_id, None)

    async def _attach(self, state: ThingState, configs: Detectors) -> Detectors:
        """Attach the definition rules' detectors to the thing's features that match one."""
        assert self.w.cache is not None and state.doc is not None
        attached = await rules_module.attach(
            self.w.pool,
            self.w.cache,
            self.w.rules,
            [(state.thing_id, state.doc)],
            has=lambda thing_id, feature_id: feature_id in configs.get(thing_id, {}),
        )
        if not attached:
            return configs
        log.info("anomaly: detectors attached by definition", extra={"thing_id": state.thing_id})
        return await self.w.detectors(fresh=True)

    async def _state(self, event: Event) -> ThingState | None:
        """The thing after ``event`` (None: this run applied it already, or history is gone)."""
        cached = self.things.get(event.thing_id)
        if cached is not None and event.revision <= cached.revision:
            return None
        if cached is not None and event.revision == cached.revision + 1:
            state = evolve(cached, event)
        else:
            try:
                state = await self.w.journal.load_at(event.thing_id, event.revision)
            except DittoError as exc:
                log.warning(
                    "anomaly: state not loadable, event skipped",
                    extra={"thing_id": event.thing_id, "revision": event.revision, "error": exc.message},
                )
                return None
        self.things[event.thing_id] = state
        self.things.move_to_end(event.thing_id)
        while len(self.things) > THINGS_CACHED:
            self.things.popitem(last=False)
        return state

    async def _event(
        self,
        event: Event,
        features: dict[str, tuple[dict[str, Any], datetime]],
        state: ThingState | None = None,
    ) -> None:
        if state is None:
            state = await self._state(event)
        if state is None or state.doc is None:
            return
        parts = parse_pointer(event.path)
        for feature_id, (config, modified) in features.items():
            if not _touches(parts, feature_id):
                continue
            feature = (state.doc.get("features") or {}).get(feature_id)
            if not isinstance(feature, dict):
                continue
            x = store.leaves(feature.get("properties") or {}, config.get("properties"))
            if not x:
                continue
            watched = await self._detector(event.thing_id, feature_id, config, modified)
            if event.revision <= watched.revision:
                self.w.stats.skipped += 1
                continue
            policy_id = state.doc.get("policyId")
            await self._score(
                event, feature_id, watched, x, policy_id if isinstance(policy_id, str) else None
            )

    async def _detector(
        self, thing_id: str, feature_id: str, config: dict[str, Any], modified: datetime
    ) -> _Watched:
        key = (thing_id, feature_id)
        watched = self.watched.get(key)
        if watched is not None and watched.modified == modified:
            return watched
        async with self.w.pool.acquire() as con:
            row = await con.fetchrow(store.SELECT_STATE, thing_id, feature_id)
        detector: Filter
        if row is not None and row["state"] is not None:
            restored = restore(bytes(row["state"]))
            assert isinstance(restored, Filter)
            detector = restored
        else:
            detector = create(config["algorithm"], config.get("parameters") or {})
        watched = _Watched(config, modified, detector, revision=0 if row is None else int(row["revision"]))
        self.watched[key] = watched
        return watched

    async def _score(
        self, event: Event, feature_id: str, watched: _Watched, x: dict[str, float], policy_id: str | None
    ) -> None:
        d = watched.detector
        score = d.score_one(x)
        anomalous = d.classify(score)
        contributions = d.contributions(x) if anomalous and isinstance(d, Explainer) else {}
        d.learn_one(x)
        watched.revision = event.revision
        watched.score, watched.threshold, watched.anomalous = score, d.threshold, anomalous
        watched.scored_at = event.timestamp
        watched.dirty = True
        self.updates += 1
        stats = self.w.stats
        stats.scored += 1
        stats.scores.observe(score)
        if self.w.trace:
            stats.scored_revisions.append((event.thing_id, feature_id, event.revision))
        if not anomalous:
            return
        stats.anomalies += 1
        threshold = store.finite(d.threshold)
        self.found.append(
            (
                event.thing_id,
                feature_id,
                event.revision,
                event.timestamp,
                score,
                d.threshold,
                contributions,
                x,
                self.partition,
            )
        )
        value = {
            "thingId": event.thing_id,
            "featureId": feature_id,
            "revision": event.revision,
            "score": store.finite(score),
            "threshold": threshold,
            "properties": contributions,
        }
        log.info(
            "anomaly",
            extra={"thing_id": event.thing_id, "feature_id": feature_id, "revision": event.revision},
        )
        subject = f"{self.w.subjects.prefix}.anomalies.{self.partition}"
        try:
            await self.w.nc.publish(
                subject, orjson.dumps({**value, "timestamp": event.timestamp.isoformat()})
            )
            if self.w.send is not None:
                await self.w.send(event.thing_id, feature_id, value, policy_id)
        except Exception as exc:  # telling is best effort; the anomaly is stored with the checkpoint
            log.warning("anomaly: could not be sent", extra={"thing_id": event.thing_id, "error": repr(exc)})

    # ---- checkpoints --------------------------------------------------------------------

    async def _pending_feedback(self) -> list[asyncpg.Record]:
        """The false alarms of this partition's things that no detector has learnt yet."""
        async with self.w.pool.acquire() as con:
            return list(await con.fetch(store.SELECT_FEEDBACK, self.partition))

    async def _feedback(self, rows: list[asyncpg.Record]) -> list[tuple[str, str, int, int]]:
        """Teach the detectors the false alarms ``rows`` (unless their config says
        ``"feedback": false``); the labels learnt, to mark in the same transaction as the
        checkpoints that hold them."""
        configs = await self.w.detectors()
        fed = []
        for r in rows:
            thing_id, feature_id = r["thing_id"], r["feature_id"]
            fed.append((thing_id, feature_id, r["revision"], self.partition))
            config, modified = configs.get(thing_id, {}).get(feature_id, (None, None))
            if config is None or modified is None or config.get("feedback") is False or r["x"] is None:
                continue  # no detector (any more) or none that wants it: marked all the same
            watched = await self._detector(thing_id, feature_id, config, modified)
            if isinstance(watched.detector, Teachable):
                watched.detector.teach(r["x"])
                watched.dirty = True
                self.w.stats.taught += 1
        return fed

    async def flush(self) -> None:
        """Checkpoint what was scored: the dirty detectors are serialised now, and written with
        the anomalies found in one transaction by a writer task while scoring goes on (a commit
        in the scoring loop would delay every update behind it); the messages they contain are
        acknowledged after that commit. One write at a time: this waits for the previous one,
        whose failure ends this claim of the partition (its messages come again)."""
        await self.written()
        fed = await self._feedback(self.feedback)
        self.feedback = []
        dirty = [(key, w) for key, w in self.watched.items() if w.dirty]
        states = [
            (
                thing_id,
                feature_id,
                w.revision,
                checkpoint(w.detector),
                w.score,
                w.threshold,
                w.anomalous,
                w.scored_at,
                w.modified,
                self.partition,
            )
            for (thing_id, feature_id), w in dirty
        ]
        for _, w in dirty:
            w.dirty = False
        found, self.found = self.found, []
        msgs, self.unacked = self.unacked, []
        self.updates = 0
        self.last_flush = time.monotonic()
        self.writer = asyncio.create_task(self._write(states, found, fed, msgs))

    async def written(self) -> None:
        """Wait for the writer task (raises what it raised)."""
        if self.writer is not None:
            task, self.writer = self.writer, None
            await task

    async def _write(
        self,
        states: list[tuple[Any, ...]],
        found: list[tuple[Any, ...]],
        fed: list[tuple[str, str, int, int]],
        msgs: list[Msg],
    ) -> None:
        if states or found or fed:
            async with self.w.pool.acquire() as con, con.transaction():
                if found:
                    await con.executemany(store.INSERT_ANOMALY, found)
                if fed:
                    await con.executemany(store.MARK_FED, fed)
                if states:
                    await con.executemany(store.SAVE_STATE, states)
            self.w.stats.checkpoints += 1
        for msg in msgs:
            with contextlib.suppress(Exception):  # a lost ack is a redelivery the revision skips
                await msg.ack()
        self.feedback = await self._pending_feedback()  # learnt at the next flush
