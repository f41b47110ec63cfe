"""The recorder: the only code that appends events to the journal, of every entity.

Things, policies and anomaly labels are all recorded here: the journal's id space is split into
``P`` partitions (:func:`~twinstore.model.partition.partition_of`, ``P`` fixed when the database
is created and stored in ``twinstore_meta``), and each partition has its own ordering:

* ``partition_heads`` holds one row per partition with the last ``seq`` handed out in it. A
  write transaction first locks the rows of the partitions it writes (:data:`LOCK`, always in
  ascending partition order, so two transactions never wait for each other in a cycle); that
  row lock is the partition's write lock. Writes in different partitions commit in parallel.
* Every event gets the next ``seq`` of its partition, assigned under that lock in the same
  statement that inserts it (:func:`append_statement`), so within a partition ``seq`` follows
  commit order: a reader that tails a partition by ``seq`` (the relay, live cuts) never skips
  a row that commits late.
* ``hash`` chains the events of one entity (:func:`record`); the caller holds the entity's
  head, read under the lock.
* Every append notifies ``twinstore_journal`` at commit (wakes the relays of every process).

The journal's global ``position`` (an identity column) is unique and grows with insertion, but
is *not* in commit order across partitions: it only says that an event inserted after another
one committed has a higher position (used to tell a policy re-created after a thing's
deletion from the one it had).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from twinstore.model.partition import partition_key, partition_of
from twinstore.store import Connection
from twinstore.store.codec import chain_hash, dumps
from twinstore.store.schema import stored_partitions

__all__ = [
    "JOURNAL_CHANNEL",
    "LOCK",
    "Record",
    "Recorder",
    "append_statement",
    "partition_key",
    "record",
    "rows",
]

JOURNAL_CHANNEL = "twinstore_journal"

# Locks the partitions' head rows in ascending order (LockRows runs above the sort).
LOCK = "SELECT partition FROM partition_heads WHERE partition = any($1::int[]) ORDER BY partition FOR UPDATE"
LOCK_ALL = "SELECT partition FROM partition_heads ORDER BY partition FOR UPDATE"

# The events of one append as $1 (a JSON array of Record._asdict()-like objects), numbered per
# partition after its head (read in this statement's snapshot, taken after LOCK was granted, so
# it is the last committed one), inserted, and the heads moved. Callers add their projection
# statements as further CTEs (see append_statement).
_RECORD = """
recorded AS (
    SELECT e.*, h.seq + row_number() OVER (PARTITION BY e.partition ORDER BY e.ord) AS seq
    FROM json_to_recordset($1::text::json) AS e(partition int, entity text, id text,
        revision bigint, ts timestamptz, action text, path text, value text, originator text,
        correlation_id text, hash text, headers jsonb, ord bigint)
    JOIN partition_heads h ON h.partition = e.partition
), appended AS (
    INSERT INTO journal (partition, seq, entity, id, revision, ts, action, path, value, originator,
                         correlation_id, hash, headers)
    SELECT r.partition, r.seq, r.entity, r.id, r.revision, r.ts, r.action, r.path, r.value::json,
           r.originator, r.correlation_id, decode(r.hash, 'hex'), r.headers
    FROM recorded r
), moved AS (
    UPDATE partition_heads h SET seq = m.seq
    FROM (SELECT partition, max(seq) AS seq FROM recorded GROUP BY partition) m
    WHERE h.partition = m.partition
)"""


def append_statement(*projections: str) -> str:
    """The statement appending ``$1``'s records, with the caller's projection CTEs (named, each
    ``name AS (...)``, parameters from ``$2``) in the same round trip, notifying at commit."""
    ctes = ",\n".join((_RECORD, *projections))
    return f"WITH {ctes}\nSELECT pg_notify('{JOURNAL_CHANNEL}', '')"


class Record(NamedTuple):
    """One journal event to append (``value``: its canonical JSON text, as hashed)."""

    partition: int
    entity: str
    id: str
    revision: int
    ts: datetime
    action: str
    path: str
    value: bytes | None
    originator: str
    correlation_id: str | None
    headers: dict[str, str] | None
    hash: bytes

    def row(self, ord: int) -> dict[str, Any]:
        """The JSON object of :func:`append_statement` (``ord``: its place in the append)."""
        return {
            "ord": ord,
            "partition": self.partition,
            "entity": self.entity,
            "id": self.id,
            "revision": self.revision,
            "ts": self.ts,
            "action": self.action,
            "path": self.path,
            "value": None if self.value is None else self.value.decode(),
            "originator": self.originator,
            "correlation_id": self.correlation_id,
            "hash": self.hash.hex(),
            "headers": self.headers,
        }


def record(
    previous: bytes,
    partition: int,
    entity: str,
    entity_id: str,
    revision: int,
    ts: datetime,
    action: str,
    path: str,
    value: bytes | None,
    originator: str,
    correlation_id: str | None,
    headers: dict[str, str] | None = None,
) -> Record:
    """The event chained onto ``previous`` (the entity's head hash)."""
    chained = chain_hash(
        previous, entity, entity_id, revision, ts, action, path, value, originator, correlation_id, headers
    )
    return Record(
        partition, entity, entity_id, revision, ts, action, path, value, originator, correlation_id,
        headers, chained,
    )


def rows(records: list[Record]) -> str:
    """The ``$1`` of :func:`append_statement`: the records in order."""
    return dumps([r.row(i) for i, r in enumerate(records)])


class Recorder:
    """Partitions, locks and appends (see the module); one per database (``partitions``)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    @classmethod
    async def load(cls, pool: asyncpg.Pool) -> Recorder:
        """The recorder of the (migrated) database behind ``pool``."""
        async with pool.acquire() as con:
            return cls(await stored_partitions(con))

    def partition(self, entity_id: str) -> int:
        """The partition of an entity id (see :func:`partition_key`)."""
        return partition_of(partition_key(entity_id), self.partitions)

    async def lock(self, con: Connection, partitions: Iterable[int]) -> None:
        """Take the write locks of ``partitions`` until the transaction ends (call once per
        transaction, with every partition it writes: the order is what keeps it deadlock-free)."""
        await con.execute(LOCK, sorted(set(partitions)))

    @staticmethod
    async def lock_all(con: Connection) -> None:
        """Every partition's write lock: nothing else is appended until this transaction ends."""
        await con.execute(LOCK_ALL)

    @staticmethod
    async def append(con: Connection, records: list[Record], *projections: tuple[str, Any]) -> None:
        """Append ``records`` (their partitions locked by this transaction), with projection
        CTEs given as (sql, parameter) pairs: the n-th pair's sql refers to its parameter as
        ``${n+1}``."""
        statement = append_statement(*(sql for sql, _ in projections))
        await con.execute(statement, rows(records), *(p for _, p in projections))
