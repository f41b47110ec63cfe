"""The connections twinstore keeps open outside the pool notice when they go silent.

A server whose machine is lost (or cut off by a partition) closes nothing: a connection that
only waits, as a LISTEN connection does, would wait forever and miss every notification. The
policy listener's misses matter most: a permission revoked by another process would stay in
this process's policy cache. Here the listener reaches the session database through a
:class:`tests.ha.blackhole.BlackHole`; once that swallows everything, the listener must forget
the whole cache (``on_change(None)``) and go on trying to reconnect, within a bound.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import bounded, eventually
from tests.ha.blackhole import BlackHole
from twinstore.runtime import Runtime, connect
from twinstore.settings import Settings
from twinstore.store.policies import HEARTBEAT_TIMEOUT, POLICY_CHANNEL, PolicyStore

pytestmark = pytest.mark.timeout(60)


def server_address(url: str) -> tuple[str, int]:
    """Host (or unix socket directory) and port of a single-host URL."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["/var/run/postgresql"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    return host, port


async def test_policy_listener_forgets_the_cache_when_its_connection_goes_silent(
    settings: Settings, runtime: Runtime
) -> None:
    assert settings.database_url is not None and runtime.pool is not None and runtime.recorder is not None
    hole = BlackHole(*server_address(settings.database_url))
    database = urlsplit(settings.database_url).path.lstrip("/")
    url = f"postgresql://postgres@127.0.0.1:{await hole.start()}/{database}"
    store = PolicyStore(runtime.pool, recorder=runtime.recorder)
    changes: list[str | None] = []
    stop = asyncio.Event()
    listening = asyncio.create_task(store.listen(connect(url, timeout=2), changes.append, stop))
    try:
        await eventually(lambda: changes == [None], 10, "the listener connected (its first forget-all)")
        async with runtime.pool.acquire() as con:
            await con.execute("SELECT pg_notify($1, $2)", POLICY_CHANNEL, "org.ha:listened")
        await eventually(
            lambda: "org.ha:listened" in changes, 10, "a policy change notified through the proxy"
        )
        seen = len(changes)
        hole.swallow()
        await eventually(
            lambda: None in changes[seen:],
            HEARTBEAT_TIMEOUT + 10,
            "the listener forgetting every cached policy after its connection went silent",
        )
    finally:
        stop.set()
        await bounded(listening, 15, "the policy listener's stop")
        await hole.close()
