"""Publishing to JetStream with acknowledgements, at the cost of a core NATS publish.

JetStream acknowledges a message published with a reply subject by sending its ``PubAck``
(``{"stream": "...", "seq": 7}``, or ``{"error": {...}}``) to that subject. nats-py's
``publish_async`` does exactly this, but spends more per message than the relay's whole
decision (a semaphore whose ``locked()`` scans its waiters, a NUID, a dataclass built from every
ack); measured on the relay: 50 µs per event, most of it there. Here every message gets the
reply subject ``<inbox>.<n>`` of one wildcard subscription, which resolves the message's future:
with the ack's bytes, or with :class:`PublishError` for an error or "no responders" (no stream
takes the subject). A message whose ack never comes stays pending: callers bound their wait
(the relay republishes the batch; JetStream drops the duplicates by ``Nats-Msg-Id``).

Messages are sent in the order of :meth:`JetStreamPublisher.publish` calls on one connection,
so one subject's messages are stored in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

__all__ = ["JetStreamPublisher", "PublishError"]


class PublishError(Exception):
    """JetStream did not store the message (its error, or no stream for the subject).

    ``code`` is the status JetStream gave (e.g. 400 for a message over the stream's size
    limit, 503 for no responders), ``None`` when there was none: a 4xx is permanent for that
    message, anything else may pass later.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class JetStreamPublisher:
    """Publish with acks through one reply subscription (see the module)."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._prefix = ""
        self._sub: Any = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._tokens = itertools.count(1)

    async def start(self) -> None:
        if self._sub is None:
            self._prefix = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_ack)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):  # the connection is closing anyway
                await sub.unsubscribe()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PublishError("the publisher stopped"))
        self._pending.clear()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> asyncio.Future[bytes]:
        """Send one message; the returned future resolves when JetStream has stored it."""
        if self._sub is None:
            await self.start()
        token = str(next(self._tokens))
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            await self.nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return future

    def forget(self, futures: list[asyncio.Future[bytes]]) -> None:
        """Stop waiting for these (e.g. after a timeout): late acks are then ignored."""
        waiting = set(map(id, futures))
        for token in [t for t, f in self._pending.items() if id(f) in waiting]:
            del self._pending[token]

    async def _on_ack(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[len(self._prefix) + 1 :], None)
        if future is None or future.done():
            return
        data = msg.data
        if not data:  # a status message: 503 "no responders" (no stream for the subject)
            status = (msg.headers or {}).get("Status", "")
            code = int(status) if status.isdigit() else None
            future.set_exception(PublishError(f"no stream stored the message (status {status or '?'})", code))
        elif data.startswith(b'{"error"') or b'"error":' in data[:64]:
            future.set_exception(PublishError(data.decode(errors="replace"), _error_code(data)))
        else:
            future.set_result(data)


def _error_code(data: bytes) -> int | None:
    """The ``code`` of a JetStream error reply ``{"error": {"code": 400, ...}}``."""
    try:
        error = orjson.loads(data).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) else None
