"""The attack suite's fixtures: clients for three users of the module's real ``twinstore serve``
process (``live_server`` in tests/conftest.py).

Users (see ``users_file`` in tests/conftest.py): ``ditto`` (nginx:ditto), ``other``
(nginx:other) and ``eve`` (nginx:eve), each with a password of the same name pattern below.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio

from tests.conftest import ServerProcess

USERS = {"ditto": ("ditto", "ditto"), "other": ("other", "secret"), "eve": ("eve", "eve-secret")}


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
