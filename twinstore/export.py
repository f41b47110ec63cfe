"""``twinstore export`` / ``twinstore import``: journal events as NDJSON, and back.

Export streams the journal rows of a :class:`~twinstore.audit.Scope` (optionally a time range)
ordered by ``(entity, id, revision)`` through a server-side cursor in one snapshot, one line per
event: for things the Ditto Protocol event envelope (:func:`twinstore.bus.envelope.event_envelope`),
for policies a similar envelope with a ``policies`` topic, each plus an ``_audit`` object holding
the exact journal row (value as the stored canonical JSON text, hash as hex).

Import loads such a file, read in batches, into an empty store: the rows are inserted exactly
(same hashes), then the projections are rebuilt with :func:`twinstore.replay.replay_database`
(``repair``) and the chains verified with :func:`twinstore.audit.verify_database`.

>>> policy_envelope({"id": "org.acme:p", "revision": 1, "action": "created", "path": "/",
...     "value": None, "originator": "nginx:ditto", "correlation_id": None,
...     "ts": "2026-01-01T00:00:00Z"})["topic"]
'org.acme/p/policies/events/created'
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

import asyncpg
import orjson

from twinstore.audit import Report as AuditReport
from twinstore.audit import Scope, verify_database
from twinstore.replay import Report as ReplayReport
from twinstore.replay import replay_database
from twinstore.store import connection
from twinstore.store.recorder import Recorder
from twinstore.store.schema import migrate, stored_partitions

__all__ = [
    "ExportReport",
    "ImportReport",
    "JournalNotEmpty",
    "Scope",
    "export_database",
    "import_database",
]

BATCH = 1000
SELECT_HEADS = "SELECT partition, seq FROM partition_heads"
UPDATE_HEADS = """
UPDATE partition_heads h SET seq = m.seq FROM unnest($1::int[], $2::bigint[]) AS m(partition, seq)
WHERE h.partition = m.partition
"""
COLUMNS = (
    "entity",
    "id",
    "revision",
    "ts",
    "action",
    "path",
    "value",
    "originator",
    "correlation_id",
    "hash",
    "headers",
)
SELECT_ROWS = """
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash,
       headers::text AS headers
FROM journal{where} ORDER BY entity, id, revision
"""


class JournalNotEmpty(Exception):
    """Import refused: the target journal already holds events."""


@dataclass
class ExportReport:
    events: int = 0
    entities: int = 0
    seconds: float = 0.0


@dataclass
class ImportReport:
    events: int = 0
    things: int = 0
    policies: int = 0
    seconds: float = 0.0
    replay: ReplayReport | None = None
    audit: AuditReport | None = None

    @property
    def ok(self) -> bool:
        return self.replay is not None and self.replay.ok and self.audit is not None and self.audit.ok

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "things": self.things,
            "policies": self.policies,
            "replay": None if self.replay is None else self.replay.as_dict(),
            "audit": None if self.audit is None else self.audit.as_dict(),
            "seconds": round(self.seconds, 3),
        }


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def policy_envelope(audit: dict[str, Any]) -> dict[str, Any]:
    """A Ditto-Protocol-like event envelope of a policy event (built from its ``_audit`` object)."""
    namespace, _, name = audit["id"].partition(":")
    headers: dict[str, Any] = {"ditto-originator": audit["originator"], "response-required": False}
    if audit["correlation_id"] is not None:
        headers["correlation-id"] = audit["correlation_id"]
    envelope: dict[str, Any] = {
        "topic": f"{namespace}/{name}/policies/events/{audit['action']}",
        "headers": headers,
        "path": audit["path"],
        "revision": audit["revision"],
        "timestamp": audit["ts"],
    }
    if audit["action"] != "deleted" and audit["value"] is not None:
        envelope["value"] = orjson.loads(audit["value"])
    return envelope


# One line per event: datetimes are left to orjson (RFC 3339, exactly ``isoformat()`` with
# ``+00:00`` as ``Z``), the newline is appended by orjson.
_DUMPS_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE


def export_lines(rows: Iterable[asyncpg.Record | tuple[Any, ...]]) -> tuple[bytes, int]:
    r"""NDJSON lines (each with its newline) of journal rows in :data:`SELECT_ROWS` column order,
    and how many times the ``(entity, id)`` changes from one row to the next (the first row
    counts as a change).

    For things this is :func:`twinstore.bus.envelope.event_envelope` of the row's event, built
    inline (the export's hot loop: no Event, no isoformat per row), byte for byte:

    >>> from datetime import UTC, datetime
    >>> from twinstore.bus.envelope import event_envelope
    >>> from twinstore.store.journal import event_from_row
    >>> def reference(row):  # the definition (export's former per-row code)
    ...     r = dict(zip(COLUMNS, row))
    ...     audit = {**r, "ts": _iso(r["ts"]), "hash": bytes(r["hash"]).hex()}
    ...     if r["headers"] is None:
    ...         del audit["headers"]
    ...     else:
    ...         audit["headers"] = orjson.loads(r["headers"])
    ...     thing = r["entity"] == "thing"
    ...     envelope = event_envelope(event_from_row(r)) if thing else policy_envelope(audit)
    ...     envelope["_audit"] = audit
    ...     return orjson.dumps(envelope) + b"\n"
    >>> rows = [("thing", "org.acme:pump", 1, datetime(2026, 1, 1, tzinfo=UTC), "created", "/",
    ...          '{"attributes":{"a":1}}', "nginx:ditto", None, b"\x01" * 32, None),
    ...         ("thing", "org.acme:pump", 2, datetime(2026, 1, 1, 0, 0, 1, 5, tzinfo=UTC),
    ...          "modified", "/attributes/a", "2.5", "nginx:ditto", "corr-1", b"\x02" * 32,
    ...          '{"source": "plc", "source-quality": "Good"}'),
    ...         ("thing", "org.acme:pump", 3, datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    ...          "deleted", "/", None, "nginx:bob", None, b"\x03" * 32, None),
    ...         ("thing", "org.acme:valve", 1, datetime(2026, 1, 3, tzinfo=UTC), "created", "/",
    ...          "{}", "nginx:ditto", "c", b"\x04" * 32, None),
    ...         ("policy", "org.acme:valve", 1, datetime(2026, 1, 3, tzinfo=UTC), "created", "/",
    ...          '{"entries":{}}', "nginx:ditto", None, b"\x05" * 32, None)]
    >>> lines, entities = export_lines(rows)
    >>> lines == b"".join(reference(row) for row in rows), entities
    (True, 3)
    >>> orjson.loads(export_lines(rows[1:2])[0])["timestamp"]
    '2026-01-01T00:00:01.000005Z'
    """
    dumps, loads = orjson.dumps, orjson.loads
    out: list[bytes] = []
    entities = 0
    last_entity = last_id = None
    for entity, id_, revision, ts, action, path, value, originator, correlation_id, hash_, kept in rows:
        if id_ != last_id or entity != last_entity:
            entities += 1
            last_entity, last_id = entity, id_
        audit = {
            "entity": entity,
            "id": id_,
            "revision": revision,
            "ts": ts,
            "action": action,
            "path": path,
            "value": value,
            "originator": originator,
            "correlation_id": correlation_id,
            "hash": hash_.hex(),
        }
        if kept is not None:  # an event's kept headers (ingested values), hashed with the row
            audit["headers"] = kept = loads(kept) if isinstance(kept, str) else kept
        if entity == "thing":
            headers: dict[str, Any] = {"ditto-originator": originator, "response-required": False}
            if correlation_id is not None:
                headers["correlation-id"] = correlation_id
            if kept:
                headers.update(kept)
            namespace, _, name = id_.partition(":")
            envelope: dict[str, Any] = {
                "topic": f"{namespace}/{name}/things/twin/events/{action}",
                "headers": headers,
                "path": path,
                "revision": revision,
                "timestamp": ts,
            }
            if action != "deleted":
                envelope["value"] = None if value is None else loads(value)
        else:
            envelope = policy_envelope({**audit, "ts": _iso(ts)})
        envelope["_audit"] = audit
        out.append(dumps(envelope, option=_DUMPS_OPTIONS))
    return b"".join(out), entities


def _where(scope: Scope, since: datetime | None, until: datetime | None) -> tuple[str, list[Any]]:
    where, args = scope.where()
    clauses = [where.removeprefix(" WHERE ")] if where else []
    if since is not None:
        args.append(since)
        clauses.append(f"ts >= ${len(args)}")
    if until is not None:
        args.append(until)
        clauses.append(f"ts <= ${len(args)}")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


async def export_database(
    url: str,
    out: IO[bytes],
    scope: Scope | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    prefetch: int = 2000,
) -> ExportReport:
    """Write the journal events of ``scope`` (and time range) at ``url`` to ``out`` as NDJSON."""
    scope = scope or Scope()
    report = ExportReport()
    started = time.monotonic()
    where, args = _where(scope, since, until)
    con = await connection.connect(url)
    try:
        async with con.transaction(isolation="repeatable_read", readonly=True):
            if on_total is not None:
                on_total(int(await con.fetchval(f"SELECT count(*) FROM journal{where}", *args)))
            cursor = await con.cursor(SELECT_ROWS.format(where=where), *args)
            last: tuple[str, str] | None = None
            # PostgreSQL reads the next batch while this process encodes the current one
            pending = asyncio.ensure_future(cursor.fetch(prefetch))
            try:
                while rows := await pending:
                    pending = asyncio.ensure_future(cursor.fetch(prefetch))
                    await asyncio.sleep(0)  # sends the request for the next batch
                    lines, entities = export_lines(rows)
                    # a chain continued across two fetches is one entity
                    report.entities += entities - (last == (rows[0]["entity"], rows[0]["id"]))
                    last = (rows[-1]["entity"], rows[-1]["id"])
                    out.write(lines)
                    report.events += len(rows)
                    if progress is not None:
                        progress(len(rows))
            finally:  # on an error (say, a full disk) the fetch in flight ends before the transaction
                await asyncio.gather(pending, return_exceptions=True)
    finally:
        await con.close()
    out.flush()
    report.seconds = time.monotonic() - started
    return report


def _record(audit: dict[str, Any]) -> tuple[Any, ...]:
    return (
        audit["entity"],
        audit["id"],
        int(audit["revision"]),
        datetime.fromisoformat(audit["ts"]),
        audit["action"],
        audit["path"],
        audit["value"],
        audit["originator"],
        audit["correlation_id"],
        bytes.fromhex(audit["hash"]),
        None if audit.get("headers") is None else orjson.dumps(audit["headers"]).decode(),
    )


async def _batches(lines: Iterable[bytes], size: int) -> AsyncIterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            audit = orjson.loads(line)["_audit"]
            batch.append(_record(audit))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number}: not an exported event ({exc})") from exc
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def import_database(
    url: str,
    lines: Iterable[bytes],
    *,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH,
) -> ImportReport:
    """Load exported lines into the empty store at ``url``, rebuild the projections, verify.

    Raises :class:`JournalNotEmpty` (nothing written) when the journal holds any event.
    """
    report = ImportReport()
    started = time.monotonic()
    con = await connection.connect(url)
    try:
        await migrate(con)
        recorder = Recorder(await stored_partitions(con))
        async with con.transaction():
            await recorder.lock_all(con)
            if await con.fetchval("SELECT EXISTS (SELECT 1 FROM journal)"):
                raise JournalNotEmpty("the journal is not empty: import needs an empty store")
            # After the partitions' heads (not 0: a store emptied by hand keeps them, and relay
            # cursors may stand there).
            heads = {r["partition"]: r["seq"] for r in await con.fetch(SELECT_HEADS)}
            seen: tuple[str, str] | None = None
            async for batch in _batches(lines, batch_size):
                # Each partition numbers its events in the order of the file.
                placed = []
                for row in batch:
                    partition = recorder.partition(row[1])
                    heads[partition] += 1
                    placed.append((*row, partition, heads[partition]))
                await con.copy_records_to_table(
                    "journal", records=placed, columns=(*COLUMNS, "partition", "seq")
                )
                for record in batch:
                    if (record[0], record[1]) != seen:
                        seen = (record[0], record[1])
                        if record[0] == "thing":
                            report.things += 1
                        else:
                            report.policies += 1
                report.events += len(batch)
                if progress is not None:
                    progress(len(batch))
            await con.execute(UPDATE_HEADS, list(heads), list(heads.values()))
    finally:
        await con.close()
    report.replay = await replay_database(url, repair=True)
    report.audit = await verify_database(url)
    report.seconds = time.monotonic() - started
    return report
