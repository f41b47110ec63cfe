"""The attack suite's fixtures: a real ``twinstore serve`` process (uvicorn's own handling of
headers, proxies and slow clients applies) and clients for three users.

Users (see ``users_file`` in tests/conftest.py): ``ditto`` (nginx:ditto), ``other``
(nginx:other) and ``eve`` (nginx:eve), each with a password of the same name pattern below.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.conftest import ServerProcess
from twinstore.runtime import Runtime
from twinstore.settings import Settings

USERS = {"ditto": ("ditto", "ditto"), "other": ("other", "secret"), "eve": ("eve", "eve-secret")}


@pytest.fixture(scope="module")
def live_server(settings: Settings, runtime: Runtime) -> Iterator[ServerProcess]:
    """One real server process per test module, on the session's database and NATS."""
    proc = ServerProcess(settings).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def live(live_server: ServerProcess) -> AsyncIterator[dict[str, Any]]:
    """An httpx client per user against the live server: ``live["ditto"]``, ``live["eve"]``."""
    clients = {
        name: httpx.AsyncClient(base_url=live_server.url, auth=auth, timeout=30)
        for name, auth in USERS.items()
    }
    try:
        yield clients
    finally:
        for c in clients.values():
            await c.aclose()
