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

Truncating the newest events of an entity leaves a valid chain; only checkpoints catch that.

Checkpoints (``twinstore audit checkpoint``, :func:`checkpoint_database`) seal the chain
heads: in one snapshot the newest event of every entity (entity, id, revision, hash) and the
highest journal position are read and stored in ``audit_checkpoints`` with a Merkle root:

* heads are sorted by ``(entity, id)`` in code-point order (Python string order, not the
  database collation);
* a leaf is ``sha256(0x00 || f(entity) || f(id) || revision as 8-byte big-endian || hash)``
  where ``f(s)`` is the UTF-8 bytes of ``s`` preceded by their length as 4-byte big-endian;
* an inner node is ``sha256(0x01 || left || right)``; a level with an odd count carries its
  last node up unchanged; the root of no heads is ``sha256(b"")``;
* with ``audit_signing_key`` (a PEM Ed25519 private key) the checkpoint is signed over
  ``b"twinstore-checkpoint-v1" || journal_position as 8-byte big-endian || root``; ``key_id``
  is the first 16 hex digits of the sha-256 of the raw public key.

:func:`verify_database` then checks the latest checkpoint (or all): every recorded head must
still be in the journal with the same hash at that revision (``truncated`` when the revision
is gone, ``rewritten`` when its hash differs), the root must recompute from the heads and the
signature must verify with the configured key (``checkpoint-invalid`` otherwise; without a
key the signature is not checked).

>>> merkle_root([]) == hashlib.sha256(b"").digest()
True
>>> merkle_root([("thing", "a:b", 1, GENESIS)]) == leaf("thing", "a:b", 1, GENESIS)
True

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

import hashlib
import json
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from twinstore.store.codec import GENESIS, chain_hash

__all__ = [
    "Break",
    "Checkpoint",
    "Report",
    "Row",
    "Scope",
    "checkpoint_database",
    "leaf",
    "merkle_root",
    "verify",
    "verify_database",
]

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
    headers: str | None = None  # JSON text of the event's kept headers (ingested events)


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
    checkpoints: int = 0  # checkpoints checked

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
            "checkpoints": self.checkpoints,
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
        None if row.headers is None else orjson.loads(row.headers),
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
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash,
       headers::text AS headers
FROM journal{where} ORDER BY entity, id, revision
"""


async def verify_database(
    url: str,
    scope: Scope = Scope(),
    *,
    on_total: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    prefetch: int = 2000,
    checkpoints: str = "latest",
    signing_key: str | None = None,
) -> Report:
    """Verify the journal at ``url``, streamed through a server-side cursor in one snapshot.

    ``checkpoints`` is ``"latest"``, ``"all"`` or ``"none"``: which checkpoints are checked
    (their heads within ``scope``); ``signing_key`` (PEM Ed25519 private key path) checks
    their signatures.
    """
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

            report = await verify(rows(), progress=progress)
            if checkpoints != "none":
                started = time.monotonic()
                await _check_checkpoints(con, report, scope, checkpoints == "all", signing_key)
                report.seconds += time.monotonic() - started
            return report
    finally:
        await con.close()


# ---- checkpoints ----------------------------------------------------------------------------

SIGNED_PREFIX = b"twinstore-checkpoint-v1"

Head = tuple[str, str, int, bytes]  # entity, id, revision, hash of the newest event


def _field(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def leaf(entity: str, id: str, revision: int, hash: bytes) -> bytes:
    """The Merkle leaf of one chain head (see the module docstring)."""
    return hashlib.sha256(b"\x00" + _field(entity) + _field(id) + struct.pack(">q", revision) + hash).digest()


def merkle_root(heads: Sequence[Head]) -> bytes:
    """The Merkle root of chain heads, sorted here by ``(entity, id)``."""
    level = [leaf(*h) for h in sorted(heads, key=lambda h: (h[0], h[1]))]
    if not level:
        return hashlib.sha256(b"").digest()
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _signed_message(journal_position: int, root: bytes) -> bytes:
    return SIGNED_PREFIX + struct.pack(">q", journal_position) + root


def load_signing_key(path: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file ``path``."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(path, "rb") as fh:
        key = load_pem_private_key(fh.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"audit_signing_key: {path} is not an Ed25519 private key")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    id: int
    created: datetime
    journal_position: int
    heads: int
    root: bytes
    key_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created.isoformat(),
            "journal_position": self.journal_position,
            "heads": self.heads,
            "root": self.root.hex(),
            "key_id": self.key_id,
        }


SELECT_HEADS = """
SELECT DISTINCT ON (entity, id) entity, id, revision, hash FROM journal ORDER BY entity, id, revision DESC
"""


async def checkpoint_database(url: str, *, signing_key: str | None = None) -> Checkpoint:
    """Seal the chain heads of the journal at ``url`` (one snapshot) in a new checkpoint."""
    private = load_signing_key(signing_key) if signing_key else None
    con = await asyncpg.connect(url)
    try:
        async with con.transaction(isolation="repeatable_read"):
            position = int(await con.fetchval("SELECT coalesce(max(position), 0) FROM journal"))
            heads: list[Head] = [(r[0], r[1], int(r[2]), bytes(r[3])) for r in await con.fetch(SELECT_HEADS)]
            heads.sort(key=lambda h: (h[0], h[1]))
            root = merkle_root(heads)
            signature = kid = None
            if private is not None:
                signature = private.sign(_signed_message(position, root))
                kid = key_id(private.public_key())
            stored = json.dumps([[e, i, r, h.hex()] for e, i, r, h in heads], separators=(",", ":"))
            row = await con.fetchrow(
                "INSERT INTO audit_checkpoints (journal_position, heads, root, signature, key_id) "
                "VALUES ($1, $2::jsonb, $3, $4, $5) RETURNING id, created",
                position,
                stored,
                root,
                signature,
                kid,
            )
            assert row is not None
            return Checkpoint(row["id"], row["created"], position, len(heads), root, kid)
    finally:
        await con.close()


def _in_scope(scope: Scope, entity: str, id: str) -> bool:
    if scope.thing is not None:
        return entity == "thing" and id == scope.thing
    if scope.entity is not None and entity != scope.entity:
        return False
    return scope.namespace is None or id.startswith(scope.namespace + ":")


CHECK_HEADS = """
SELECT h.entity, h.id, h.revision, j.hash,
       (SELECT max(k.revision) FROM journal k WHERE k.entity = h.entity AND k.id = h.id) AS newest
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS h(entity, id, revision)
LEFT JOIN journal j ON j.entity = h.entity AND j.id = h.id AND j.revision = h.revision
"""


async def _check_checkpoints(
    con: asyncpg.Connection, report: Report, scope: Scope, every: bool, signing_key: str | None
) -> None:
    public = load_signing_key(signing_key).public_key() if signing_key else None
    exists = await con.fetchval("SELECT to_regclass('audit_checkpoints') IS NOT NULL")
    if not exists:
        return
    query = (
        "SELECT id, journal_position, heads::text AS heads, root, signature, key_id FROM audit_checkpoints"
    )
    query += " ORDER BY id" if every else " ORDER BY id DESC LIMIT 1"
    broken: set[tuple[str, str]] = {(b.entity, b.id) for b in report.breaks}
    for cp in await con.fetch(query):
        report.checkpoints += 1
        name = str(cp["id"])

        def invalid(detail: str, name: str = name) -> None:
            report.breaks.append(Break("checkpoint", name, 0, "checkpoint-invalid", detail))

        heads: list[Head] = [(e, i, int(r), bytes.fromhex(h)) for e, i, r, h in json.loads(cp["heads"])]
        root = bytes(cp["root"])
        if merkle_root(heads) != root:
            invalid("the Merkle root does not recompute from the recorded heads")
        if public is not None:
            from cryptography.exceptions import InvalidSignature

            if cp["signature"] is None:
                invalid("the checkpoint is not signed")
            elif cp["key_id"] != key_id(public):
                invalid(f"signed with key {cp['key_id']}, not the configured key {key_id(public)}")
            else:
                try:
                    public.verify(bytes(cp["signature"]), _signed_message(cp["journal_position"], root))
                except InvalidSignature:
                    invalid("the signature does not verify")
        mine = [h for h in heads if _in_scope(scope, h[0], h[1])]
        rows = await con.fetch(CHECK_HEADS, [h[0] for h in mine], [h[1] for h in mine], [h[2] for h in mine])
        recorded = {(h[0], h[1], h[2]): h[3] for h in mine}
        for r in rows:
            entity, id, revision = r["entity"], r["id"], int(r["revision"])
            if r["hash"] is None:
                newest = r["newest"]
                now = "no events remain" if newest is None else f"the newest revision is now {newest}"
                b = Break(
                    entity,
                    id,
                    revision,
                    "truncated",
                    f"revision {revision} sealed in checkpoint {name} is gone ({now})",
                )
            elif bytes(r["hash"]) != recorded[(entity, id, revision)]:
                b = Break(
                    entity,
                    id,
                    revision,
                    "rewritten",
                    f"the hash differs from the one sealed in checkpoint {name}",
                )
            else:
                continue
            report.breaks.append(b)
            if (entity, id) not in broken:
                broken.add((entity, id))
                report.broken_entities += 1
