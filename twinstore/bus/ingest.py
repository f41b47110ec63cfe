"""The ingestion wire format: what adapters publish to NATS JetStream and how (shared contract).

Adapters (``adapters/``) import only this module and :mod:`twinstore.bus.subjects`; the ingest
workers (``twinstore/ingest.py``) decode with it. Nothing here touches the database.

Subjects and streams (``prefix`` is the ``nats_prefix`` setting, ``P`` the ``partitions``
setting, the database's partition count: a publisher has no database, so it is configured with
the same number, 64 unless set):

* ``<prefix>.ingest.<p>`` with ``p = partition_of(thingId, P)`` (crc32 % P, the one partition
  function: the thing's journal partition, events subject and anomaly scorer are ``p`` too), in
  the stream ``<PREFIX>_INGEST`` whose subjects are exactly ``<prefix>.ingest.0`` …
  ``<prefix>.ingest.<P-1>``. A publisher configured with a larger count gets an error (no
  stream), never a silently unread subject; one with a smaller count has each row whose thing
  is not in the subject's partition refused (``ingest:thing.wrongPartition``). All updates of
  one thing travel on one subject, so they are applied in publish order; partitions are spread
  over the ingest workers.
* ``<prefix>.ingest.errors`` in the stream ``<PREFIX>_INGEST_ERRORS``: one JSON report per
  refused message or telemetry row (see ``twinstore.ingest``).

Two message forms, told apart by ``Content-Type`` (or, without it, by their JSON shape):

* a Ditto Protocol command envelope (``application/vnd.eclipse.ditto+json``):
  ``{"topic": "org.acme/pump-1/things/twin/commands/modify", "path": "/features/temp/properties/value",
  "value": 21.5}`` (``create``, ``modify``, ``merge``, ``delete``, as on the WebSocket);
* a telemetry batch (``application/vnd.twinstore.telemetry+json``): many property values of
  many things (of one partition) in one message, each row ``[thingId, path, value,
  sourceTimestampMs, quality]`` (the last two may be ``null`` or left out). Each row is applied
  as a merge of ``value`` at ``path`` (missing parents are created, as Ditto's merge does) and
  becomes one journal event that keeps the source timestamp and quality as its headers
  ``source-timestamp`` and ``source-quality`` (shown by history reads in ``historical-headers``).
  A message holds at most :data:`MAX_ROWS_PER_MESSAGE` rows (:func:`telemetry_messages` splits
  larger batches, and batches larger than the NATS server's ``max_payload`` when given
  ``max_bytes``; the worker refuses a message with more than ``ingest_max_rows_per_message``).
  A malformed row is refused on its own; the other rows of its message are applied.

Every message carries ``Nats-Msg-Id: <source>:<seq>`` (JetStream drops a republish within its
duplicate window), ``Twinstore-Source: <source>`` (the configured source: its subjects decide
what it may write) and ``Twinstore-Seq: <seq>``, a number that grows with every message of the
source (across restarts: :func:`initial_seq`); a message whose seq is not above the last one
applied from that source on its partition is a duplicate and is skipped, so a republish after
the duplicate window is still applied only once.

>>> subjects = IngestSubjects("twinstore", 4)
>>> rows = [Update("org.acme:a", "/features/t/properties/v", 1.5, 1_700_000_000_000, "Good"),
...         Update("org.acme:b", "/features/t/properties/v", 2)]
>>> msgs = telemetry_messages(subjects, "plc-1", 100, rows)
>>> [(m.subject, m.headers["Twinstore-Seq"]) for m in msgs]
[('twinstore.ingest.3', '100'), ('twinstore.ingest.1', '101')]
>>> decode_telemetry(msgs[0].payload)[0]
Update(thing_id='org.acme:a', path='/features/t/properties/v', value=1.5, ts=1700000000000, quality='Good')
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgspec

from twinstore.bus.subjects import partition_of
from twinstore.model.partition import DEFAULT_PARTITIONS

__all__ = [
    "COMMAND_TYPE",
    "MAX_ROWS_PER_MESSAGE",
    "SEQ_HEADER",
    "SOURCE_HEADER",
    "TELEMETRY_FRAME_BYTES",
    "TELEMETRY_TYPE",
    "EncodedUpdate",
    "IngestSubjects",
    "OutgoingMessage",
    "Update",
    "command_message",
    "decode_telemetry",
    "decode_telemetry_rows",
    "encode_update",
    "header_bytes",
    "initial_seq",
    "telemetry_messages",
]

COMMAND_TYPE = "application/vnd.eclipse.ditto+json"
TELEMETRY_TYPE = "application/vnd.twinstore.telemetry+json"
SOURCE_HEADER = "Twinstore-Source"
SEQ_HEADER = "Twinstore-Seq"
#: Rows per telemetry message an adapter sends (the worker's ``ingest_max_rows_per_message``
#: defaults to the same): one message is one unit of work and memory for the worker.
MAX_ROWS_PER_MESSAGE = 10_000


class Update(msgspec.Struct, array_like=True, frozen=True):
    """One property value from a source: ``[thingId, path, value, sourceTimestampMs, quality]``."""

    thing_id: str
    path: str
    value: Any
    ts: int | None = None
    quality: str | None = None


class _Telemetry(msgspec.Struct):
    updates: list[Update]


class _RawTelemetry(msgspec.Struct):
    updates: list[msgspec.Raw]


_encode = msgspec.json.Encoder().encode
_decode_telemetry = msgspec.json.Decoder(_Telemetry).decode
_decode_raw_telemetry = msgspec.json.Decoder(_RawTelemetry).decode
_decode_update = msgspec.json.Decoder(Update).decode


def decode_telemetry(payload: bytes) -> list[Update]:
    """The rows of a telemetry batch; ``msgspec.ValidationError`` / ``DecodeError`` if malformed."""
    return _decode_telemetry(payload).updates


def decode_telemetry_rows(payload: bytes) -> list[Update | msgspec.ValidationError]:
    """The rows of a telemetry batch, a malformed row as its error in its place (so that one
    bad row does not take its neighbours down); ``DecodeError`` when the message itself is not
    ``{"updates": [...]}``.

    >>> decode_telemetry_rows(b'{"updates": [["a:b", "/x", 1], ["a:b", 7, 2]]}')[1]
    ValidationError('Expected `str`, got `int` - at `$[1]`')
    """
    try:
        return list(_decode_telemetry(payload).updates)
    except msgspec.ValidationError:
        pass  # look at the rows one by one (the rare case: a well-formed batch is decoded once)
    rows: list[Update | msgspec.ValidationError] = []
    for raw in _decode_raw_telemetry(payload).updates:
        try:
            rows.append(_decode_update(raw))
        except msgspec.ValidationError as exc:
            rows.append(exc)
    return rows


class IngestSubjects(msgspec.Struct, frozen=True):
    prefix: str = "twinstore"
    partitions: int = DEFAULT_PARTITIONS

    @property
    def stream(self) -> str:
        return f"{self.prefix.upper().replace('.', '_')}_INGEST"

    @property
    def errors_stream(self) -> str:
        return f"{self.stream}_ERRORS"

    @property
    def errors_subject(self) -> str:
        return f"{self.prefix}.ingest.errors"

    def partition_subject(self, partition: int) -> str:
        return f"{self.prefix}.ingest.{partition}"

    def subject(self, thing_id: str) -> str:
        return self.partition_subject(partition_of(thing_id, self.partitions))

    @property
    def all_subjects(self) -> list[str]:
        return [self.partition_subject(p) for p in range(self.partitions)]


class OutgoingMessage(msgspec.Struct, frozen=True):
    """A message ready to publish (and to spool: it is complete, ids included)."""

    subject: str
    headers: dict[str, str]
    payload: bytes


def initial_seq(last: int = 0) -> int:
    """Where a source's sequence starts: above ``last`` (kept by the adapter) and above the time
    in microseconds, so a source that lost its state still counts upwards after a restart."""
    return max(last + 1, time.time_ns() // 1000)


def _headers(source: str, seq: int, content_type: str) -> dict[str, str]:
    return {
        "Nats-Msg-Id": f"{source}:{seq}",
        SOURCE_HEADER: source,
        SEQ_HEADER: str(seq),
        "Content-Type": content_type,
    }


#: A row encoded once, ``(thing_id, JSON of the row)``: an adapter can check a row's size and
#: then batch it without encoding it again (a plain tuple: this is per row, on the hot path).
EncodedUpdate = tuple[str, bytes]


def encode_update(update: Update) -> EncodedUpdate:
    """``update`` as the JSON of one telemetry row (msgspec's errors if its value is not JSON)."""
    return update.thing_id, _encode(update)


#: The bytes of a telemetry message besides its rows and the commas between them.
TELEMETRY_FRAME_BYTES = len(b'{"updates":[]}')


def header_bytes(headers: dict[str, str]) -> int:
    """The bytes the NATS headers of a message take on the wire: the server compares headers
    plus payload with its ``max_payload`` (a client only checks the payload, and the server
    closes the connection on the violation)."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def telemetry_messages(
    subjects: IngestSubjects,
    source: str,
    next_seq: int,
    updates: Iterable[Update | EncodedUpdate],
    max_bytes: int | None = None,
) -> list[OutgoingMessage]:
    """One telemetry message per partition the rows fall on (more when a partition has more
    than :data:`MAX_ROWS_PER_MESSAGE` rows, or rows that together exceed ``max_bytes`` of
    payload), numbered from ``next_seq`` up (the caller's next seq is ``next_seq +
    len(result)``); row order is kept per thing. A row larger than ``max_bytes`` on its own
    travels alone (the caller decides whether to send it at all)."""
    by_subject: dict[str, list[bytes]] = {}
    subject_of: dict[str, str] = {}  # a batch holds many rows of few things
    for update in updates:
        thing_id, data = update if isinstance(update, tuple) else encode_update(update)
        subject = subject_of.get(thing_id)
        if subject is None:
            subject = subject_of[thing_id] = subjects.subject(thing_id)
        by_subject.setdefault(subject, []).append(data)
    budget = max_bytes if max_bytes is not None else 1 << 62
    chunks: list[tuple[str, list[bytes]]] = []
    for subject, rows in by_subject.items():
        chunk: list[bytes] = []
        size = TELEMETRY_FRAME_BYTES
        for row in rows:
            if chunk and (len(chunk) >= MAX_ROWS_PER_MESSAGE or size + 1 + len(row) > budget):
                chunks.append((subject, chunk))
                chunk, size = [], TELEMETRY_FRAME_BYTES
            size += len(row) + (1 if chunk else 0)
            chunk.append(row)
        if chunk:
            chunks.append((subject, chunk))
    return [
        OutgoingMessage(
            subject, _headers(source, next_seq + i, TELEMETRY_TYPE), b'{"updates":[' + b",".join(rows) + b"]}"
        )
        for i, (subject, rows) in enumerate(chunks)
    ]


def command_message(
    subjects: IngestSubjects, source: str, seq: int, envelope: dict[str, Any]
) -> OutgoingMessage:
    """A Ditto Protocol command envelope for the thing named by its topic."""
    parts = str(envelope.get("topic", "")).split("/")
    if len(parts) < 2:
        raise ValueError(f"not a thing command topic: {envelope.get('topic')!r}")
    subject = subjects.subject(f"{parts[0]}:{parts[1]}")
    return OutgoingMessage(subject, _headers(source, seq, COMMAND_TYPE), _encode(envelope))
