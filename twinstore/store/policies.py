"""Policies in the journal: ``entity = 'policy'`` events, the ``policies`` projection, change notices.

Policy writes are rare next to thing writes, so each is its own transaction (no group
commit). It locks the policy's journal partition first like every journal write (see
:mod:`twinstore.store.recorder`), then decides on the locked current state, appends the event
(hash-chained per policy like things) and updates the projection in one statement. Every
commit sends ``NOTIFY twinstore_policies, '<policyId>'`` so that every process drops its cached
decisions for that policy at once (:meth:`PolicyStore.listen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg

from twinstore.model.errors import PolicyInUseError, UnavailableError
from twinstore.model.policy import PolicyEvent, PolicyState, evolve_policy, thing_readers
from twinstore.store.codec import GENESIS, canonical, dumps, storable
from twinstore.store.recorder import Recorder, record

__all__ = ["POLICY_CHANNEL", "PolicyStore"]

log = logging.getLogger("twinstore.store")

ENTITY = "policy"
POLICY_CHANNEL = "twinstore_policies"
# The policy listener checks its connection every second; an answer later than this ends it.
HEARTBEAT_TIMEOUT = 5.0

# Reads name the policy's partition too (see twinstore.store.journal: routed to its shard).
SELECT_POLICY = "SELECT revision, created, modified, doc FROM policies WHERE id = $1 AND partition = $2"
SELECT_POLICIES = """
SELECT id, revision, created, modified, doc FROM policies
WHERE id = any($1::text[]) AND partition = any($2::int[])
"""
SELECT_FOR_WRITE = (
    "SELECT revision, created, modified, doc, hash FROM policies WHERE id = $1 AND partition = $2"
)
# The policy and the journal position of the creation that began its current life (one
# statement: one snapshot, so the two agree even while the policy is deleted and created again).
SELECT_POLICY_ORIGIN = """
SELECT p.revision, p.created, p.modified, p.doc,
       (SELECT j.position FROM journal j
        WHERE j.entity = 'policy' AND j.id = p.id AND j.partition = p.partition AND j.action = 'created'
          AND j.path ~ '^/*$' AND j.revision <= p.revision
        ORDER BY j.revision DESC LIMIT 1) AS origin
FROM policies p WHERE p.id = $1 AND p.partition = $2
"""

# The projection row ($2, a JSON object), appended with the event (Recorder.append), in the
# policy's partition (part of the key: schema migration 17).
PROJECT = """
projected AS (
    INSERT INTO policies (partition, id, revision, created, modified, doc, hash, readers)
    SELECT p.partition, p.id, p.revision, p.created, p.modified, p.doc, decode(p.hash, 'hex'), p.readers
    FROM jsonb_to_record($2::text::jsonb) AS p(partition int, id text, revision bigint,
        created timestamptz, modified timestamptz, doc jsonb, hash text, readers text[])
    ON CONFLICT (id, partition) DO UPDATE SET revision = excluded.revision, created = excluded.created,
        modified = excluded.modified, doc = excluded.doc, hash = excluded.hash, readers = excluded.readers
)"""


def _state(policy_id: str, row: asyncpg.Record | None) -> PolicyState:
    if row is None:
        return PolicyState(policy_id=policy_id)
    return PolicyState(
        policy_id=policy_id,
        revision=row["revision"],
        created=row["created"],
        modified=row["modified"],
        doc=row["doc"],
    )


# Is the policy still used by a thing (index things_policy; deleted things have no policy_id)?
SELECT_IN_USE = "SELECT EXISTS (SELECT 1 FROM things WHERE policy_id = $1)"


class _LockEverything(Exception):
    """Roll back: the write deletes a policy and needs every partition's lock (see _transaction)."""


class PolicyStore:
    """Reads and writes of policies on the shared pool.

    With ``refuse_delete_in_use`` (setting ``policy_delete_in_use = "refuse"``) deleting a
    policy that a thing still uses is 409 ``policies:policy.notdeletable``: otherwise whoever
    creates a policy of that id next would govern those things (Ditto deletes it anyway).
    """

    def __init__(self, pool: asyncpg.Pool, *, recorder: Recorder, refuse_delete_in_use: bool = True) -> None:
        self.pool = pool
        self.refuse_delete_in_use = refuse_delete_in_use
        self.recorder = recorder

    async def load(self, policy_id: str) -> PolicyState:
        try:
            async with self.pool.acquire() as con:
                row = await con.fetchrow(SELECT_POLICY, policy_id, self.recorder.partition(policy_id))
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise UnavailableError("The database is not reachable; retry later.") from exc
        return _state(policy_id, row)

    async def load_with_origin(self, policy_id: str) -> tuple[PolicyState, int]:
        """The policy and the journal position of the creation its current life began with (0: that
        creation lies before the retained history, or there is no policy)."""
        try:
            async with self.pool.acquire() as con:
                row = await con.fetchrow(SELECT_POLICY_ORIGIN, policy_id, self.recorder.partition(policy_id))
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise UnavailableError("The database is not reachable; retry later.") from exc
        origin = 0 if row is None or row["origin"] is None else int(row["origin"])
        return _state(policy_id, row), origin

    async def load_many(self, policy_ids: list[str]) -> dict[str, PolicyState]:
        try:
            async with self.pool.acquire() as con:
                partitions = sorted({self.recorder.partition(i) for i in policy_ids})
                rows = await con.fetch(SELECT_POLICIES, policy_ids, partitions)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise UnavailableError("The database is not reachable; retry later.") from exc
        return {r["id"]: _state(r["id"], r) for r in rows}

    async def write(
        self, policy_id: str, decide: Callable[[PolicyState, datetime], PolicyEvent]
    ) -> tuple[PolicyEvent, PolicyState, PolicyState]:
        """Decide on the locked current state and commit the event: (event, before, after).

        ``decide`` is pure and raises a :class:`DittoError` to refuse; nothing is written then.
        A database that cannot be reached is :class:`UnavailableError` (503).
        """
        try:
            return await self._write(policy_id, decide)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise UnavailableError("The database is not reachable; retry later.") from exc

    async def _write(
        self, policy_id: str, decide: Callable[[PolicyState, datetime], PolicyEvent]
    ) -> tuple[PolicyEvent, PolicyState, PolicyState]:
        try:
            return await self._transaction(policy_id, decide, everything=False)
        except _LockEverything:
            return await self._transaction(policy_id, decide, everything=True)

    async def _transaction(
        self, policy_id: str, decide: Callable[[PolicyState, datetime], PolicyEvent], *, everything: bool
    ) -> tuple[PolicyEvent, PolicyState, PolicyState]:
        recorder = self.recorder
        partition = recorder.partition(policy_id)
        async with self.pool.acquire() as con, con.transaction():
            if everything:
                await recorder.lock_all(con)
            else:
                await recorder.lock(con, [partition])
            row = await con.fetchrow(SELECT_FOR_WRITE, policy_id, partition)
            before = _state(policy_id, row)
            head = bytes(row["hash"]) if row is not None else GENESIS
            event = decide(before, datetime.now(UTC))
            deleting = event.action == "deleted" and not event.path.strip("/")
            if deleting and self.refuse_delete_in_use:
                # Under every partition's write lock: no thing write commits between this check
                # and the deletion. (Taken from the start, in order: adding them to the one held
                # could wait in a cycle with a thing write.) One prepared (its policy looked up)
                # before the deletion and committed after it can still name the deleted policy.
                if not everything:
                    raise _LockEverything()
                if await con.fetchval(SELECT_IN_USE, policy_id):
                    raise PolicyInUseError(
                        f"The Policy with ID '{policy_id}' could not be deleted as Things still use it."
                    )
            after = evolve_policy(before, event)
            value = None if event.action == "deleted" else storable(canonical(event.value))
            entry = record(
                head,
                partition,
                ENTITY,
                policy_id,
                event.revision,
                event.timestamp,
                event.action,
                event.path,
                value,
                event.originator,
                event.correlation_id,
            )
            projection = {
                "partition": partition,
                "id": policy_id,
                "revision": event.revision,
                "created": after.created,
                "modified": event.timestamp,
                "doc": after.doc,
                "hash": entry.hash.hex(),
                "readers": thing_readers(after.doc),
            }
            await recorder.append(con, [entry], (PROJECT, dumps(projection)))
            await con.execute("SELECT pg_notify($1, $2)", POLICY_CHANNEL, policy_id)
        return event, before, after

    async def listen(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        on_change: Callable[[str | None], None],
        stop: asyncio.Event,
    ) -> None:
        """Call ``on_change(policy_id)`` for every policy commit of any process until ``stop``.

        Runs on a connection of its own (LISTEN is session state). While it is down, changes
        may be missed, so every (re)connect first calls ``on_change(None)``: forget everything.
        """
        while not stop.is_set():
            con: asyncpg.Connection | None = None
            try:
                con = await connect()
                await con.add_listener(POLICY_CHANNEL, lambda _c, _pid, _ch, payload: on_change(payload))
                on_change(None)
                while not stop.is_set() and not con.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                    if not stop.is_set():
                        # A connection gone silent (its server's machine lost, a partition)
                        # is never closed: only a statement finds out, and notifications it
                        # misses meanwhile would leave revoked permissions in the cache.
                        await con.fetchval("SELECT 1", timeout=HEARTBEAT_TIMEOUT)
            # InternalClientError: a connection left unusable ("another operation is in progress")
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
            ) as exc:
                log.warning("policy change listener lost its connection", extra={"error": str(exc)})
                on_change(None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            finally:
                if con is not None and not con.is_closed():
                    with contextlib.suppress(Exception):
                        await con.close(timeout=HEARTBEAT_TIMEOUT)  # (a silent one is aborted)
