"""Real twinstore processes and publishers for the fault tests (shared by several modules).

:class:`~tests.conftest.ServerProcess` is the ``twinstore serve`` process; this module has the
``twinstore ingest`` process and an adapter-like JetStream publisher.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from nats.aio.client import Client as NATS

from tests.conftest import ROOT, bounded, eventually, kill_process, stop_process
from twinstore.audit import verify_database
from twinstore.bus.ingest import (
    SEQ_HEADER,
    SOURCE_HEADER,
    IngestSubjects,
    OutgoingMessage,
    Update,
    command_message,
    initial_seq,
    telemetry_messages,
)

__all__ = [
    "DB_ERRORS",
    "PATH",
    "Feed",
    "IngestProcess",
    "Publisher",
    "assert_exactly_once_in_order",
    "eventually",
    "journal_values",
]

PATH = "/features/t/properties/v"  # where Feed writes
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

SELECT_VALUES = """
SELECT id, path, value::text AS value FROM journal
WHERE entity = 'thing' AND id = any($1::text[]) ORDER BY id, revision
"""


class IngestProcess:
    """A real ``twinstore ingest`` process (JSON logs in a file of its own)."""

    def __init__(
        self,
        database_url: str,
        nats_url: str,
        prefix: str,
        log_dir: Path,
        sources: dict[str, list[str]],
        partitions: int,
        **env: str,
    ) -> None:
        self.env = {
            **os.environ,
            "TWINSTORE_DATABASE_URL": database_url,
            "TWINSTORE_NATS_URL": nats_url,
            "TWINSTORE_NATS_PREFIX": prefix,
            "TWINSTORE_INGEST_SOURCES": json.dumps(sources),
            "TWINSTORE_INGEST_DEFAULT_SUBJECTS": "[]",
            "TWINSTORE_PARTITIONS": str(partitions),
            "TWINSTORE_INGEST_BATCH": "100",  # many batches: a kill lands between or inside one
            "TWINSTORE_POOL_SIZE": "4",
            "TWINSTORE_RELAY_POLL_INTERVAL": "0.2",
            **env,
        }
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def start(self) -> IngestProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"ingest-{secrets.token_hex(3)}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twinstore.cli", "ingest"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        return self

    async def ready(self, timeout: float = 30.0) -> IngestProcess:
        async def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"twinstore ingest exited:\n{self.logs()[-3000:]}")
            return '"msg":"ingesting"' in self.logs()

        await eventually(up, timeout, f"twinstore ingest ready\n{self.logs()[-3000:]}")
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no batch finished, nothing given back (its PostgreSQL sessions just end)."""
        if self.proc is not None:
            kill_process(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path is not None else ""


class Publisher:
    """Publishes straight to JetStream as an adapter does: one source, growing sequence numbers."""

    def __init__(self, nc: NATS, subjects: IngestSubjects, source: str) -> None:
        self.js = nc.jetstream()
        self.subjects = subjects
        self.source = source
        self.seq = initial_seq()

    async def send(self, message: OutgoingMessage) -> int:
        """Publish (awaiting JetStream's ack); the message's stream sequence."""
        ack = await self.js.publish(message.subject, message.payload, headers=message.headers, timeout=5)
        return int(ack.seq)

    async def values(self, updates: list[Update]) -> list[int]:
        messages = telemetry_messages(self.subjects, self.source, self.seq, updates)
        self.seq += len(messages)
        return [await self.send(m) for m in messages]

    async def command(self, envelope: dict[str, Any]) -> int:
        message = command_message(self.subjects, self.source, self.seq, envelope)
        self.seq += 1
        return await self.send(message)

    async def raw(self, subject: str, payload: bytes, content_type: str) -> int:
        """A message with this source's headers and any payload (poison)."""
        headers = {
            "Nats-Msg-Id": f"{self.source}:{self.seq}",
            SOURCE_HEADER: self.source,
            SEQ_HEADER: str(self.seq),
            "Content-Type": content_type,
        }
        self.seq += 1
        return await self.send(OutgoingMessage(subject, headers, payload))


class Feed:
    """Publishes one value per thing per step (0, 1, 2, ...) until stopped; remembers what was
    acknowledged by JetStream (a publish that raised is retried with the same rows and ids)."""

    def __init__(self, send: Callable[[list[Update]], Awaitable[object]], things: list[str]) -> None:
        self.send = send
        self.things = things
        self.sent: dict[str, list[int]] = {t: [] for t in things}
        self.steps = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, pause: float) -> Feed:
        self._task = asyncio.create_task(self._run(pause))
        return self

    async def _run(self, pause: float) -> None:
        while not self._stop.is_set():
            step = self.steps
            await self.send([Update(t, PATH, step) for t in self.things])
            for t in self.things:
                self.sent[t].append(step)
            self.steps += 1
            await asyncio.sleep(pause)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> dict[str, list[int]]:
        self._stop.set()
        assert self._task is not None
        await bounded(self._task, 30, "the feed's last publish")
        return self.sent


async def journal_values(url: str, things: list[str]) -> dict[str, list[Any]]:
    """Each thing's values at PATH in revision order."""
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(SELECT_VALUES, things)
    finally:
        await con.close()
    found: dict[str, list[Any]] = {t: [] for t in things}
    for r in rows:
        if r["path"] == PATH:
            found[r["id"]].append(orjson.loads(r["value"]))
    return found


async def assert_exactly_once_in_order(url: str, expected: dict[str, list[Any]], timeout: float) -> None:
    """Wait until every expected value is in the journal, then: exactly those, in that order
    per thing (revisions gapless and the hash chains intact: the audit verifies)."""
    things = list(expected)

    async def complete() -> bool:
        try:
            got = await journal_values(url, things)
        except DB_ERRORS:
            return False
        return all(len(got[t]) >= len(expected[t]) for t in things)

    total = sum(len(v) for v in expected.values())
    await eventually(complete, timeout, f"all {total} values in the journal")
    await asyncio.sleep(1.0)  # an assertion of absence: a late duplicate would show up now
    got = await journal_values(url, things)
    for t in things:
        assert got[t] == expected[t], (
            f"{t}: {len(got[t])} values in the journal for {len(expected[t])} sent; first difference at "
            f"{next((i for i, (a, b) in enumerate(zip(got[t], expected[t], strict=False)) if a != b), None)}"
        )
    report = await verify_database(url, checkpoints="none")
    assert report.ok, report.breaks
