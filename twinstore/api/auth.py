"""The one place an HTTP request or WebSocket upgrade is authenticated (every route calls
:func:`authenticate`), and where sessions that outlive their request (WebSocket, SSE) learn
that their credentials ended (:class:`CredentialWatch`)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from litestar.connection import ASGIConnection

from twinstore.auth import AuthContext
from twinstore.logs import set_field

__all__ = ["CredentialWatch", "authenticate", "forwarded_client"]

log = logging.getLogger("twinstore.auth")

T = TypeVar("T")


async def authenticate(
    connection: ASGIConnection[Any, Any, Any, Any], *, authorization: str | None = None
) -> AuthContext:
    """The caller's subjects (401 ``gateway:authentication.failed`` when none can be established).

    ``authorization`` replaces the ``Authorization`` header (the WebSocket's ``?access_token=``
    and its ``JWT-TOKEN`` refresh, which browsers cannot send as a header).
    """
    client = connection.client
    peer = client.host if client is not None else None
    headers: Any = connection.headers
    runtime = connection.app.state.runtime
    forwarded = forwarded_client(peer, headers.get("x-forwarded-for"), runtime.settings.trusted_proxies)
    if authorization is not None:
        headers = {**{k.lower(): v for k, v in connection.headers.items()}, "authorization": authorization}
    context: AuthContext = await runtime.auth.authenticate(headers, peer, forwarded)
    set_field("subject", context.subject)  # on the request's log lines from now on
    return context


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in cidrs)


def forwarded_client(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[str]
) -> str | None:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    ``X-Forwarded-For`` entry that is not itself a trusted proxy (the rightmost ones are
    the ones the trusted proxies appended; entries further left are the client's word).

    >>> forwarded_client("127.0.0.1", "10.9.9.9", [])
    '127.0.0.1'
    >>> forwarded_client("10.0.0.2", "6.6.6.6, 192.0.2.1, 10.0.0.3", ["10.0.0.0/24"])
    '192.0.2.1'
    """
    if not trusted_proxies or not forwarded_for or peer is None:
        return peer
    networks = _networks(tuple(trusted_proxies))

    def trusted(host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == n.version and address in n for n in networks)

    if not trusted(peer):
        return peer
    client = peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        client = hop
        if not trusted(hop):
            break
    return client


class CredentialWatch:
    """Ends a session when its credentials end: a JWT's ``exp`` passes, or its basic user is
    removed from the users file or gets another password (the file is re-read when it changes,
    checked every ``credentials_recheck_seconds``). ``current`` gives the session's credentials
    at each check (a WebSocket may refresh its token)."""

    def __init__(self, runtime: Any, current: Callable[[], AuthContext]) -> None:
        self.current = current
        self.reason: str | None = None
        self.ended: asyncio.Task[str] = asyncio.ensure_future(
            runtime.auth.until_ended(current, runtime.settings.credentials_recheck_seconds)
        )
        self.ended.add_done_callback(self._note)

    def _note(self, task: asyncio.Task[str]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.reason = task.result()
            log.info("session ended: %s", self.reason, extra={"subject": self.current().subject})

    async def next(self, source: Callable[[], Awaitable[T]], timeout: float) -> T | None:
        """``await source()``, or None after ``timeout`` seconds or once the credentials ended
        (then :attr:`reason` is set). Errors of ``source`` are raised."""
        if self.ended.done():
            return None
        item = asyncio.ensure_future(source())
        done, _ = await asyncio.wait({item, self.ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if item in done and self.reason is None:
            return item.result()
        item.cancel()
        return None

    def close(self) -> None:
        self.ended.cancel()
