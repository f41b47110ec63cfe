"""``twinstore audit verify``: recompute the journal's hash chains and name where they break.

Every journal row's ``hash`` is ``chain_hash(previous hash of the same entity, row)``
(``twinstore/store/codec.py``). :func:`verify` walks rows ordered by ``(entity, id,
revision)`` (an async iterator, so the journal is streamed, never loaded whole) and checks
each *link* on its own: the row's stored hash must equal the hash recomputed from its
content and the stored hash of the row before it (``GENESIS`` for revision 1). Checking
links against the stored hashes keeps one tampered row from making every later row look
broken, and lets the kind of break be told:

* ``missing``: a revision gap (a deleted event);
* ``duplicated``: a row carries the stored hash of another row of the entity (a copied event);
* ``reordered``: a row's hash is that of the event written as another revision (swapped or
  renumbered revisions);
* ``edited``: the content no longer matches the row's hash while the next row still links to
  that hash;
* ``mismatch``: the content does not match its hash and nothing more can be said (an edited
  last event, or an inserted/forged one).

Truncating the newest events of an entity leaves a valid chain; only checkpoints (later)
catch that.

>>> import asyncio
>>> from datetime import datetime, UTC
>>> ts = datetime(2026, 1, 1, tzinfo=UTC)
>>> h1 = chain_hash(GENESIS, "thing", "a:b", 1, ts, "created", "/", b'{}', "s", None)
>>> rows = [Row("thing", "a:b", 1, ts, "created", "/", "{}", "s", None, h1)]
>>> async def stream(rows):
...     for r in rows:
...         yield r
>>> asyncio.run(verify(stream(rows))).ok
True
>>> bad = [rows[0]._replace(value='{"x":1}')]
>>> [str(b) for b in asyncio.run(verify(stream(bad))).breaks]
['thing a:b revision 1: mismatch: the content does not match its hash (edited, or an inserted/forged event)']
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from twinstore.store.codec import GENESIS, chain_hash

__all__ = ["Break", "Report", "Row", "Scope", "verify", "verify_database"]

# How far (in revisions) a reordered event is looked for around the place it is found.
WINDOW = 8
# Rows of one entity whose link fails that are kept for diagnosis (the rest are counted).
MAX_FAILURES = 100


class Row(NamedTuple):
    """One journal row as stored (``value`` is the exact JSON text that was hashed)."""

    entity: str
    id: str
    revision: int
    ts: datetime
    action: str
    path: str
    value: str | None
    originator: str
    correlation_id: str | None
    hash: bytes


@dataclass(frozen=True)
class Break:
    """Where a chain breaks and why."""

    entity: str
    id: str
    revision: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.entity} {self.id} revision {self.revision}: {self.kind}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity,
            "id": self.id,
            "revision": self.revision,
            "kind": self.kind,
            "detail": self.detail,
        }


@dataclass
class Report:
    entities: int = 0
    events: int = 0
    broken_entities: int = 0
    breaks: list[Break] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.breaks

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entities": self.entities,
            "events": self.events,
            "broken_entities": self.broken_entities,
            "breaks": [b.as_dict() for b in self.breaks],
            "seconds": round(self.seconds, 3),
        }


def _hash(previous: bytes, row: Row, revision: int | None = None) -> bytes:
    return chain_hash(
        previous,
        row.entity,
        row.id,
        row.revision if revision is None else revision,
        row.ts,
        row.action,
        row.path,
        None if row.value is None else row.value.encode(),
        row.originator,
        row.correlation_id,
    )


class _Entity:
    """The rows of one entity seen so far: stored hashes and the links that failed."""

    def __init__(self, first: Row) -> None:
        self.entity = first.entity
        self.id = first.id
        self.last: Row | None = None
        self.stored: dict[int, bytes] = {}  # revision -> stored hash
        self.by_hash: dict[bytes, int] = {}  # stored hash -> first revision carrying it
        self.failed: list[Row] = []  # rows whose link failed, diagnosed at the end
        self.links_ok: dict[int, bool] = {}  # revision -> its link to the row before holds
        self.breaks: list[Break] = []

    def _break(self, revision: int, kind: str, detail: str) -> None:
        self.breaks.append(Break(self.entity, self.id, revision, kind, detail))

    def add(self, row: Row) -> None:
        stored = bytes(row.hash)
        last = self.last
        expected_revision = 1 if last is None else last.revision + 1
        if last is not None and row.revision == last.revision:
            self._break(row.revision, "duplicated", "the revision occurs more than once")
        elif row.revision > expected_revision:
            missing = (
                f"revision {expected_revision} is missing"
                if row.revision == expected_revision + 1
                else f"revisions {expected_revision}..{row.revision - 1} are missing"
            )
            self._break(expected_revision, "missing", f"{missing} (deleted event)")
            # The predecessor is gone, so this row's link cannot be checked.
        else:
            previous = GENESIS if last is None else bytes(last.hash)
            ok = _hash(previous, row) == stored
            self.links_ok[row.revision] = ok
            if not ok:
                if stored in self.by_hash:
                    first = self.by_hash[stored]
                    self._break(
                        row.revision,
                        "duplicated",
                        f"the event is a copy of revision {first} (same hash)",
                    )
                elif len(self.failed) < MAX_FAILURES:
                    self.failed.append(row)
                else:
                    self._break(row.revision, "mismatch", "the content does not match its hash")
        self.stored.setdefault(row.revision, stored)
        self.by_hash.setdefault(stored, row.revision)
        self.last = row

    def _written_as(self, row: Row) -> tuple[int, int | None] | None:
        """(revision the row was written as, revision holding its predecessor) if found near it."""
        stored = bytes(row.hash)
        near = range(max(1, row.revision - WINDOW), row.revision + WINDOW + 1)
        for k in near:
            candidates: list[tuple[bytes, int | None]] = [(GENESIS, None)] if k == 1 else []
            candidates += [(self.stored[j], j) for j in near if j in self.stored]
            for previous, j in candidates:
                if _hash(previous, row, k) == stored:
                    return k, j
        return None

    def finish(self) -> list[Break]:
        explained: dict[int, tuple[int, int | None]] = {}
        for row in self.failed:
            found = self._written_as(row)
            if found is not None:
                explained[row.revision] = found
        for row in self.failed:
            r = row.revision
            if r in explained:
                k, j = explained[r]
                if k != r:
                    self._break(r, "reordered", f"revision {r} holds the event written as revision {k}")
                elif not self.breaks and not any(e[0] != rr for rr, e in explained.items()):
                    where = "the start" if j is None else f"revision {j}"
                    self._break(r, "reordered", f"the event was chained after {where}, not revision {r - 1}")
                # else: intact content after a reordered/edited predecessor, reported there.
                continue
            nxt = self.links_ok.get(r + 1)
            if nxt:
                self._break(
                    r, "edited", "the content does not match its hash (the next event still links to it)"
                )
            elif explained.get(r + 1, (r + 1, None))[0] == r:
                self._break(r, "inserted", "an event was inserted here (the later events were renumbered)")
            else:
                self._break(
                    r, "mismatch", "the content does not match its hash (edited, or an inserted/forged event)"
                )
        self.breaks.sort(key=lambda b: b.revision)
        return self.breaks


async def verify(
    rows: AsyncIterator[Row],
    *,
    progress: Callable[[int], None] | None = None,
    every: int = 1000,
) -> Report:
    """Verify rows ordered by ``(entity, id, revision)``; ``progress(n)`` after each ``n`` rows."""
    report = Report()
    started = time.monotonic()
    current: _Entity | None = None
    pending = 0

    def close(entity: _Entity) -> None:
        breaks = entity.finish()
        if breaks:
            report.broken_entities += 1
            report.breaks.extend(breaks)

    async for row in rows:
        if current is None or (row.entity, row.id) != (current.entity, current.id):
            if current is not None:
                close(current)
            current = _Entity(row)
            report.entities += 1
        current.add(row)
        report.events += 1
        pending += 1
        if progress is not None and pending >= every:
            progress(pending)
            pending = 0
    if current is not None:
        close(current)
    if progress is not None and pending:
        progress(pending)
    report.seconds = time.monotonic() - started
    return report


@dataclass(frozen=True)
class Scope:
    """Which chains to verify (all by default)."""

    entity: str | None = None  # 'thing' or 'policy'
    thing: str | None = None
    namespace: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if self.thing is not None:
            args.append(self.thing)
            clauses.append(f"entity = 'thing' AND id = ${len(args)}")
        elif self.entity is not None:
            args.append(self.entity)
            clauses.append(f"entity = ${len(args)}")
        if self.namespace is not None:
            # A range on the primary key ("ns:" up to "ns;", ';' follows ':'): uses the index.
            args += [self.namespace + ":", self.namespace + ";"]
            clauses.append(f"id >= ${len(args) - 1} AND id < ${len(args)}")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


SELECT_ROWS = """
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash
FROM journal{where} ORDER BY entity, id, revision
"""


async def verify_database(
    url: str,
    scope: Scope = Scope(),
    *,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    prefetch: int = 2000,
) -> Report:
    """Verify the journal at ``url``, streamed through a server-side cursor in one snapshot."""
    con = await asyncpg.connect(url)
    try:
        where, args = scope.where()
        async with con.transaction(isolation="repeatable_read", readonly=True):
            if on_total is not None:
                on_total(int(await con.fetchval(f"SELECT count(*) FROM journal{where}", *args)))

            async def rows() -> AsyncIterator[Row]:
                cursor = con.cursor(SELECT_ROWS.format(where=where), *args, prefetch=prefetch)
                async for r in cursor:
                    yield Row(*r)

            return await verify(rows(), progress=progress)
    finally:
        await con.close()
