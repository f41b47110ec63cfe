"""One subscriber's bounded queue: events (``twinstore.fanout``) and live messages
(``twinstore.messages``) reach WebSocket and SSE clients through it.

A full queue drops its subscriber rather than grow: the producer never waits for a slow
client, memory stays bounded, and the reader learns why on its next :meth:`Mailbox.get`.

>>> box: Mailbox[int] = Mailbox(maxsize=2, noun="events")
>>> box.put(1), box.put(2), box.put(3)
(True, True, False)
>>> box.reason
'too slow: 2 events behind'
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Mailbox", "SlowConsumerError"]

T = TypeVar("T")


class SlowConsumerError(Exception):
    """The subscriber did not keep up and was dropped (the message is the reason)."""


class Mailbox(Generic[T]):
    """Items for one reader, at most ``maxsize`` waiting; then the reader is dropped."""

    def __init__(self, maxsize: int, noun: str = "items") -> None:
        self.maxsize = maxsize
        self.noun = noun
        self.reason: str | None = None
        self._items: deque[T] = deque()
        self._wake = asyncio.Event()

    def put(self, item: T) -> bool:
        """Queue ``item``; False (the subscriber dropped, its queue emptied) when full."""
        if self.reason is not None:
            return False
        if len(self._items) >= self.maxsize:
            self.drop(f"too slow: {len(self._items)} {self.noun} behind")
            return False
        self._items.append(item)
        self._wake.set()
        return True

    def drop(self, reason: str) -> None:
        """End the subscription: the reader's next :meth:`get` raises with ``reason``."""
        self.reason = self.reason or reason
        self._items.clear()
        self._wake.set()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> T:
        """The next item; raises :class:`SlowConsumerError` once dropped."""
        while not self._items:
            if self.reason is not None:
                raise SlowConsumerError(self.reason)
            self._wake.clear()
            await self._wake.wait()
        if self.reason is not None:
            raise SlowConsumerError(self.reason)
        return self._items.popleft()
