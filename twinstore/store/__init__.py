"""Persistence: schema, codec, the journal (event store with projection and snapshots)."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["Connection", "is_unavailable"]

#: A plain connection or one acquired from a pool (asyncpg types them apart).
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

# SQLSTATE classes of a database that cannot serve now (the same request may succeed later):
# 08 connection, 28 authorization (credentials changed), 3D database missing (dropped, renamed),
# 40 transaction rollback (serialization, deadlock), 53 insufficient resources (too many
# connections, disk full), 57 operator intervention (shutdown, restart, cancel), 58 system error.
_UNAVAILABLE_CLASSES = frozenset({"08", "28", "3D", "40", "53", "57", "58"})


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database (or the network to it) is not available, rather than
    that a statement's input was refused: the one place such errors are told apart, so they
    become 503 ``things:persistence.unavailable`` everywhere and nothing else does."""
    if isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _UNAVAILABLE_CLASSES
    return False
