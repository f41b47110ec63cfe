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

import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

import asyncpg
import orjson

from twinstore.audit import Report as AuditReport
from twinstore.audit import Scope, verify_database
from twinstore.bus.envelope import event_envelope
from twinstore.replay import Report as ReplayReport
from twinstore.replay import replay_database
from twinstore.store.journal import event_from_row
from twinstore.store.schema import WRITE_LOCK, migrate

__all__ = [
    "ExportReport",
    "ImportReport",
    "JournalNotEmpty",
    "Scope",
    "export_database",
    "import_database",
]

BATCH = 1000
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
)
SELECT_ROWS = """
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash
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


def export_line(row: asyncpg.Record) -> bytes:
    """One NDJSON line (with the newline) of a journal row."""
    audit = {
        "entity": row["entity"],
        "id": row["id"],
        "revision": row["revision"],
        "ts": _iso(row["ts"]),
        "action": row["action"],
        "path": row["path"],
        "value": row["value"],
        "originator": row["originator"],
        "correlation_id": row["correlation_id"],
        "hash": bytes(row["hash"]).hex(),
    }
    thing = row["entity"] == "thing"
    envelope = event_envelope(event_from_row(row)) if thing else policy_envelope(audit)
    envelope["_audit"] = audit
    return orjson.dumps(envelope) + b"\n"


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
    con = await asyncpg.connect(url)
    try:
        async with con.transaction(isolation="repeatable_read", readonly=True):
            if on_total is not None:
                on_total(int(await con.fetchval(f"SELECT count(*) FROM journal{where}", *args)))
            last: tuple[str, str] | None = None
            chunk: list[bytes] = []
            async for row in con.cursor(SELECT_ROWS.format(where=where), *args, prefetch=prefetch):
                key = (row["entity"], row["id"])
                if key != last:
                    report.entities += 1
                    last = key
                chunk.append(export_line(row))
                report.events += 1
                if len(chunk) >= BATCH:
                    out.write(b"".join(chunk))
                    chunk.clear()
                    if progress is not None:
                        progress(BATCH)
            if chunk:
                out.write(b"".join(chunk))
                if progress is not None:
                    progress(len(chunk))
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
    con = await asyncpg.connect(url)
    try:
        await migrate(con)
        async with con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            if await con.fetchval("SELECT EXISTS (SELECT 1 FROM journal)"):
                raise JournalNotEmpty("the journal is not empty: import needs an empty store")
            seen: tuple[str, str] | None = None
            async for batch in _batches(lines, batch_size):
                await con.copy_records_to_table("journal", records=batch, columns=COLUMNS)
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
    finally:
        await con.close()
    report.replay = await replay_database(url, repair=True)
    report.audit = await verify_database(url)
    report.seconds = time.monotonic() - started
    return report
