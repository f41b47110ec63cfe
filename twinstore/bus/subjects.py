"""NATS subjects and streams of twinstore (one place; adapters and workers use it).

Committed events go to ``<prefix>.events.<partition>`` where ``partition`` is
``partition_of(thing_id, partitions)`` (crc32 % the database's partition count, the thing's
journal and ingest partition too): all events of one thing land on one subject, in revision
order, and consumers can spread partitions over workers.

Live messages (Ditto's ``/inbox`` / ``/outbox`` messages) go to ``<prefix>.messages.<partition>``
on core NATS only (not in any stream: Ditto does not persist live messages); the responses to
one process's waiting senders come back on its own ``<prefix>.replies.<process>`` subject.

>>> Subjects("twinstore", 16).event_subject("org.acme:pump-1")
'twinstore.events.15'
"""

from __future__ import annotations

import msgspec

from twinstore.model.partition import DEFAULT_PARTITIONS, partition_of

__all__ = ["Subjects", "partition_of"]



class Subjects(msgspec.Struct, frozen=True):
    prefix: str = "twinstore"
    partitions: int = DEFAULT_PARTITIONS

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper().replace('.', '_')}_EVENTS"

    @property
    def events_wildcard(self) -> str:
        return f"{self.prefix}.events.>"

    def event_subject(self, thing_id: str) -> str:
        return f"{self.prefix}.events.{partition_of(thing_id, self.partitions)}"

    @property
    def messages_wildcard(self) -> str:
        return f"{self.prefix}.messages.>"

    def message_subject(self, thing_id: str) -> str:
        """Where live messages of a thing are published (core NATS, every process listens)."""
        return f"{self.prefix}.messages.{partition_of(thing_id, self.partitions)}"

    def replies_subject(self, process: str) -> str:
        """Where responses to the live messages sent by one process come back."""
        return f"{self.prefix}.replies.{process}"
