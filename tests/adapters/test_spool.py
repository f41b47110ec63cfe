"""The spool: order, durability across reopen, a torn tail cut off, the bound, seqs kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.spool import Spool, SpoolError, SpoolFullError
from twinstore.bus.ingest import SEQ_HEADER, OutgoingMessage


def message(seq: int, size: int = 10) -> OutgoingMessage:
    return OutgoingMessage(
        f"p.ingest.{seq % 4}", {SEQ_HEADER: str(seq), "Nats-Msg-Id": f"s:{seq}"}, b"x" * size
    )


def seqs(messages: list[OutgoingMessage]) -> list[int]:
    return [int(m.headers[SEQ_HEADER]) for m in messages]


async def test_messages_come_out_in_order_and_commit_drops_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1_000_000)
    await spool.append([message(i) for i in range(1, 6)])
    await spool.append([message(i) for i in range(6, 11)])
    assert seqs(spool.peek(3)) == [1, 2, 3]
    assert seqs(spool.peek(100)) == list(range(1, 11))
    spool.commit(4)
    assert seqs(spool.peek(100)) == list(range(5, 11))
    assert spool.pending == 6
    spool.commit(6)
    assert spool.peek(10) == [] and spool.pending == 0 and spool.pending_bytes == 0
    with pytest.raises(ValueError):
        spool.commit(1)
    spool.close()


async def test_a_reopened_spool_resumes_where_it_was_and_keeps_the_last_seq(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1_000_000, segment_bytes=200)  # many segments
    await spool.append([message(i) for i in range(1, 51)])
    spool.commit(17)
    spool.close()
    again = Spool(tmp_path, 1_000_000, segment_bytes=200)
    assert again.pending == 33
    assert seqs(again.peek(100)) == list(range(18, 51))
    assert again.last_seq == 50
    again.commit(33)
    again.close()
    empty = Spool(tmp_path, 1_000_000, segment_bytes=200)
    assert empty.pending == 0 and empty.last_seq == 50  # kept in the head after everything went
    assert len(list(tmp_path.glob("*.seg"))) == 1  # used segments are deleted
    empty.close()


async def test_a_torn_last_record_is_discarded_on_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1_000_000)
    await spool.append([message(i, 100) for i in range(1, 4)])
    spool.close()
    [segment] = tmp_path.glob("*.seg")
    data = segment.read_bytes()
    segment.write_bytes(data[:-30])  # the crash tore the third record
    again = Spool(tmp_path, 1_000_000)
    assert seqs(again.peek(10)) == [1, 2]
    assert segment.stat().st_size < len(data) - 30  # cut back to the last whole record
    await again.append([message(4)])
    assert seqs(again.peek(10)) == [1, 2, 4]
    again.close()


async def test_a_damaged_record_is_detected_by_its_crc(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1_000_000)
    await spool.append([message(i, 100) for i in range(1, 4)])
    spool.close()
    [segment] = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last record's body
    segment.write_bytes(bytes(data))
    again = Spool(tmp_path, 1_000_000)
    assert seqs(again.peek(10)) == [1, 2]
    again.close()


async def test_a_full_spool_refuses_the_whole_append_until_a_commit_makes_room(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1_000)
    await spool.append([message(i, 100) for i in range(1, 6)])
    with pytest.raises(SpoolFullError):
        await spool.append([message(i, 100) for i in range(6, 11)])
    assert seqs(spool.peek(100)) == [1, 2, 3, 4, 5]  # nothing of the refused batch was written
    spool.commit(5)
    await spool.append([message(i, 100) for i in range(6, 11)])
    assert seqs(spool.peek(100)) == [6, 7, 8, 9, 10]
    assert spool.pending_bytes <= 1_000
    spool.close()


def test_one_spool_directory_is_used_by_one_process(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1_000)
    with pytest.raises(SpoolError):
        Spool(tmp_path, 1_000)
    spool.close()
    Spool(tmp_path, 1_000).close()
