"""Persistence: schema, codec, the journal (event store with projection and snapshots)."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = ["Connection"]

#: A plain connection or one acquired from a pool (asyncpg types them apart).
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
