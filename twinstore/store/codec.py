"""JSON encoding for the store and the hash chain of the journal.

The journal keeps ``value`` in a ``json`` column holding exactly the canonical text that was
hashed (sorted keys, orjson), so an auditor can recompute every hash from the stored rows.

>>> from datetime import datetime, UTC
>>> h = chain_hash(GENESIS, "thing", "a:b", 1, datetime(2026, 1, 1, tzinfo=UTC), "created",
...                "/", b'{"thingId":"a:b"}', "nginx:ditto", None)
>>> len(h)
32
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

import orjson

from twinstore.model.errors import JsonInvalidError

__all__ = ["GENESIS", "canonical", "chain_hash", "dumps", "loads", "storable"]

GENESIS = b"\x00" * 32

loads = orjson.loads


def dumps(value: Any) -> str:
    """Compact JSON text (for jsonb parameters)."""
    return orjson.dumps(value).decode()


def canonical(value: Any) -> bytes:
    """The canonical encoding hashed and stored in the journal (sorted keys)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


# An escaped NUL (``\u0000`` after an even number of backslashes) in encoded JSON.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def storable(encoded: bytes) -> bytes:
    """``encoded`` JSON if PostgreSQL can store it, else :class:`JsonInvalidError` (400).

    PostgreSQL's jsonb and text cannot hold U+0000; refusing it per write keeps one bad
    value from failing the whole group-commit transaction it shares with other writes.

    >>> storable(b'{"a":"x"}')
    b'{"a":"x"}'
    >>> storable(canonical({"a": chr(0)}))
    Traceback (most recent call last):
    ...
    twinstore.model.errors.JsonInvalidError: JSON strings and keys must not contain the NUL ...
    """
    if _NUL.search(encoded):
        raise JsonInvalidError("JSON strings and keys must not contain the NUL character (\\u0000).")
    return encoded


def chain_hash(
    previous: bytes,
    entity: str,
    entity_id: str,
    revision: int,
    ts: datetime,
    action: str,
    path: str,
    value: bytes | None,
    originator: str,
    correlation_id: str | None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """sha-256 over the previous hash and the canonical encoding of one journal row.

    ``headers`` (kept with ingested events: source, sequence, timestamp, quality) are hashed
    only when present, so rows without them hash exactly as before the column existed.
    """
    fields: list[Any] = [
        entity,
        entity_id,
        revision,
        ts.isoformat(timespec="microseconds"),
        action,
        path,
        originator,
        correlation_id,
    ]
    if headers:
        fields.append(headers)
    header = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(previous)
    digest.update(len(header).to_bytes(4, "big"))
    digest.update(header)
    digest.update(value if value is not None else b"null")
    return digest.digest()
