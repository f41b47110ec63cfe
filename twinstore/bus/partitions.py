"""A group of processes sharing N partitions, each claimed by one member at a time.

Used by NATS ingestion (:mod:`twinstore.ingest`) and anomaly scoring
(:mod:`twinstore.anomaly.worker`): every process that runs the work is a member of one group
(named by a lock class) and takes a fair share of the partitions.

* A member holds a session-level PostgreSQL advisory lock per partition it runs, and one lock
  that says it is alive, all on a connection of its own (``connect``).
* Every ``rebalance_seconds`` it counts the live members (``pg_locks``) and takes free
  partitions up to ``ceil(partitions / members)`` or gives back the ones above it. A member
  that dies loses its connection and so its locks; the others take its partitions within a
  round. A lost lock connection gives every partition back (and the next round starts over).
* Each claimed partition runs ``run(partition, stop)`` as a task; the task ends its work in
  flight when ``stop`` is set (it is cancelled only after a grace period). A task that ends by
  itself (taken over, failed) gives its lock back and may be claimed again next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from twinstore.logs import bind

__all__ = ["PartitionGroup", "PullReader", "fetch_available", "lock_key"]

log = logging.getLogger("twinstore.partitions")

SELECT_MEMBERS = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND granted AND classid = $1::bigint::oid AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

Run = Callable[[int, asyncio.Event], Coroutine[Any, Any, None]]


def lock_key(text: str) -> int:
    """A stable positive int4 for an advisory-lock class.

    >>> lock_key("twinstore-ingest:TWINSTORE_INGEST")
    1390784561
    """
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


class PartitionGroup:
    """This process's membership in a group sharing ``partitions`` (see the module)."""

    def __init__(
        self,
        name: str,
        partitions: int,
        run: Run,
        *,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        rebalance_seconds: float = 2.0,
        grace_seconds: float = 30.0,
        label: str = "partitions",
    ) -> None:
        self.partitions_total = partitions
        self.run = run
        self.connect = connect
        self.rebalance_seconds = rebalance_seconds
        self.grace_seconds = grace_seconds
        self.label = label
        self._lock_class = lock_key(name)
        self._member_class = lock_key(name.replace(":", "-members:", 1) if ":" in name else name + "-members")
        self._con: asyncpg.Connection | None = None
        self._owned: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self._membership(), name=f"twinstore-{self.label}")

    async def stop(self) -> None:
        """Let every partition finish its work in flight, then give everything back."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None

    @property
    def partitions(self) -> list[int]:
        return sorted(self._owned)

    async def _membership(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._rebalance()
            except Exception as exc:
                # Lost, or left unusable: a connection terminated in the middle of a query can
                # also surface as asyncpg's InternalClientError ("another operation is in
                # progress") on the next one. Either way its locks are not to be trusted: give
                # everything back and start again on a new connection.
                log.warning(
                    "%s: lock connection lost, giving back partitions",
                    self.label,
                    extra={"error": repr(exc)},
                )
                await self._release_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.rebalance_seconds)
        await self._release_all()

    async def _rebalance(self) -> None:
        if self._con is None or self._con.is_closed():
            await self._release_all()
            self._con = await self.connect()
            await self._con.execute(
                "SELECT pg_advisory_lock($1, $2)", self._member_class, random.randrange(1, 2**31 - 1)
            )
        con = self._con
        for partition, (task, _) in list(self._owned.items()):
            if task.done():  # taken over, or failed: give the lock back, maybe take it again
                del self._owned[partition]
                await con.execute("SELECT pg_advisory_unlock($1, $2)", self._lock_class, partition)
        members = max(1, int(await con.fetchval(SELECT_MEMBERS, self._member_class)))
        fair = math.ceil(self.partitions_total / members)
        while len(self._owned) > fair:
            await self._release(max(self._owned))
        if len(self._owned) < fair:
            free = [p for p in range(self.partitions_total) if p not in self._owned]
            random.shuffle(free)
            for partition in free:
                if len(self._owned) >= fair:
                    break
                if await con.fetchval("SELECT pg_try_advisory_lock($1, $2)", self._lock_class, partition):
                    stop = asyncio.Event()
                    task = asyncio.create_task(
                        self._keep(partition, stop), name=f"twinstore-{self.label}-{partition}"
                    )
                    self._owned[partition] = (task, stop)
                    log.info(
                        "%s: took partition",
                        self.label,
                        extra={"partition": partition, "members": members},
                    )

    async def _keep(self, partition: int, stop: asyncio.Event) -> None:
        """Run one claimed partition until it returns or is stopped; after a failure (NATS or
        database trouble) start it again a second later."""
        bind(partition=partition)  # on every log line of this partition's task
        while not stop.is_set():
            try:
                await self.run(partition, stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "%s: partition failed, restarting",
                    self.label,
                    extra={"partition": partition, "error": repr(exc)},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def _release(self, partition: int) -> None:
        task, stop = self._owned.pop(partition)
        stop.set()
        await self._finish(task)
        if self._con is not None and not self._con.is_closed():
            with contextlib.suppress(Exception):
                await self._con.execute("SELECT pg_advisory_unlock($1, $2)", self._lock_class, partition)
        log.info("%s: gave back partition", self.label, extra={"partition": partition})

    async def _release_all(self) -> None:
        """Stop every partition at once (each finishes its work, within one grace period)."""
        owned, self._owned = self._owned, {}
        for _, stop in owned.values():
            stop.set()
        await asyncio.gather(*(self._finish(task) for task, _ in owned.values()))
        if self._con is not None and not self._con.is_closed():
            for partition in owned:
                with contextlib.suppress(Exception):
                    await self._con.execute("SELECT pg_advisory_unlock($1, $2)", self._lock_class, partition)
        if owned:
            log.info("%s: gave back partitions", self.label, extra={"partitions": sorted(owned)})
        if self._con is not None:
            try:
                await self._con.close(timeout=2)
            except Exception:  # a broken connection: drop it without a goodbye
                self._con.terminate()
            self._con = None

    async def _finish(self, task: asyncio.Task[None]) -> None:
        """Let a partition task end its work (it checks its stop flag between batches);
        cancelled only after the grace period."""
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, self.grace_seconds)


MORE_TIMEOUT = 0.002  # after the first message: only what is there already (no lingering wait)


async def fetch_available(sub: Any, batch: int, timeout: float) -> list[Msg]:
    """The next messages of a pull subscription: wait (up to ``timeout``) for one, then take
    what else is there at once (at most ``batch``); ``[]`` when nothing came.

    One ``fetch(batch)`` is not used for both: once nats-py's lingering pull request got its
    first message it waits for the whole batch until the timeout, so a trickle of messages would
    wait a second each round instead of being applied at once.
    """
    try:
        first = await sub.fetch(1, timeout=timeout)
    except (TimeoutError, nats.errors.TimeoutError):
        return []
    if batch <= 1:
        return list(first)
    try:
        rest = await sub.fetch(batch - 1, timeout=MORE_TIMEOUT)
    except (TimeoutError, nats.errors.TimeoutError):
        rest = []
    return [*first, *rest]


# How long a durable consumer may answer "no responders" (503) before its reader gives up and
# the partition makes the consumer again: longer than a JetStream cluster's elections (meta
# leader, then the consumer's own leader: 4-9 s each) take.
UNAVAILABLE_SECONDS = 30.0
UNAVAILABLE_PAUSE = 0.25


class PullReader:
    """Reads a durable pull consumer with :func:`fetch_available`, riding out its leader
    elections.

    A consumer of a replicated stream lives on while its leader's server dies: JetStream elects
    another, and until then answers each pull with 503 "no responders". Making the consumer
    again then (delete and create, each a request to the meta leader, which may be electing
    too) would take longer than the election itself; so a 503 is waited out, pulling again every
    ``UNAVAILABLE_PAUSE`` seconds, for at most ``UNAVAILABLE_SECONDS`` in a row, then raised
    (the caller makes the consumer again: it may really be gone).
    """

    def __init__(self, sub: Any, batch: int, timeout: float) -> None:
        self.sub = sub
        self.batch = batch
        self.timeout = timeout
        self.unavailable_since: float | None = None

    async def next(self) -> list[Msg]:
        """The next messages (``[]`` when none came within the timeout, or during an election)."""
        try:
            msgs = await fetch_available(self.sub, self.batch, self.timeout)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            now = asyncio.get_running_loop().time()
            if self.unavailable_since is None:
                self.unavailable_since = now
                log.warning("consumer unavailable (leader election?), waiting")
            elif now - self.unavailable_since > UNAVAILABLE_SECONDS:
                raise
            await asyncio.sleep(UNAVAILABLE_PAUSE)
            return []
        if self.unavailable_since is not None:
            log.info("consumer available again")
            self.unavailable_since = None
        return msgs
