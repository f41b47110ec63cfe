"""NATS ingestion: apply what adapters publish (``twinstore.bus.ingest``) exactly once, in order.

Every process that runs ingestion (``twinstore serve``, ``twinstore ingest``) is a member of one
group and takes a fair share of the partitions ``<prefix>.ingest.<p>``:

* **Claiming.** A member holds a session-level PostgreSQL advisory lock per partition it
  applies, and one lock that says it is alive, all on a connection of its own. Every
  ``REBALANCE_SECONDS`` it counts the live members (``pg_locks``) and takes free partitions
  up to ``ceil(partitions / members)`` or gives back the ones above it. A member that dies
  loses its connection and so its locks; the others take its partitions within a round.
* **Exactly once, in order.** Per partition the last applied JetStream sequence is a row of
  ``ingest_progress`` written *in the same transaction* as the events it produced
  (:class:`~twinstore.store.journal.Mark`). Taking a partition re-creates its durable pull
  consumer to start right after that sequence, so nothing committed is applied again and
  nothing uncommitted is skipped; a message is acknowledged only after its transaction
  committed. A lost acknowledgement only causes a redelivery, which the stored sequence
  drops. The mark moves only from the sequence its writer read, so a member that lost its
  partition without noticing fails its next commit (:class:`FencedError`) instead of
  applying anything twice. Each source's ``Twinstore-Seq`` is kept the same way, so a
  message republished by an adapter after JetStream's duplicate window is dropped too.
  Deliveries lost on their way (their connection, or their consumer's leader in a cluster,
  died) leave a gap in the consumer's delivery numbers: the partition is applied up to the
  gap and its consumer made again from the applied sequence, so nothing is applied before
  an earlier message of its partition. A pull answered 503 (the consumer's leader is being
  elected) is waited out (:class:`~twinstore.bus.partitions.PullReader`).
* **Units.** A fetched batch (up to ``ingest_batch`` messages) is committed as few
  transactions as possible: one, unless a message creates, replaces, deletes or re-policies a
  whole thing (the guards of a unit are prepared from the states before it). Ingest partition
  ``p`` is journal partition ``p`` (one partition function and count,
  :mod:`twinstore.model.partition`), so a unit's things are all in one journal partition: a
  row whose thing is in another partition (its publisher counts partitions differently) is
  refused (``ingest:thing.wrongPartition``), never committed with the others.
* **Refusals never block.** An undecodable message, an unknown source, an invalid thing id
  or command, a policy refusal or a failed precondition is reported on
  ``<prefix>.ingest.errors`` (JSON: reason, Ditto error, stream sequence, subject, message
  id, source, row) and the message is terminated (or, when only some rows of a telemetry
  batch are refused, acknowledged after the others were applied). What decoding refuses is
  reported before the batch commits (a crash redelivers it and reports it again under the
  same ``Nats-Msg-Id``, which JetStream drops within its duplicate window); what the commit
  refuses (policy, precondition) only after it, so a crash in between loses that report. A
  database outage is not a refusal: the batch is retried with backoff (the messages kept in
  progress), so ingestion pauses and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import msgspec
import nats.errors
import nats.js
import nats.js.api
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from twinstore.auth import AuthContext
from twinstore.bus.ingest import (
    COMMAND_TYPE,
    SEQ_HEADER,
    SOURCE_HEADER,
    TELEMETRY_TYPE,
    IngestSubjects,
    Update,
    decode_telemetry_rows,
)
from twinstore.bus.partitions import PartitionGroup, PullReader, lock_key
from twinstore.bus.streams import ensure_stream
from twinstore.model import rql
from twinstore.model.errors import (
    ConflictError,
    DittoError,
    InvalidInputError,
    JsonInvalidError,
    TooLargeError,
)
from twinstore.model.ids import validate_thing_id
from twinstore.model.partition import partition_of
from twinstore.model.thing import Merge
from twinstore.protocol import write_command
from twinstore.service import ThingService, splits_unit
from twinstore.store.journal import FencedError, Mark, Outcome, WriteRequest

__all__ = ["IngestWorker", "ensure_ingest_streams"]

log = logging.getLogger("twinstore.ingest")

REBALANCE_SECONDS = 2.0
ACK_WAIT_SECONDS = 60.0
IN_PROGRESS_SECONDS = 10.0
FETCH_TIMEOUT = 1.0
CONSUMER_API_TIMEOUT = 20.0  # longer than a JetStream cluster's elections (4-9 s each)
MAX_PAYLOAD_IN_REPORT = 1024

_key = lock_key  # the group's advisory-lock classes (tests look at the locks with it)

INIT_PROGRESS = """
INSERT INTO ingest_progress (consumer, source, seq, partition) VALUES ($1, '', 0, $2) ON CONFLICT DO NOTHING
"""
SELECT_PROGRESS = "SELECT source, seq FROM ingest_progress WHERE consumer = $1 AND partition = $2"


async def ensure_ingest_streams(
    js: nats.js.JetStreamContext, subjects: IngestSubjects, max_age_seconds: float, replicas: int = 1
) -> None:
    """Create or update the ingest stream (exactly the partition subjects) and the errors stream."""
    await ensure_stream(js, subjects.stream, subjects.all_subjects, max_age_seconds, replicas)
    await ensure_stream(js, subjects.errors_stream, [subjects.errors_subject], max_age_seconds, replicas)


class _Lost(Exception):
    pass


class _Gap(Exception):
    """Deliveries of the consumer went missing (see :meth:`_PartitionRun.contiguous`)."""


@dataclass
class _Unit:
    """Writes committed together, with the progress they move the partition to."""

    items: list[tuple[AuthContext, WriteRequest, rql.Node | None]] = field(default_factory=list)
    refs: list[tuple[int, int | None]] = field(default_factory=list)  # (message index, row)
    last_seq: int = 0
    sources: dict[str, int] = field(default_factory=dict)


@dataclass
class _Report:
    message: int  # index in the fetched batch
    row: int | None
    thing_id: str | None
    error: DittoError


@dataclass
class Stats:
    """Counters of one worker (the metrics endpoint and the benchmark read them)."""

    applied: int = 0  # events committed
    messages: int = 0  # messages acknowledged or terminated
    duplicates: int = 0  # messages dropped as already applied
    refused: int = 0  # rows or messages reported on the errors subject
    batches: int = 0
    retries: int = 0  # database outages / conflicts waited out
    lag: dict[int, int] = field(default_factory=dict)  # partition -> messages pending
    redeliveries: dict[int, int] = field(default_factory=dict)  # partition -> messages seen again


class IngestWorker:
    """One member of the ingest group: claims partitions and applies them (see the module)."""

    def __init__(
        self,
        nc: NATS,
        service: ThingService,
        subjects: IngestSubjects,
        *,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        pool: asyncpg.Pool,
        sources: dict[str, list[str]],
        default_subjects: list[str],
        batch: int = 1000,
        max_rows: int = 10_000,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        # Making a partition's consumer (delete, create) is a request to the cluster's meta
        # leader, answered once the consumer's own leader is elected: during a server loss that
        # takes an election or two. Timed out sooner, the next attempt would delete the consumer
        # the server was still making and start over, again and again.
        self.admin = nc.jetstream(timeout=CONSUMER_API_TIMEOUT)
        self.service = service
        self.subjects = subjects
        self.connect = connect
        self.pool = pool
        self.auths = {name: AuthContext(subjects=tuple(s)) for name, s in sources.items()}
        self.default_auth = AuthContext(subjects=tuple(default_subjects)) if default_subjects else None
        self.batch = batch
        self.max_rows = max_rows
        self.stats = Stats()
        self.group = PartitionGroup(
            f"twinstore-ingest:{subjects.stream}",
            subjects.partitions,
            self._partition,
            connect=connect,
            rebalance_seconds=REBALANCE_SECONDS,
            label="ingest",
        )

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.group.start()

    async def stop(self) -> None:
        """Finish the batches in flight (committed and acknowledged), then give everything back."""
        await self.group.stop()

    @property
    def partitions(self) -> list[int]:
        return self.group.partitions

    # ---- one partition ------------------------------------------------------------------

    async def _partition(self, partition: int, stop: asyncio.Event) -> None:
        """Apply one partition until stopped or taken over (a fence); the group restarts it
        after a failure (NATS or database trouble)."""
        while not stop.is_set():
            try:
                await _PartitionRun(self, partition, stop).run()
                return
            except _Gap as gap:  # at once: the consumer is made again from the applied offset
                self.stats.retries += 1
                log.warning("ingest: %s", gap, extra={"partition": partition})
            except _Lost:
                log.warning("ingest: partition taken over elsewhere", extra={"partition": partition})
                return
            except Exception:
                self.stats.retries += 1
                raise

    def auth_of(self, source: str | None) -> AuthContext | None:
        if source is not None and source in self.auths:
            return self.auths[source]
        return self.default_auth


class _PartitionRun:
    """One claim of one partition: its consumer, its progress and the apply loop."""

    def __init__(self, worker: IngestWorker, partition: int, stop: asyncio.Event) -> None:
        self.w = worker
        self.partition = partition
        self.stop = stop
        self.consumer = f"{worker.subjects.stream}/{partition}"
        self.durable = f"ingest-{partition}"
        self.offset = 0
        self.delivered = 0  # the consumer sequence of the last delivery seen
        self.sources: dict[str, int] = {}
        self.valid_ids: set[str] = set()  # thing ids seen valid (telemetry repeats them)
        self.own_ids: set[str] = set()  # thing ids seen in this partition

    async def run(self) -> None:
        w = self.w
        async with w.pool.acquire() as con:
            await con.execute(INIT_PROGRESS, self.consumer, self.partition)
            for row in await con.fetch(SELECT_PROGRESS, self.consumer, self.partition):
                if row["source"] == "":
                    self.offset = int(row["seq"])
                else:
                    self.sources[row["source"]] = int(row["seq"])
        stream = w.subjects.stream
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await w.admin.delete_consumer(stream, self.durable)
        config = nats.js.api.ConsumerConfig(
            durable_name=self.durable,
            filter_subject=w.subjects.partition_subject(self.partition),
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE
            if self.offset > 0
            else nats.js.api.DeliverPolicy.ALL,
            opt_start_seq=self.offset + 1 if self.offset > 0 else None,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=max(4 * w.batch, 1000),
            max_deliver=-1,
        )
        await w.admin.add_consumer(stream, config)
        sub = await w.js.pull_subscribe_bind(self.durable, stream)
        reader = PullReader(sub, w.batch, FETCH_TIMEOUT)
        try:
            while not self.stop.is_set():
                msgs = await reader.next()
                if msgs:
                    whole = self.contiguous(msgs)
                    if whole:
                        await self.apply(msgs[:whole])
                    if whole < len(msgs):
                        raise _Gap(
                            f"deliveries {self.delivered + 1}..{msgs[whole].metadata.sequence.consumer - 1} "
                            "of the consumer never arrived: made again from the applied offset"
                        )
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def contiguous(self, msgs: list[Msg]) -> int:
        """How many of ``msgs`` follow the deliveries seen so far without a gap.

        JetStream numbers a consumer's deliveries 1, 2, 3, ... (redeliveries too). A gap means
        deliveries were lost on their way: their connection died, or their consumer's leader
        died as it sent them (a replicated stream's election). JetStream counts them delivered
        and sends them again only after ``ack_wait``; applying what came after them meanwhile
        would apply a thing's updates out of order, and the offset would then drop the late
        ones. So the partition applies up to the gap and makes its consumer again from the
        applied offset. A number lower than expected (a new leader numbering from the state it
        had) is taken as is: what it repeats is at or below the offset, and dropped.
        """
        for index, msg in enumerate(msgs):
            number = msg.metadata.sequence.consumer
            if number > self.delivered + 1:
                return index
            self.delivered = number
        return len(msgs)

    # ---- a batch ------------------------------------------------------------------------

    async def apply(self, msgs: list[Msg]) -> None:
        """Decode, commit (units in order), report refusals, then acknowledge."""
        w = self.w
        units: list[_Unit] = [_Unit()]
        reports: list[_Report] = []
        whole_refusals: set[int] = set()
        skipped = 0
        for index, msg in enumerate(msgs):
            meta = msg.metadata
            seq = meta.sequence.stream
            w.stats.lag[self.partition] = meta.num_pending
            if meta.num_delivered > 1:
                w.stats.redeliveries[self.partition] = w.stats.redeliveries.get(self.partition, 0) + 1
            unit = units[-1]
            if seq <= self.offset:
                skipped += 1
                continue
            unit.last_seq = seq
            headers = msg.headers or {}
            source = headers.get(SOURCE_HEADER)
            source_seq = _int(headers.get(SEQ_HEADER))
            if source is not None and source_seq is not None:
                known = max(unit.sources.get(source, 0), self._source_seq(units, source))
                if source_seq <= known:
                    skipped += 1
                    continue
                unit.sources[source] = source_seq
            try:
                writes = self._decode(msg, source)
            except DittoError as exc:
                reports.append(_Report(index, None, None, exc))
                whole_refusals.add(index)
                continue
            for row, (auth, request, condition) in writes:
                if isinstance(request, DittoError):
                    reports.append(_Report(index, row, None, request))
                    continue
                if request.thing_id not in self.own_ids:
                    if (wrong := self._other_partition(request.thing_id)) is not None:
                        reports.append(_Report(index, row, request.thing_id, wrong))
                        continue
                    if len(self.own_ids) > 100_000:
                        self.own_ids.clear()
                    self.own_ids.add(request.thing_id)
                unit.items.append((auth, request, condition))
                unit.refs.append((index, row))
                if splits_unit(request.command):
                    nxt = _Unit(last_seq=seq)
                    units.append(nxt)
                    unit = nxt
        w.stats.duplicates += skipped
        # What decoding refused is reported before the commit: once the commit moved the
        # partition past these messages they are never delivered again, so a crash between
        # commit and report would lose the report. A crash before the commit redelivers them
        # and reports again under the same Nats-Msg-Id, which JetStream drops.
        if reports:
            await self._report(msgs, reports, before_commit=True)
            reports = []
        in_progress = asyncio.create_task(self._keep_in_progress(msgs))
        try:
            for unit in units:
                if unit.last_seq <= self.offset and not unit.items:
                    continue
                outcomes = await self._commit(unit)
                for (index, row), item, outcome in zip(unit.refs, unit.items, outcomes, strict=True):
                    if isinstance(outcome, DittoError):
                        reports.append(_Report(index, row, item[1].thing_id, outcome))
                    else:
                        w.stats.applied += 1
        finally:
            in_progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await in_progress
        if reports:  # refused by the commit (policy, precondition, size): known only now
            await self._report(msgs, reports)
        for index, msg in enumerate(msgs):
            with contextlib.suppress(Exception):  # a lost ack is a redelivery the offset drops
                if index in whole_refusals:
                    await msg.term()
                else:
                    await msg.ack()
        w.stats.messages += len(msgs)
        w.stats.batches += 1

    def _other_partition(self, thing_id: str) -> DittoError | None:
        """The refusal of a thing that is not in this partition (None if it is): committed here
        it would make a unit span journal partitions and be applied beside, not in order with,
        the thing's messages on its own subject."""
        partitions = self.w.subjects.partitions
        partition = partition_of(thing_id, partitions)
        if partition == self.partition:
            return None
        return InvalidInputError(
            f"The thing {thing_id!r} is in partition {partition} of {partitions}, not in "
            f"{self.partition} (this subject's): the publisher counts partitions differently.",
            error="ingest:thing.wrongPartition",
            description=f"Configure the publisher with the server's partition count ({partitions}; "
            "adapters: the `partitions` key).",
        )

    def _source_seq(self, units: list[_Unit], source: str) -> int:
        for unit in reversed(units):
            if source in unit.sources:
                return unit.sources[source]
        return self.sources.get(source, 0)

    def _decode(
        self, msg: Msg, source: str | None
    ) -> list[tuple[int | None, tuple[AuthContext, WriteRequest | DittoError, rql.Node | None]]]:
        """The writes of one message (row index for telemetry); a refused whole message raises."""
        auth = self.w.auth_of(source)
        if auth is None:
            raise InvalidInputError(
                f"The source {source!r} is not configured (ingest_sources) and no "
                "ingest_default_subjects are set.",
                error="ingest:source.unknown",
            )
        headers = msg.headers or {}
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type not in (COMMAND_TYPE, TELEMETRY_TYPE, ""):
            raise InvalidInputError(
                f"The content type {content_type!r} is not ingested "
                f"(use {COMMAND_TYPE} or {TELEMETRY_TYPE}).",
                error="mediatype.unsupported",
            )
        try:
            if content_type == TELEMETRY_TYPE or (content_type == "" and msg.data[:11] == b'{"updates":'):
                rows = decode_telemetry_rows(msg.data)
                if len(rows) > self.w.max_rows:
                    raise TooLargeError(
                        f"The telemetry message has {len(rows)} rows; at most {self.w.max_rows} are "
                        "ingested from one message.",
                        error="ingest:message.tooLarge",
                        description="Send fewer rows per message (setting ingest_max_rows_per_message).",
                    )
                kept = {"source": source, "source-seq": headers.get(SEQ_HEADER, "")} if source else {}
                if len(self.valid_ids) > 100_000:
                    self.valid_ids.clear()
                valid = self.valid_ids
                return [(i, (auth, _telemetry_write(u, auth, kept, valid), None)) for i, u in enumerate(rows)]
            envelope = orjson.loads(msg.data)
        except (msgspec.DecodeError, orjson.JSONDecodeError) as exc:
            raise JsonInvalidError(f"The message could not be decoded: {exc}") from None
        request, condition = write_command(envelope, auth.subject)
        if source:
            request.headers = {"source": source, "source-seq": headers.get(SEQ_HEADER, "")}
        return [(None, (auth, request, condition))]

    async def _commit(self, unit: _Unit) -> list[Outcome]:
        """Commit a unit and its mark, waiting out outages; :class:`_Lost` when fenced."""
        delay = 0.2
        mark = Mark(
            consumer=self.consumer,
            partition=self.partition,
            expected=self.offset,
            seq=unit.last_seq,
            sources=unit.sources,
        )
        while True:
            try:
                outcomes = await self.w.service.write_unit(unit.items, mark)
            except FencedError as exc:
                raise _Lost() from exc
            except ConflictError:
                self.w.stats.retries += 1  # a policy changed under the unit: prepare it again
                await asyncio.sleep(0.05)
                continue
            except (DittoError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # 503 (unreachable / failed commit) and connection errors: pause, then retry.
                self.w.stats.retries += 1
                log.warning(
                    "ingest: commit failed, retrying",
                    extra={"partition": self.partition, "error": str(exc), "retry_in": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.offset = unit.last_seq
            self.sources.update(unit.sources)
            return outcomes

    async def _keep_in_progress(self, msgs: list[Msg]) -> None:
        """Tell JetStream the batch is being worked on (a long outage must not redeliver it)."""
        while True:
            await asyncio.sleep(IN_PROGRESS_SECONDS)
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _report(self, msgs: list[Msg], reports: list[_Report], *, before_commit: bool = False) -> None:
        w = self.w
        for report in reports:
            msg = msgs[report.message]
            seq = msg.metadata.sequence.stream
            headers = msg.headers or {}
            body = {
                "reason": report.error.message,
                "error": report.error.to_dict(),
                "stream": w.subjects.stream,
                "sequence": seq,
                "subject": msg.subject,
                "msgId": headers.get("Nats-Msg-Id"),
                "source": headers.get(SOURCE_HEADER),
                "sourceSeq": _int(headers.get(SEQ_HEADER)),
                "row": report.row,
                "thingId": report.thing_id,
                "payload": msg.data[:MAX_PAYLOAD_IN_REPORT].decode(errors="replace"),
                "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            }
            report_id = f"{w.subjects.stream}:{seq}:{'' if report.row is None else report.row}"
            w.stats.refused += 1
            fields = {k: body[k] for k in ("reason", "sequence", "source", "row")}
            log.info("ingest: refused", extra={"thing_id": report.thing_id, **fields})
            for attempt in range(5):
                try:
                    await w.js.publish(
                        w.subjects.errors_subject, orjson.dumps(body), headers={"Nats-Msg-Id": report_id}
                    )
                    break
                except Exception as exc:  # NATS away: the refusal is logged above; retry a little
                    if attempt == 4:
                        if before_commit:  # nothing committed: the batch is delivered again
                            raise
                        log.error("ingest: could not publish a refusal", extra={"error": repr(exc)})
                    await asyncio.sleep(0.2 * (attempt + 1))


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _telemetry_write(
    update: Update | msgspec.ValidationError, auth: AuthContext, kept: dict[str, str], valid_ids: set[str]
) -> WriteRequest | DittoError:
    """A telemetry row as a merge at its path, its source timestamp and quality kept as headers."""
    if isinstance(update, msgspec.ValidationError):
        return JsonInvalidError(
            f"The row is not [thingId, path, value, sourceTimestampMs, quality]: {update}.",
        )
    thing_id = update.thing_id
    try:
        if thing_id not in valid_ids:
            valid_ids.add(validate_thing_id(thing_id))
        if not isinstance(update.path, str) or not update.path.startswith("/") or update.path == "/":
            raise InvalidInputError(
                f"A telemetry row's path must point inside the thing, not {update.path!r}.",
                error="json.pointer.invalid",
            )
    except DittoError as exc:
        return exc
    headers = dict(kept)
    if update.ts is not None:
        try:
            when = datetime.fromtimestamp(update.ts / 1000, UTC)
        except (ValueError, OverflowError, OSError):  # before year 1 or after 9999: not a time
            return InvalidInputError(
                "The row's sourceTimestampMs is not a time between the years 1 and 9999.",
                error="json.invalid",
            )
        headers["source-timestamp"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if update.quality is not None:
        headers["source-quality"] = str(update.quality)
    return WriteRequest(
        thing_id=thing_id,
        command=Merge(path=update.path, value=update.value),
        originator=auth.subject,
        correlation_id=None,
        headers=headers or None,
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000
