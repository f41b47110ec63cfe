"""Opening PostgreSQL connections: every host of a multi-host URL gets a timeout of its own.

A URL such as ``postgresql://u@pg-a:5432,pg-b:5432/db?target_session_attrs=read-write`` names a
primary and its standby; asyncpg tries the hosts in order and keeps the first that accepts
writes. But asyncpg bounds the whole attempt with one ``timeout`` (60 s by default): a host that
vanished without refusing connections (its machine gone, a network partition: no RST, the SYN or
the startup packet just goes unanswered) uses all of it, the next host is never tried, and after
a failover twinstore could not reach the promoted standby at all. libpq's ``connect_timeout`` is
per host; :func:`connect` does the same: each host of the URL is tried on its own (the rest of the
URL, ``target_session_attrs`` included, unchanged) for at most ``timeout`` seconds.

URLs with one host, unix sockets or hosts given in the query (``?host=``) go to asyncpg as they
are, with ``timeout`` for the whole attempt.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

__all__ = ["connect", "hosts"]

DEFAULT_PORT = 5432


def hosts(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs of a multi-host URL's netloc, in order; ``[]`` when the URL
    has fewer than two (asyncpg handles those alone).

    >>> hosts("postgresql://u@pg-a:5433,pg-b/db?target_session_attrs=read-write")
    [('pg-a', 5433), ('pg-b', 5432)]
    >>> hosts("postgresql://u@[::1]:5433,10.0.0.2:5434/db")
    [('::1', 5433), ('10.0.0.2', 5434)]
    >>> hosts("postgresql://u@pg-a:5432/db")
    []
    """
    netloc = urlsplit(url).netloc
    spec = netloc.rpartition("@")[2]
    if "," not in spec:
        return []
    out = []
    for part in spec.split(","):
        if part.startswith("["):  # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = part.partition(":")
        out.append((unquote(host), int(port) if port else DEFAULT_PORT))
    return out


async def connect(dsn: str, *, timeout: float = 60.0, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect(dsn, **kwargs)``, each host of a multi-host ``dsn`` tried for at most
    ``timeout`` seconds (see the module); the last host's error when none is usable.

    Also the ``connect`` of :func:`asyncpg.create_pool`, which passes its own keywords."""
    pairs = hosts(dsn)
    if not pairs:
        return await asyncpg.connect(dsn, timeout=timeout, **kwargs)
    last: BaseException | None = None
    for host, port in pairs:
        try:
            return await asyncpg.connect(dsn, host=host, port=port, timeout=timeout, **kwargs)
        except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.PostgresError) as exc:
            # refused, unreachable (TimeoutError is an OSError), not writable (target_session_attrs),
            # starting up or shutting down: the next host may serve
            last = exc
    assert last is not None
    raise last
