"""The one partition function of twinstore: which of P partitions an entity id lives in.

Journal positions, relay leadership, event and ingest subjects and anomaly scoring all split
the id space with this function, so a thing lives in one partition end to end: its ingest
messages, its journal events (ordered by a position of that partition), the relay that
publishes them and the subject they are published on.

crc32 is stable across processes, versions and languages (an adapter written in another
language computes the same subject).

>>> partition_of("org.acme:pump-1", 16)
15
>>> partition_of("org.acme:pump-2", 64)
53
"""

from __future__ import annotations

import zlib

__all__ = ["DEFAULT_PARTITIONS", "MAX_PARTITIONS", "partition_key", "partition_of"]

# Enough to spread over many processes; fixed when a database is created (stored in it).
DEFAULT_PARTITIONS = 64
MAX_PARTITIONS = 1024


def partition_of(entity_id: str, partitions: int) -> int:
    """Stable partition of an entity id (things, policies; an anomaly label by its thing's id)."""
    return zlib.crc32(entity_id.encode()) % partitions


def partition_key(entity_id: str) -> str:
    """What an entity is partitioned by: its id; an anomaly label (``<thingId>/<featureId>``) its
    thing's id, so a thing's labels live in the thing's partition (thing ids hold no ``/``)."""
    return entity_id.partition("/")[0]
