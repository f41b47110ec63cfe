"""Store and forward: a Forwarder publishing while its (private) NATS server stops and comes
back, and across a restart of the adapter: every update arrives once, in order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
import nats.js.api
import pytest

from adapters.base import Forwarder, desired_values, load_config
from adapters.spool import SpoolFullError
from tests.adapters.conftest import PrivateNats, read_stream
from tests.conftest import bounded
from twinstore.bus.ingest import SEQ_HEADER, IngestSubjects, Update, decode_telemetry

SUBJECTS = IngestSubjects("fwd", 4)


async def make_stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(
            nats.js.api.StreamConfig(name=SUBJECTS.stream, subjects=SUBJECTS.all_subjects)
        )
    finally:
        await nc.close()


def rows(start: int, count: int) -> list[Update]:
    return [Update(f"org.test:t{i % 5}", "/features/f/properties/v", i) for i in range(start, start + count)]


async def wait_for_values(
    url: str, expect: int, timeout: float = 30
) -> tuple[list[Any], list[str], list[int]]:
    """(values in stream order, Nats-Msg-Ids, seqs) once the stream holds ``expect`` values."""
    nc = await nats.connect(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            messages = await read_stream(nc, SUBJECTS.stream, 0)
            values = [u.value for m in messages for u in decode_telemetry(m.data)]
            if len(values) >= expect or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
    ids = [m.headers["Nats-Msg-Id"] for m in messages if m.headers]
    seqs = [int(m.headers[SEQ_HEADER]) for m in messages if m.headers]
    return values, ids, seqs


async def test_nats_stopped_and_restarted_while_publishing_loses_and_duplicates_nothing(
    private_nats: PrivateNats, tmp_path: Path
) -> None:
    await make_stream(private_nats.url)
    forwarder = Forwarder(
        private_nats.url, SUBJECTS, "plc-1", tmp_path / "spool", 10_000_000, max_backoff=0.5
    )
    await forwarder.start()
    try:
        sent = 0
        for _ in range(20):  # NATS up
            await forwarder.send_updates(rows(sent, 10))
            sent += 10
            await asyncio.sleep(0.01)
        private_nats.stop()
        for _ in range(30):  # NATS down: send_updates still returns (spooled)
            await forwarder.send_updates(rows(sent, 10))
            sent += 10
            await asyncio.sleep(0.01)
        assert forwarder.pending > 0
        private_nats.start()
        for _ in range(20):  # and back
            await forwarder.send_updates(rows(sent, 10))
            sent += 10
            await asyncio.sleep(0.01)
        values, ids, seqs = await wait_for_values(private_nats.url, sent)
    finally:
        await bounded(forwarder.stop(), 20, "stopping the forwarder")
    assert len(ids) == len(set(ids)), "a message was stored twice"
    assert sorted(values) == list(range(sent)), "an update was lost or duplicated"
    assert seqs == sorted(seqs), "published out of order"
    per_thing: dict[int, list[int]] = {}
    for v in values:
        per_thing.setdefault(v % 5, []).append(v)
    assert all(vs == sorted(vs) for vs in per_thing.values()), "a thing's updates out of order"
    assert forwarder.pending == 0


async def test_an_adapter_restarted_while_nats_is_down_resumes_its_spool(
    private_nats: PrivateNats, tmp_path: Path
) -> None:
    await make_stream(private_nats.url)
    spool = tmp_path / "spool"
    first = Forwarder(private_nats.url, SUBJECTS, "plc-2", spool, 10_000_000, max_backoff=0.5)
    await first.start()
    await first.send_updates(rows(0, 10))
    await wait_for_values(private_nats.url, 10)
    private_nats.stop()
    await first.send_updates(rows(10, 10))
    await first.send_updates(rows(20, 10))
    await first.stop(flush_timeout=0.5)  # NATS is away: the rest stays spooled
    last_seq_before = 0
    second = Forwarder(private_nats.url, SUBJECTS, "plc-2", spool, 10_000_000, max_backoff=0.5)
    await second.start()
    try:
        assert second.pending > 0
        last_seq_before = second.spool.last_seq
        await second.send_updates(rows(30, 10))
        assert second.spool.last_seq > last_seq_before  # seqs keep growing across the restart
        private_nats.start()
        values, ids, seqs = await wait_for_values(private_nats.url, 40)
    finally:
        await bounded(second.stop(), 20, "stopping the forwarder")
    assert sorted(values) == list(range(40))
    assert len(ids) == len(set(ids)) and seqs == sorted(seqs)


async def test_a_full_spool_holds_the_sender_until_nats_takes_messages(
    private_nats: PrivateNats, tmp_path: Path
) -> None:
    await make_stream(private_nats.url)
    private_nats.stop()
    forwarder = Forwarder(private_nats.url, SUBJECTS, "plc-3", tmp_path / "spool", 4_000, max_backoff=0.2)
    await forwarder.start()
    try:
        sent = 0
        while True:  # fill the spool while NATS is down
            try:
                await asyncio.wait_for(forwarder.send_updates(rows(sent, 5)), 0.5)
            except TimeoutError:
                break  # held back: the spool is full
            sent += 5
        assert forwarder.spool.pending_bytes <= 4_000
        held = asyncio.create_task(forwarder.send_updates(rows(sent, 5)))
        await asyncio.sleep(0.3)  # an assertion of absence: the send stays held while NATS is down
        assert not held.done()
        private_nats.start()
        await asyncio.wait_for(held, 20)
        sent += 5
        values, _, _ = await wait_for_values(private_nats.url, sent)
        assert sorted(values) == list(range(sent))
        with pytest.raises(SpoolFullError):  # a batch larger than the whole spool never fits
            await forwarder.send_updates(rows(0, 1000))
    finally:
        await bounded(forwarder.stop(), 20, "stopping the forwarder")


def test_load_config_reads_yaml_and_toml(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("source: plc\nmqtt:\n  url: mqtt://h:1\n")
    (tmp_path / "a.toml").write_text('source = "plc"\n[mqtt]\nurl = "mqtt://h:1"\n')
    assert (
        load_config(tmp_path / "a.yaml")
        == load_config(tmp_path / "a.toml")
        == {
            "source": "plc",
            "mqtt": {"url": "mqtt://h:1"},
        }
    )


def test_desired_values_of_events_at_every_depth() -> None:
    topic = "org.acme/p/things/twin/events/"
    thing = {"features": {"f": {"properties": {"a": 1}, "desiredProperties": {"a": 2, "b": {"c": 3}}}}}
    created = {"topic": topic + "created", "path": "/", "value": thing}
    assert [(d.feature, d.path, d.value) for d in desired_values(created)] == [
        ("f", "/a", 2),
        ("f", "/b/c", 3),
    ]
    leaf = {"topic": topic + "modified", "path": "/features/f/desiredProperties/b/c", "value": 4}
    assert [(d.thing_id, d.path, d.value) for d in desired_values(leaf)] == [("org.acme:p", "/b/c", 4)]
    assert desired_values({"topic": topic + "modified", "path": "/features/f/properties/a", "value": 1}) == []
    assert desired_values({"topic": topic + "deleted", "path": "/features/f/desiredProperties"}) == []
