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

History retention (``twinstore audit cleanup``, :mod:`twinstore.retention`) removes the oldest
events of things and leaves a chain *anchor* per entity in ``journal_retention``: the last
removed revision and its hash. A chain then starts at the anchor instead of GENESIS: the first
retained event must be the anchor's revision + 1 and link to the anchor's hash (the rows are
streamed with the entity's newest anchor merged in front of them, :func:`rows_query`). What is
detected and what is not:

* an edited, deleted, inserted or reordered retained event: as without retention (a deleted
  first retained event is ``missing``: the chain no longer starts right after the anchor);
* an edited anchor hash: the first retained event no longer links (``mismatch``/``edited``);
  a deleted anchor row: the chain starts after revision 1 (``missing``); an anchor without
  any event after it (the newest event is never removed): ``missing``; journal rows at or
  below the anchor: ``anchor``;
* a checkpoint that sealed the anchor's revision checks the anchor's hash (``rewritten``); one
  that sealed a revision removed by retention cannot be checked and is skipped;
* each cleanup run (``journal_cleanups``) records the per-partition bounds it respected
  (``partition_bounds``: the highest ``seq`` of each partition it could remove) and a digest
  that starts from those bounds (:func:`cleanup_seed`) and folds in the anchors it set, in
  order (:func:`anchor_leaf`, :func:`fold_anchor`), signed like checkpoints
  (:func:`cleanup_message`): an anchor edited, added, deleted or moved forward (to hide more
  removed events), or bounds raised, no longer recompute the digest (``cleanup-invalid``,
  checked when the whole journal is verified: no ``--thing`` / ``--namespace``), nor do bounds
  beyond the partition heads of the checkpoint the run names; the snapshot kept at an anchor
  (the state at the anchor's revision, which the removed events no longer prove) is sealed
  with it (``snapshot-altered``). Runs from before the partitioned journal have no bounds:
  their digest starts at GENESIS and their signature is the v1 one (:func:`cleanup_message`);
* not detected: without ``audit_signing_key`` someone able to write the database can recompute
  an unsigned digest (as an unsigned checkpoint root); keep the printed digests elsewhere. What
  the removed events were is, by design, no longer provable: only that the retained history
  continues the anchored one.

Checkpoints (``twinstore audit checkpoint``, :func:`checkpoint_database`) seal the chain
heads: in one REPEATABLE READ snapshot the newest event of every entity (entity, id, revision,
hash) and the head of every journal partition (``partition_heads``: its last ``seq``) are read
and stored in ``audit_checkpoints`` with a Merkle root. The partition heads are the checkpoint's
cut of the journal: commit order is per partition (:mod:`twinstore.store.recorder`), so "every
event the checkpoint saw" is "every event whose ``seq`` is at or below its partition's head",
and the heads read in the same snapshot are exactly the chains of those events (an append moves
its partition's head in the statement that inserts its events). The journal's global
``position`` is unique but not in commit order across partitions: an event with a lower
position may commit after the checkpoint, so ``max(position)`` says nothing about what was
sealed; it is still stored in ``journal_position`` for readers of the old column, and nothing
here relies on it.

* heads are sorted by ``(entity, id)`` in code-point order (Python string order, not the
  database collation);
* a leaf is ``sha256(0x00 || f(entity) || f(id) || revision as 8-byte big-endian || hash)``
  where ``f(s)`` is the UTF-8 bytes of ``s`` preceded by their length as 4-byte big-endian;
* an inner node is ``sha256(0x01 || left || right)``; a level with an odd count carries its
  last node up unchanged; the root of no heads is ``sha256(b"")``;
* the partition heads are stored (``audit_checkpoints.partition_heads``) and signed in their
  canonical JSON (:func:`canonical_vector`): an object of every partition number (a decimal
  string) to its head, in ascending partition order, without whitespace;
* with ``audit_signing_key`` (a PEM Ed25519 private key) the checkpoint is signed over
  ``b"twinstore-checkpoint-v2" || sha256(canonical partition heads) || root``
  (:func:`checkpoint_message`); ``key_id`` is the first 16 hex digits of the sha-256 of the raw
  public key. Checkpoints made before the journal had partitions have no partition heads and
  were signed over ``b"twinstore-checkpoint-v1" || journal_position as 8-byte big-endian ||
  root`` (then ``position`` was handed out in commit order, so it was their cut); they are
  still verified so. Dropping a v2 checkpoint's partition heads does not turn it into a valid
  v1 one: its signature was made over the v2 message.

:func:`verify_database` then checks the latest checkpoint (or all): every recorded head must
still be in the journal with the same hash at that revision (``truncated`` when the revision
is gone, ``rewritten`` when its hash differs), the root must recompute from the heads and the
signature must verify with the configured key (``checkpoint-invalid`` otherwise; without a
key the signature is not checked, so an unsigned checkpoint's partition heads are only as
trustworthy as the database).

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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from twinstore.store import connection
from twinstore.store.codec import GENESIS, chain_hash

__all__ = [
    "Break",
    "Checkpoint",
    "Report",
    "Row",
    "Scope",
    "Vector",
    "anchor_leaf",
    "canonical_vector",
    "checkpoint_database",
    "checkpoint_message",
    "cleanup_message",
    "cleanup_seed",
    "fold_anchor",
    "leaf",
    "merkle_root",
    "parse_vector",
    "row_hash",
    "signature_problem",
    "snapshot_digest",
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
    # A retention anchor (journal_retention), not an event: the chain continues from its hash
    # at revision + 1 (only entity, id, revision, ts and hash are meaningful).
    anchor: bool = False


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


def row_hash(previous: bytes, row: Row, revision: int | None = None) -> bytes:
    """The chain hash of ``row`` after ``previous`` (optionally as if written as ``revision``)."""
    return _hash(previous, row, revision)


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
        # Where the chain starts: revision 1 after GENESIS, or after a retention anchor.
        self.start = 1
        self.start_hash = GENESIS
        self.anchor: Row | None = None
        self.last: Row | None = None
        self.stored: dict[int, bytes] = {}  # revision -> stored hash
        self.by_hash: dict[bytes, int] = {}  # stored hash -> first revision carrying it
        self.failed: list[Row] = []  # rows whose link failed, diagnosed at the end
        self.links_ok: dict[int, bool] = {}  # revision -> its link to the row before holds
        self.breaks: list[Break] = []

    def _break(self, revision: int, kind: str, detail: str) -> None:
        self.breaks.append(Break(self.entity, self.id, revision, kind, detail))

    def add_anchor(self, anchor: Row) -> None:
        """The chain continues after ``anchor`` (rows arrive in revision order, so any row
        already seen is at or below it: cleanup removed those)."""
        if self.last is not None:
            self._break(
                self.last.revision,
                "anchor",
                f"revision {self.last.revision} is still in the journal although retention "
                f"removed revisions up to {anchor.revision}",
            )
        self.anchor = anchor
        self.start = anchor.revision + 1
        self.start_hash = bytes(anchor.hash)
        self.last = None

    def add(self, row: Row) -> None:
        if row.anchor:
            self.add_anchor(row)
            return
        stored = bytes(row.hash)
        last = self.last
        expected_revision = self.start if last is None else last.revision + 1
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
            previous = self.start_hash if last is None else bytes(last.hash)
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
        near = range(max(self.start, row.revision - WINDOW), row.revision + WINDOW + 1)
        for k in near:
            first = [(self.start_hash, None)] if k == self.start else []
            candidates: list[tuple[bytes, int | None]] = list(first)
            candidates += [(self.stored[j], j) for j in near if j in self.stored]
            for previous, j in candidates:
                if _hash(previous, row, k) == stored:
                    return k, j
        return None

    def finish(self) -> list[Break]:
        if self.anchor is not None and self.last is None:
            self._break(
                self.start,
                "missing",
                f"no event after the retention anchor at revision {self.anchor.revision} "
                "(cleanup never removes the newest event)",
            )
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
                    start = "the start" if self.anchor is None else "the retention anchor"
                    where = start if j is None else f"revision {j}"
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
        if row.anchor:
            continue
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
# The same rows with each entity's newest retention anchor (its current one) merged in front:
# both branches come from their primary keys (entity, id, revision) in order (a Merge Append),
# so the journal is still streamed, not sorted. {where} uses columns of either table.
NEWEST_ANCHOR = """NOT EXISTS (
    SELECT 1 FROM journal_retention n
    WHERE n.entity = r.entity AND n.id = r.id AND n.revision > r.revision)"""
SELECT_ROWS_ANCHORED = f"""
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash,
       headers::text AS headers, false AS anchor
FROM journal{{where}}
UNION ALL
SELECT entity, id, revision, ts, '', '', NULL, '', NULL, hash, NULL, true
FROM journal_retention r{{where}}{{glue}}{NEWEST_ANCHOR}
ORDER BY entity, id, revision
"""


async def has_retention(con: asyncpg.Connection) -> bool:
    """Whether the schema has the retention tables (an older one is verified without them)."""
    return bool(await con.fetchval("SELECT to_regclass('journal_retention') IS NOT NULL"))


def rows_query(where: str, retention: bool) -> str:
    """:data:`SELECT_ROWS`, with the newest retention anchors when ``retention``."""
    if not retention:
        return SELECT_ROWS.format(where=where)
    return SELECT_ROWS_ANCHORED.format(where=where, glue=" AND " if where else " WHERE ")


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
    con = await connection.connect(url)
    try:
        where, args = scope.where()
        async with con.transaction(isolation="repeatable_read", readonly=True):
            if on_total is not None:
                on_total(int(await con.fetchval(f"SELECT count(*) FROM journal{where}", *args)))

            retention = await has_retention(con)

            async def rows() -> AsyncIterator[Row]:
                cursor = con.cursor(rows_query(where, retention), *args, prefetch=prefetch)
                async for r in cursor:
                    yield Row(*r)

            report = await verify(rows(), progress=progress)
            started = time.monotonic()
            if checkpoints != "none":
                await _check_checkpoints(con, report, scope, checkpoints == "all", signing_key, retention)
            if retention:
                await _check_retention(con, report, scope, signing_key, prefetch)
            report.seconds += time.monotonic() - started
            return report
    finally:
        await con.close()


# ---- checkpoints ----------------------------------------------------------------------------

SIGNED_PREFIX_V1 = b"twinstore-checkpoint-v1"
SIGNED_PREFIX = b"twinstore-checkpoint-v2"

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


Vector = dict[int, int]  # partition -> seq


def canonical_vector(vector: Mapping[int, int]) -> bytes:
    """The canonical JSON of a vector of partition positions (what checkpoints and cleanup
    records sign): partitions as decimal keys in ascending order, no whitespace.

    >>> canonical_vector({10: 7, 2: 0, 0: 12})
    b'{"0":12,"2":0,"10":7}'
    """
    return b"{" + b",".join(b'"%d":%d' % (p, vector[p]) for p in sorted(vector)) + b"}"


def parse_vector(text: str) -> Vector:
    """A vector stored as a JSON object (``jsonb`` may reorder its keys); ``ValueError`` when it
    is not one of non-negative partitions to non-negative integers.

    >>> parse_vector('{"10": 7, "0": 12}')
    {0: 12, 10: 7}
    """
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    vector: Vector = {}
    for key, seq in data.items():
        if not key.isdigit() or type(seq) is not int or seq < 0:
            raise ValueError(f"not a partition and its position: {key!r}: {seq!r}")
        vector[int(key)] = seq
    return dict(sorted(vector.items()))


def checkpoint_message(
    root: bytes, partition_heads: Mapping[int, int] | None, journal_position: int = 0
) -> bytes:
    """What a checkpoint's signature signs: ``b"twinstore-checkpoint-v2" || sha256(canonical
    partition heads) || root``; for a checkpoint without partition heads (made before the
    journal had partitions) the v1 message ``b"twinstore-checkpoint-v1" || journal_position as
    8-byte big-endian || root``."""
    if partition_heads is None:
        return SIGNED_PREFIX_V1 + struct.pack(">q", journal_position) + root
    return SIGNED_PREFIX + hashlib.sha256(canonical_vector(partition_heads)).digest() + root


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


def signature_problem(
    public: Ed25519PublicKey, signature: bytes | None, kid: str | None, message: bytes, what: str
) -> str | None:
    """Why ``signature`` (of ``what``, made by key ``kid``) is not a valid signature of
    ``message`` by ``public``; ``None`` when it is."""
    from cryptography.exceptions import InvalidSignature

    if signature is None:
        return f"{what} is not signed"
    if kid != key_id(public):
        return f"signed with key {kid}, not the configured key {key_id(public)}"
    try:
        public.verify(bytes(signature), message)
    except InvalidSignature:
        return "the signature does not verify"
    return None


@dataclass(frozen=True)
class Checkpoint:
    id: int
    created: datetime
    journal_position: int  # max(position) then: for readers of the old column, not a cut
    heads: int
    root: bytes
    key_id: str | None
    partition_heads: Vector = field(default_factory=dict)  # the cut: each partition's last seq

    @property
    def events(self) -> int:
        """Events appended up to the cut (seqs are gapless per partition; retention removes
        some of them later)."""
        return sum(self.partition_heads.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created.isoformat(),
            "journal_position": self.journal_position,
            "partition_heads": {str(p): seq for p, seq in self.partition_heads.items()},
            "heads": self.heads,
            "root": self.root.hex(),
            "key_id": self.key_id,
        }


SELECT_HEADS = """
SELECT DISTINCT ON (entity, id) entity, id, revision, hash FROM journal ORDER BY entity, id, revision DESC
"""
SELECT_PARTITION_HEADS = "SELECT partition, seq FROM partition_heads ORDER BY partition"
INSERT_CHECKPOINT = """
INSERT INTO audit_checkpoints (journal_position, partition_heads, heads, root, signature, key_id)
VALUES ($1, $2::text::jsonb, $3::text::jsonb, $4, $5, $6) RETURNING id, created
"""


async def checkpoint_database(url: str, *, signing_key: str | None = None) -> Checkpoint:
    """Seal the chain heads and partition heads of the journal at ``url`` (one snapshot) in a
    new checkpoint."""
    private = load_signing_key(signing_key) if signing_key else None
    con = await connection.connect(url)
    try:
        async with con.transaction(isolation="repeatable_read"):
            # One snapshot: the partition heads are the cut, the chain heads what it contains.
            vector: Vector = {int(r[0]): int(r[1]) for r in await con.fetch(SELECT_PARTITION_HEADS)}
            position = int(await con.fetchval("SELECT coalesce(max(position), 0) FROM journal"))
            heads: list[Head] = [(r[0], r[1], int(r[2]), bytes(r[3])) for r in await con.fetch(SELECT_HEADS)]
            heads.sort(key=lambda h: (h[0], h[1]))
            root = merkle_root(heads)
            signature = kid = None
            if private is not None:
                signature = private.sign(checkpoint_message(root, vector))
                kid = key_id(private.public_key())
            stored = json.dumps([[e, i, r, h.hex()] for e, i, r, h in heads], separators=(",", ":"))
            row = await con.fetchrow(
                INSERT_CHECKPOINT, position, canonical_vector(vector).decode(), stored, root, signature, kid
            )
            assert row is not None
            return Checkpoint(row["id"], row["created"], position, len(heads), root, kid, vector)
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
       (SELECT max(k.revision) FROM journal k WHERE k.entity = h.entity AND k.id = h.id) AS newest{anchors}
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS h(entity, id, revision)
LEFT JOIN journal j ON j.entity = h.entity AND j.id = h.id AND j.revision = h.revision
"""
# With retention: the entity's newest anchor and the anchor at the sealed revision, if any.
CHECK_ANCHORS = """,
       (SELECT max(a.revision) FROM journal_retention a WHERE a.entity = h.entity AND a.id = h.id) AS anchor,
       (SELECT a.hash FROM journal_retention a
        WHERE a.entity = h.entity AND a.id = h.id AND a.revision = h.revision) AS anchor_hash"""


async def _check_checkpoints(
    con: asyncpg.Connection,
    report: Report,
    scope: Scope,
    every: bool,
    signing_key: str | None,
    retention: bool = False,
) -> None:
    public = load_signing_key(signing_key).public_key() if signing_key else None
    exists = await con.fetchval("SELECT to_regclass('audit_checkpoints') IS NOT NULL")
    if not exists:
        return
    query = (
        "SELECT id, journal_position, partition_heads::text AS partition_heads, heads::text AS heads, "
        "root, signature, key_id FROM audit_checkpoints"
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
        vector: Vector | None = None
        readable = True
        if cp["partition_heads"] is not None:
            try:
                vector = parse_vector(cp["partition_heads"])
            except ValueError as exc:
                invalid(f"its partition heads are not a vector of partition positions ({exc})")
                readable = False
        if public is not None and readable:
            message = checkpoint_message(root, vector, cp["journal_position"])
            problem = signature_problem(public, cp["signature"], cp["key_id"], message, "the checkpoint")
            if problem is not None:
                invalid(problem)
        mine = [h for h in heads if _in_scope(scope, h[0], h[1])]
        rows = await con.fetch(
            CHECK_HEADS.format(anchors=CHECK_ANCHORS if retention else ""),
            [h[0] for h in mine],
            [h[1] for h in mine],
            [h[2] for h in mine],
        )
        recorded = {(h[0], h[1], h[2]): h[3] for h in mine}
        for r in rows:
            entity, id, revision = r["entity"], r["id"], int(r["revision"])
            anchor = r["anchor"] if retention else None
            if r["hash"] is None and anchor is not None and revision <= anchor:
                # Removed by retention cleanup. An anchor left at exactly this revision must
                # carry the sealed hash; an older sealed revision can no longer be checked.
                sealed = recorded[(entity, id, revision)]
                if r["anchor_hash"] is None or bytes(r["anchor_hash"]) == sealed:
                    continue
                b = Break(
                    entity,
                    id,
                    revision,
                    "rewritten",
                    f"the retention anchor's hash differs from the one sealed in checkpoint {name}",
                )
            elif r["hash"] is None:
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


# ---- retention records (twinstore.retention) ----------------------------------------------

CLEANUP_PREFIX_V1 = b"twinstore-cleanup-v1"
CLEANUP_PREFIX = b"twinstore-cleanup-v2"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def anchor_leaf(entity: str, id: str, revision: int, hash: bytes, snapshot_hash: bytes) -> bytes:
    """The digest leaf of one retention anchor:
    ``sha256(0x02 || f(entity) || f(id) || revision as 8-byte big-endian || hash || snapshot_hash)``."""
    return hashlib.sha256(
        b"\x02" + _field(entity) + _field(id) + struct.pack(">q", revision) + hash + snapshot_hash
    ).digest()


def fold_anchor(digest: bytes, leaf: bytes) -> bytes:
    """A cleanup run's digest after one more anchor (it starts at GENESIS): ``sha256(digest || leaf)``.

    >>> a = anchor_leaf("thing", "a:b", 3, GENESIS, GENESIS)
    >>> fold_anchor(fold_anchor(GENESIS, a), a) != fold_anchor(GENESIS, a)
    True
    """
    return hashlib.sha256(digest + leaf).digest()


def snapshot_digest(created: datetime | None, modified: datetime, doc: str | None) -> bytes:
    """sha-256 of a snapshot row as stored: created and modified (ISO 8601 with microseconds)
    and the document's ``jsonb`` text as PostgreSQL prints it (``doc::text``)."""
    times = [None if created is None else created.isoformat(timespec="microseconds")]
    times.append(modified.isoformat(timespec="microseconds"))
    return hashlib.sha256(orjson.dumps(times) + b"\n" + (b"null" if doc is None else doc.encode())).digest()


def cleanup_seed(partition_bounds: Mapping[int, int] | None) -> bytes:
    """Where a cleanup run's digest starts: ``sha256(b"twinstore-cleanup-v2" || canonical
    partition bounds)`` (:func:`canonical_vector`), so the digest covers the bounds the run
    respected; GENESIS for a run from before the partitioned journal (no bounds)."""
    if partition_bounds is None:
        return GENESIS
    return hashlib.sha256(CLEANUP_PREFIX + canonical_vector(partition_bounds)).digest()


def cleanup_message(
    cleanup_id: int, cutoff: datetime, entities: int, events: int, digest: bytes, v2: bool = True
) -> bytes:
    """What a cleanup run's signature signs: ``b"twinstore-cleanup-v2"`` || id, cutoff
    (microseconds since the epoch), anchors set and events removed, each 8-byte big-endian ||
    digest (which starts from the run's partition bounds, :func:`cleanup_seed`). Runs from
    before the partitioned journal (``v2=False``) signed the same with
    ``b"twinstore-cleanup-v1"``."""
    micros = (cutoff - _EPOCH) // timedelta(microseconds=1)
    prefix = CLEANUP_PREFIX if v2 else CLEANUP_PREFIX_V1
    return prefix + struct.pack(">qqqq", cleanup_id, micros, entities, events) + digest


SELECT_CLEANUPS = """
SELECT r.id, r.cutoff, r.entities, r.events, r.digest, r.signature, r.key_id, r.checkpoint_id,
       r.partition_bounds::text AS partition_bounds, c.partition_heads::text AS checkpoint_heads
FROM journal_cleanups r LEFT JOIN audit_checkpoints c ON c.id = r.checkpoint_id ORDER BY r.id
"""
SELECT_CLEANUP_ANCHORS = """
SELECT entity, id, revision, hash, snapshot_hash FROM journal_retention WHERE cleanup_id = $1 ORDER BY seq
"""
SELECT_ORPHAN_ANCHORS = """
SELECT cleanup_id, count(*) AS n FROM journal_retention r
WHERE NOT EXISTS (SELECT 1 FROM journal_cleanups c WHERE c.id = r.cleanup_id)
GROUP BY cleanup_id ORDER BY cleanup_id
"""
# The snapshot kept at each current anchor in scope ({where} on journal_retention's columns).
SELECT_ANCHOR_SNAPSHOTS = f"""
SELECT r.entity, r.id, r.revision, r.snapshot_hash, r.cleanup_id,
       s.created, s.modified, s.doc::text AS doc, s.revision IS NOT NULL AS present
FROM (SELECT * FROM journal_retention r{{where}}{{glue}}{NEWEST_ANCHOR}) r
LEFT JOIN snapshots s ON s.entity = r.entity AND s.id = r.id AND s.revision = r.revision
ORDER BY r.entity, r.id
"""


def _beyond(bounds: Vector, checkpoint_heads: str | None) -> str:
    """Where a cleanup run's bounds exceed the partition heads of its checkpoint (none when that
    checkpoint is gone, or predates partitions: nothing to compare with)."""
    if checkpoint_heads is None:
        return ""
    try:
        sealed = parse_vector(checkpoint_heads)
    except ValueError:
        return ""  # reported with the checkpoint
    over = [
        f"partition {p}: {seq} > {sealed.get(p, 0)}" for p, seq in bounds.items() if seq > sealed.get(p, 0)
    ]
    return ", ".join(over[:3]) + (f" and {len(over) - 3} more" if len(over) > 3 else "")


async def _check_retention(
    con: asyncpg.Connection, report: Report, scope: Scope, signing_key: str | None, prefetch: int
) -> None:
    """Check the records of retention cleanups: the snapshot kept at every current anchor in
    scope, and (verifying the whole journal) every run's digest and signature, and anchors
    of no recorded run."""
    broken: set[tuple[str, str]] = {(b.entity, b.id) for b in report.breaks}
    where, args = scope.where()
    query = SELECT_ANCHOR_SNAPSHOTS.format(where=where, glue=" AND " if where else " WHERE ")
    async for r in con.cursor(query, *args, prefetch=prefetch):
        if not r["present"]:
            detail = "the snapshot kept at the retention anchor is missing"
        elif snapshot_digest(r["created"], r["modified"], r["doc"]) != bytes(r["snapshot_hash"]):
            detail = (
                "the snapshot kept at the retention anchor differs from the one sealed by "
                f"cleanup {r['cleanup_id']}"
            )
        else:
            continue
        report.breaks.append(Break(r["entity"], r["id"], int(r["revision"]), "snapshot-altered", detail))
        if (r["entity"], r["id"]) not in broken:
            broken.add((r["entity"], r["id"]))
            report.broken_entities += 1
    if scope.thing is not None or scope.namespace is not None:
        return  # a run's digest covers all its anchors: checked only over the whole journal
    public = load_signing_key(signing_key).public_key() if signing_key else None
    for run in await con.fetch(SELECT_CLEANUPS):
        name = str(run["id"])

        def invalid(detail: str, name: str = name) -> None:
            report.breaks.append(Break("cleanup", name, 0, "cleanup-invalid", detail))

        bounds: Vector | None = None
        if run["partition_bounds"] is not None:
            try:
                bounds = parse_vector(run["partition_bounds"])
            except ValueError as exc:
                invalid(f"its partition bounds are not a vector of partition positions ({exc})")
                continue
            beyond = _beyond(bounds, run["checkpoint_heads"])
            if beyond:
                invalid(
                    f"its partition bounds go beyond what checkpoint {run['checkpoint_id']} sealed ({beyond})"
                )
        digest, count = cleanup_seed(bounds), 0
        async for a in con.cursor(SELECT_CLEANUP_ANCHORS, run["id"], prefetch=prefetch):
            leaf_ = anchor_leaf(
                a["entity"], a["id"], a["revision"], bytes(a["hash"]), bytes(a["snapshot_hash"])
            )
            digest = fold_anchor(digest, leaf_)
            count += 1
        if digest != bytes(run["digest"]) or count != run["entities"]:
            covered = "its partition bounds and " if bounds is not None else ""
            invalid(
                f"{covered}the {count} anchors it set do not recompute its digest ({run['entities']} "
                "recorded): an anchor was edited, added or deleted, or the bounds changed"
            )
        if public is not None:
            message = cleanup_message(
                run["id"],
                run["cutoff"],
                run["entities"],
                run["events"],
                bytes(run["digest"]),
                v2=bounds is not None,
            )
            problem = signature_problem(
                public, run["signature"], run["key_id"], message, "the cleanup record"
            )
            if problem is not None:
                invalid(problem)
    for r in await con.fetch(SELECT_ORPHAN_ANCHORS):
        report.breaks.append(
            Break(
                "cleanup",
                str(r["cleanup_id"]),
                0,
                "cleanup-invalid",
                f"{r['n']} retention anchors refer to cleanup {r['cleanup_id']}, which is not recorded",
            )
        )
