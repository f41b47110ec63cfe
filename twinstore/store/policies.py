"""Policies in the journal: ``entity = 'policy'`` events, the ``policies`` projection, change notices.

Policy writes are rare next to thing writes, so each is its own transaction (no group
commit). It takes the journal's ``WRITE_LOCK`` first like every journal write, so journal
positions stay in commit order, then decides on the locked current state, appends the event
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
from twinstore.store.codec import GENESIS, canonical, chain_hash, dumps, storable
from twinstore.store.schema import WRITE_LOCK

__all__ = ["POLICY_CHANNEL", "PolicyStore"]

log = logging.getLogger("twinstore.store")

ENTITY = "policy"
POLICY_CHANNEL = "twinstore_policies"

SELECT_POLICY = "SELECT revision, created, modified, doc FROM policies WHERE id = $1"
SELECT_POLICIES = "SELECT id, revision, created, modified, doc FROM policies WHERE id = any($1::text[])"
SELECT_FOR_WRITE = "SELECT revision, created, modified, doc, hash FROM policies WHERE id = $1"
# The policy and the journal position of the creation that began its current life (one
# statement: one snapshot, so the two agree even while the policy is deleted and created again).
SELECT_POLICY_ORIGIN = """
SELECT p.revision, p.created, p.modified, p.doc,
       (SELECT j.position FROM journal j
        WHERE j.entity = 'policy' AND j.id = p.id AND j.action = 'created' AND j.path ~ '^/*$'
          AND j.revision <= p.revision
        ORDER BY j.revision DESC LIMIT 1) AS origin
FROM policies p WHERE p.id = $1
"""

APPEND = """
WITH appended AS (
    INSERT INTO journal (entity, id, revision, ts, action, path, value, originator, correlation_id, hash)
    VALUES ('policy', $1, $2, $3, $4, $5, $6::text::json, $7, $8, $9)
)
INSERT INTO policies (id, revision, created, modified, doc, hash, readers)
VALUES ($1, $2, $10, $3, $11::text::jsonb, $9, $12::text[])
ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, created = excluded.created,
    modified = excluded.modified, doc = excluded.doc, hash = excluded.hash, readers = excluded.readers
"""


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


class PolicyStore:
    """Reads and writes of policies on the shared pool.

    With ``refuse_delete_in_use`` (setting ``policy_delete_in_use = "refuse"``) deleting a
    policy that a thing still uses is 409 ``policies:policy.notdeletable``: otherwise whoever
    creates a policy of that id next would govern those things (Ditto deletes it anyway).
    """

    def __init__(self, pool: asyncpg.Pool, *, refuse_delete_in_use: bool = True) -> None:
        self.pool = pool
        self.refuse_delete_in_use = refuse_delete_in_use

    async def load(self, policy_id: str) -> PolicyState:
        try:
            async with self.pool.acquire() as con:
                return _state(policy_id, await con.fetchrow(SELECT_POLICY, policy_id))
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise UnavailableError("The database is not reachable; retry later.") from exc

    async def load_with_origin(self, policy_id: str) -> tuple[PolicyState, int]:
        """The policy and the journal position of the creation its current life began with (0: that
        creation lies before the retained history, or there is no policy)."""
        try:
            async with self.pool.acquire() as con:
                row = await con.fetchrow(SELECT_POLICY_ORIGIN, policy_id)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise UnavailableError("The database is not reachable; retry later.") from exc
        origin = 0 if row is None or row["origin"] is None else int(row["origin"])
        return _state(policy_id, row), origin

    async def load_many(self, policy_ids: list[str]) -> dict[str, PolicyState]:
        try:
            async with self.pool.acquire() as con:
                rows = await con.fetch(SELECT_POLICIES, policy_ids)
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
        async with self.pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            row = await con.fetchrow(SELECT_FOR_WRITE, policy_id)
            before = _state(policy_id, row)
            head = bytes(row["hash"]) if row is not None else GENESIS
            event = decide(before, datetime.now(UTC))
            # Checked under WRITE_LOCK, which every thing write takes too: no thing write commits
            # between this check and the deletion. One prepared (its policy looked up) before the
            # deletion and committed after it can still name the deleted policy.
            deleting = event.action == "deleted" and not event.path.strip("/")
            if deleting and self.refuse_delete_in_use and await con.fetchval(SELECT_IN_USE, policy_id):
                raise PolicyInUseError(
                    f"The Policy with ID '{policy_id}' could not be deleted as Things still use it."
                )
            after = evolve_policy(before, event)
            value = None if event.action == "deleted" else storable(canonical(event.value))
            chained = chain_hash(
                head,
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
            await con.execute(
                APPEND,
                policy_id,
                event.revision,
                event.timestamp,
                event.action,
                event.path,
                None if value is None else value.decode(),
                event.originator,
                event.correlation_id,
                chained,
                after.created,
                None if after.doc is None else dumps(after.doc),
                thing_readers(after.doc),
            )
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
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("policy change listener lost its connection", extra={"error": str(exc)})
                on_change(None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            finally:
                if con is not None and not con.is_closed():
                    with contextlib.suppress(Exception):
                        await con.close()
