"""Connection guards for ``twinstore serve`` (:func:`uvicorn_options`, also for ``--workers``).

uvicorn has ``timeout_keep_alive`` for idle connections between requests, but nothing bounds a
request head that has started and never completes (slowloris: half-sent requests were held for
as long as the clients liked), nor a connection that sends nothing; and it accepts connections
until the process runs out of file descriptors. :class:`GuardedHttpToolsProtocol` (uvicorn's
httptools protocol, what ``http="auto"`` picks with uvicorn[standard]) and
:class:`GuardedH11Protocol` add:

* ``max_connections``: a connection beyond it is answered 503 and closed at accept, before any
  request is read (HTTP and WebSocket connections count); lowered at start to stay
  :data:`FD_RESERVE` below the open-file limit (:func:`connection_cap`);
* ``header_read_timeout_seconds``: a request head not complete that long after the connection
  opened, or after the previous response ended (keep-alive), is answered 408 and closed.

uvicorn's proxy-header handling is off: it trusts ``X-Forwarded-For`` from 127.0.0.1 by default,
which let any local process claim a pre-authenticated address;
:func:`twinstore.api.auth.forwarded_client` believes the header only from ``trusted_proxies``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import resource
from typing import Any, cast

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from twinstore.settings import Settings

__all__ = [
    "FD_RESERVE",
    "GuardedH11Protocol",
    "GuardedHttpToolsProtocol",
    "connection_cap",
    "uvicorn_options",
]

log = logging.getLogger("twinstore.api")

# File descriptors kept for what is not a client connection: the database pool, NATS, the
# listening sockets, log files, the embedded servers' pipes, imports.
FD_RESERVE = 128


def _canned(status: int, reason: str, error: str, message: str, description: str) -> bytes:
    body = orjson.dumps({"status": status, "error": error, "message": message, "description": description})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


TOO_MANY_CONNECTIONS = _canned(
    503,
    "Service Unavailable",
    "gateway:connections.toomany",
    "The server has too many open connections.",
    "Retry later, or through another replica (see the max_connections setting).",
)
HEAD_TIMEOUT = _canned(
    408,
    "Request Timeout",
    "gateway:request.timeout",
    "The request line and headers were not received in time.",
    "Send the request head at once (see the header_read_timeout_seconds setting).",
)


class _Guard:
    """Mixed into uvicorn's HTTP protocols: a connection cap at accept, and a deadline for
    every request head (from the connection's start, and from the end of each response).

    A request costs one ``loop.time()``: the deadlines are not timers (a timer per request cost
    as much CPU as the rest of the guard), but one sweep a second per event loop over the
    server's connections closes those whose head is overdue (so the deadline is kept to within
    a second)."""

    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def __init__(self, *args: Any, max_connections: int, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_connections = max_connections
        self._header_timeout = header_timeout
        self._head_since: float | None = None  # when waiting for a request head began
        self._head_cycle: Any = None  # the request cycle then (a new one: a head arrived)
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self._max_connections:
            self._refused = True
            writer = cast(asyncio.WriteTransport, transport)  # uvloop's is no subclass of it
            writer.write(TOO_MANY_CONNECTIONS)
            writer.close()
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()
        _sweep_started(self.loop, self.connections, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._head_since = None
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._head_since = None  # the transport now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _arm(self) -> None:
        self._head_since = self.loop.time()
        self._head_cycle = self.cycle

    def _overdue(self, now: float) -> None:
        """Called by the sweep: answer 408 and close when no head arrived in time."""
        since = self._head_since
        if since is None or now - since < self._header_timeout or self.transport.is_closing():
            return
        if self.cycle is not self._head_cycle:
            self._head_since = None  # a head arrived; its response's end arms the deadline again
            return
        if self._head_cycle is not None and not self._head_cycle.response_complete:
            return  # a response is still going out
        self._head_since = None
        self.transport.write(HEAD_TIMEOUT)
        self.transport.close()


_SWEEPS: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}


def _sweep_started(loop: asyncio.AbstractEventLoop, connections: set[Any], timeout: float) -> None:
    """One task per event loop that checks every connection's head deadline once a second."""
    if loop in _SWEEPS:
        return

    async def sweep() -> None:
        interval = min(1.0, timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for connection in list(connections):
                if isinstance(connection, _Guard):
                    connection._overdue(now)

    _SWEEPS[loop] = loop.create_task(sweep())


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with the connection cap and the head deadline."""


class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection cap and the head deadline."""


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to stay :data:`FD_RESERVE` below the open-file limit (whose
    soft value is first raised towards the hard one when that is needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    cap = max(1, soft - FD_RESERVE)
    log.warning(
        "max_connections lowered to stay below the open-file limit",
        extra={"max_connections": max_connections, "nofile": soft, "cap": cap},
    )
    return cap


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn settings of every ``twinstore serve`` process (one worker or many)."""
    return {
        # A partial of a module-level class: picklable for the --workers processes.
        "http": functools.partial(
            GuardedHttpToolsProtocol,
            max_connections=connection_cap(settings.max_connections),
            header_timeout=settings.header_read_timeout_seconds,
        ),
        "proxy_headers": False,
        "server_header": False,
    }
