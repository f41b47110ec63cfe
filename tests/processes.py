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
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from tests.conftest import ROOT
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

__all__ = ["IngestProcess", "Publisher", "eventually"]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:.0f} s: {what}")
        await asyncio.sleep(0.1)


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
            "TWINSTORE_INGEST_PARTITIONS": str(partitions),
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
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

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
