"""What a pull consumer does while its leader is elected or its deliveries are lost, on the test
NATS (a single server: the faults are made directly, the cluster test makes them by killing).

* a pull answered "no responders" (503: no consumer leader, or no consumer) is waited out by
  :class:`~twinstore.bus.partitions.PullReader` for a while, then raised;
* ingest applies a partition only up to a gap in the consumer's delivery numbers (deliveries
  that never arrived), so no update is applied before an earlier one of the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import nats
import nats.js.api
import nats.js.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS

from twinstore.bus import partitions as partitions_module
from twinstore.bus.ingest import IngestSubjects
from twinstore.bus.partitions import PullReader
from twinstore.bus.streams import ensure_stream
from twinstore.ingest import _PartitionRun

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def stream(servers: tuple[str, str]) -> AsyncIterator[tuple[NATS, str, str]]:
    """A stream of its own on the test NATS: (connection, stream name, subject)."""
    nc = await nats.connect(servers[1])
    name = f"CF_{secrets.token_hex(4).upper()}"
    subject = f"{name.lower()}.x"
    await ensure_stream(nc.jetstream(), name, [subject], 600)
    try:
        yield nc, name, subject
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(name)
        await nc.close()


async def consumer(js: Any, name: str, durable: str) -> None:
    await js.add_consumer(
        name, nats.js.api.ConsumerConfig(durable_name=durable, ack_policy=nats.js.api.AckPolicy.EXPLICIT)
    )


async def test_a_consumer_without_a_leader_is_waited_out_then_raised(
    stream: tuple[NATS, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    nc, name, subject = stream
    js = nc.jetstream()
    await consumer(js, name, "reader")
    working = await js.pull_subscribe_bind("reader", name)
    # Pulls nobody answers: NATS says "no responders" (503), as a cluster does for a consumer
    # whose leader died until the next one is elected.
    nobody = nc.jetstream(prefix=f"nobody.{secrets.token_hex(3)}")
    unanswered = await nobody.pull_subscribe_bind("reader", name)
    monkeypatch.setattr(partitions_module, "UNAVAILABLE_SECONDS", 1.0)
    reader = PullReader(unanswered, 10, 0.5)
    assert await reader.next() == []  # waited out, not raised
    assert reader.unavailable_since is not None
    # answered again within the limit (a leader elected): the reader goes on
    reader.sub = working
    await js.publish(subject, b"1")
    assert [m.data for m in await reader.next()] == [b"1"]
    assert reader.unavailable_since is None
    # unanswered for longer than the limit: raised (the partition makes its consumer again)
    reader.sub = unanswered
    started = time.monotonic()
    with pytest.raises(nats.js.errors.ServiceUnavailableError):
        while True:
            assert await reader.next() == []
    assert 1.0 <= time.monotonic() - started < 3


async def test_ingest_applies_a_partition_only_up_to_a_gap_in_its_deliveries(
    stream: tuple[NATS, str, str],
) -> None:
    nc, name, subject = stream
    js = nc.jetstream()
    for i in range(4):
        await js.publish(subject, str(i).encode())
    await consumer(js, name, "gap")
    sub = await js.pull_subscribe_bind("gap", name)
    run = _PartitionRun(SimpleNamespace(subjects=IngestSubjects("cf", 4)), 0, asyncio.Event())  # type: ignore[arg-type]
    first = await sub.fetch(1, timeout=5)
    assert run.contiguous(first) == 1 and run.delivered == 1
    lost = await sub.fetch(1, timeout=5)  # delivery 2: "lost on its way" (never given to the run)
    assert lost[0].metadata.sequence.consumer == 2
    rest = await sub.fetch(2, timeout=5)  # deliveries 3 and 4
    assert [m.metadata.sequence.consumer for m in rest] == [3, 4]
    assert run.contiguous(rest) == 0  # nothing after the gap is applied
    assert run.delivered == 1
