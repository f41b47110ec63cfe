"""Spool: a bounded, fsynced, append-only on-disk queue of :class:`OutgoingMessage`.

The store-and-forward buffer of an adapter (:class:`adapters.base.Forwarder`): every message is
on disk (fsynced) before the adapter acknowledges its source, and leaves the spool only after
JetStream acknowledged it. Files in ``directory``::

    00000000000000000001.seg   segments: records appended in order, rolled at ``segment_bytes``
    00000000000000000002.seg
    head                       where the oldest pending record is, and the source's last seq
    lock                       flock'd while a Spool is open (one process per spool)

A record is ``<u32 length><u32 crc32(body)><body>``, body = msgpack of the message. After a
crash the last record may be torn (short or with a wrong crc): it is detected when the spool
opens and cut off (it was never acknowledged to the source, because ``append`` had not
returned). ``head`` is replaced atomically (write, fsync, rename, fsync directory).

Sequence numbers: ``last_seq`` is the highest ``Twinstore-Seq`` ever appended (kept in
``head`` when messages are committed, and found again in the pending records), so
:func:`twinstore.bus.ingest.initial_seq` keeps counting upwards across restarts.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> spool = Spool(d, 1_000_000)
>>> m = OutgoingMessage("p.ingest.0", {SEQ_HEADER: "7"}, b"{}")
>>> asyncio.run(spool.append([m, m]))
>>> len(spool.peek(10)), spool.last_seq
(2, 7)
>>> spool.commit(1); spool.close()
>>> again = Spool(d, 1_000_000)
>>> again.pending, again.last_seq
(1, 7)
>>> again.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

from twinstore.bus.ingest import SEQ_HEADER, OutgoingMessage

__all__ = ["Spool", "SpoolError", "SpoolFullError"]

log = logging.getLogger("adapters.spool")

_RECORD = struct.Struct("<II")  # body length, crc32(body)
_HEAD = struct.Struct("<QQQ")  # head segment, offset in it, last seq
_SUFFIX = ".seg"


class SpoolError(Exception):
    """The spool cannot be used (locked by another process, unreadable)."""


class SpoolFullError(SpoolError):
    """``append`` would exceed ``max_bytes``: nothing was written; retry after a ``commit``."""


class _Position(msgspec.Struct, frozen=True, order=True):
    segment: int
    offset: int


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(OutgoingMessage).decode


def _seq_of(message: OutgoingMessage) -> int:
    try:
        return int(message.headers.get(SEQ_HEADER, 0))
    except ValueError:
        return 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A bounded on-disk FIFO of messages; see the module docstring.

    ``append`` may run in a worker thread while ``peek`` / ``commit`` run in another: the
    in-memory state is guarded by one lock, file writes happen only at the tail, reads and
    deletions only at the head.
    """

    def __init__(self, directory: Path, max_bytes: int, *, segment_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(64 * 1024 * 1024, max_bytes // 8))
        self._lock = threading.Lock()
        self._append_lock = asyncio.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            raise SpoolError(f"spool {self.directory} is in use by another process") from exc
        # Records read ahead by peek(): (message, position after it), oldest first.
        self._ahead: deque[tuple[OutgoingMessage, _Position]] = deque()
        self._head, self.last_seq = self._read_head()
        self._sizes: dict[int, int] = {}  # segment -> bytes (valid records only)
        self.pending = 0
        self._recover()
        self._tail_segment = max(self._sizes) if self._sizes else self._head.segment
        self._tail_fd = self._open_tail()

    # -- public ------------------------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Bytes of the records not committed yet (what ``max_bytes`` bounds)."""
        with self._lock:
            return self._pending_bytes_locked()

    async def append(self, messages: list[OutgoingMessage]) -> None:
        """Append ``messages`` in order and fsync before returning; :class:`SpoolFullError`
        (nothing written) if they do not fit in ``max_bytes``."""
        if not messages:
            return
        data = bytearray()
        for message in messages:
            body = _encode(message)
            data += _RECORD.pack(len(body), zlib.crc32(body))
            data += body
        async with self._append_lock:  # one writer at a time, in call order
            with self._lock:
                if self._pending_bytes_locked() + len(data) > self.max_bytes:
                    raise SpoolFullError(
                        f"spool {self.directory} full: {self._pending_bytes_locked()} pending bytes "
                        f"+ {len(data)} > {self.max_bytes}"
                    )
            await asyncio.to_thread(self._write, bytes(data))
            with self._lock:
                self.pending += len(messages)
                self.last_seq = max(self.last_seq, *(_seq_of(m) for m in messages))

    def peek(self, n: int) -> list[OutgoingMessage]:
        """Up to ``n`` of the oldest pending messages, oldest first (they stay in the spool)."""
        with self._lock:
            if len(self._ahead) < n:
                self._read_ahead(n - len(self._ahead))
            return [message for message, _ in list(self._ahead)[:n]]

    def commit(self, n: int) -> None:
        """Drop the ``n`` oldest messages, durably (``head`` is replaced and fsynced)."""
        if n <= 0:
            return
        with self._lock:
            if len(self._ahead) < n:
                self._read_ahead(n - len(self._ahead))
            if len(self._ahead) < n:
                raise ValueError(f"commit({n}) but only {len(self._ahead)} messages pending")
            for _ in range(n):
                _, position = self._ahead.popleft()
            self._head = position
            self.pending -= n
            self._write_head()
            drop = [s for s in self._sizes if s < self._head.segment]
            if self._head.segment < self._tail_segment and self._head.offset >= self._sizes.get(
                self._head.segment, 0
            ):
                # The head segment is used up and no longer written: step to the next one.
                drop.append(self._head.segment)
                self._head = _Position(min(s for s in self._sizes if s > self._head.segment), 0)
                self._write_head()
            for segment in drop:
                self._sizes.pop(segment, None)
                self._segment_path(segment).unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._tail_fd)
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)

    # -- files -------------------------------------------------------------------------------

    def _segment_path(self, segment: int) -> Path:
        return self.directory / f"{segment:020d}{_SUFFIX}"

    def _pending_bytes_locked(self) -> int:
        return sum(self._sizes.values()) - (self._head.offset if self._head.segment in self._sizes else 0)

    def _read_head(self) -> tuple[_Position, int]:
        try:
            raw = (self.directory / "head").read_bytes()
        except FileNotFoundError:
            return _Position(1, 0), 0
        if len(raw) != _HEAD.size + 4 or zlib.crc32(raw[: _HEAD.size]) != int.from_bytes(raw[-4:], "little"):
            raise SpoolError(f"spool {self.directory}: head file is damaged")
        segment, offset, last_seq = _HEAD.unpack(raw[: _HEAD.size])
        return _Position(segment, offset), last_seq

    def _write_head(self) -> None:
        body = _HEAD.pack(self._head.segment, self._head.offset, self.last_seq)
        tmp = self.directory / "head.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body + zlib.crc32(body).to_bytes(4, "little"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / "head")
        _fsync_dir(self.directory)

    def _recover(self) -> None:
        """Scan the pending records: count them, find the last seq, cut a torn tail."""
        segments = sorted(
            int(p.name.removesuffix(_SUFFIX)) for p in self.directory.glob(f"*{_SUFFIX}") if p.stem.isdigit()
        )
        for segment in segments:
            if segment < self._head.segment:  # committed, deletion was interrupted
                self._segment_path(segment).unlink(missing_ok=True)
                continue
            start = self._head.offset if segment == self._head.segment else 0
            valid = start
            path = self._segment_path(segment)
            with path.open("rb") as file:
                file.seek(start)
                for message, length in _records(file):
                    self.pending += 1
                    self.last_seq = max(self.last_seq, _seq_of(message))
                    valid += length
            size = path.stat().st_size
            if valid < size:
                log.warning(
                    "spool %s: discarding %d bytes of a torn or damaged record at the end of %s",
                    self.directory,
                    size - valid,
                    path.name,
                    extra={"segment": segment, "offset": valid},
                )
                with path.open("r+b") as file:
                    file.truncate(valid)
                    os.fsync(file.fileno())
            self._sizes[segment] = valid
        head_size = self._sizes.get(self._head.segment)
        if head_size is None:  # the head's segment is gone (never written): the next one, if any
            later = [s for s in self._sizes if s > self._head.segment]
            self._head = _Position(min(later) if later else self._head.segment, 0)
        elif self._head.offset > head_size:
            self._head = _Position(self._head.segment, head_size)

    def _open_tail(self) -> int:
        path = self._segment_path(self._tail_segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sizes.setdefault(self._tail_segment, os.fstat(fd).st_size)
        _fsync_dir(self.directory)
        return fd

    def _write(self, data: bytes) -> None:
        """Write at the tail (rolling to a new segment when the current one is full), fsync."""
        if self._sizes.get(self._tail_segment, 0) >= self.segment_bytes:
            os.fsync(self._tail_fd)
            os.close(self._tail_fd)
            with self._lock:
                self._tail_segment += 1
            self._tail_fd = self._open_tail()
        view = memoryview(data)
        while view:
            written = os.write(self._tail_fd, view)
            view = view[written:]
        os.fsync(self._tail_fd)
        with self._lock:
            self._sizes[self._tail_segment] = self._sizes.get(self._tail_segment, 0) + len(data)

    def _read_ahead(self, n: int) -> None:
        """Read up to ``n`` more records after the ones already read ahead (lock held)."""
        position = self._ahead[-1][1] if self._ahead else self._head
        while n > 0:
            size = self._sizes.get(position.segment)
            if size is None:
                return
            if position.offset >= size:
                following = [s for s in self._sizes if s > position.segment]
                if not following:
                    return
                position = _Position(min(following), 0)
                continue
            with self._segment_path(position.segment).open("rb") as file:
                file.seek(position.offset)
                offset = position.offset
                for message, length in _records(file, limit=size - position.offset):
                    offset += length
                    self._ahead.append((message, _Position(position.segment, offset)))
                    n -= 1
                    if n == 0:
                        break
            if offset == position.offset:
                return
            position = _Position(position.segment, offset)


def _records(file: BinaryIO, limit: int | None = None) -> Iterator[tuple[OutgoingMessage, int]]:
    """The valid records of an open segment from its current position, with their sizes; stops
    at the end, after ``limit`` bytes, or at the first torn or damaged record."""
    left = limit
    while left is None or left >= _RECORD.size:
        header = file.read(_RECORD.size)
        if len(header) < _RECORD.size:
            return
        length, crc = _RECORD.unpack(header)
        if left is not None and _RECORD.size + length > left:
            return
        body = file.read(length)
        if len(body) < length or zlib.crc32(body) != crc:
            return
        try:
            message = _decode(body)
        except msgspec.DecodeError:
            return
        if left is not None:
            left -= _RECORD.size + length
        yield message, _RECORD.size + length
