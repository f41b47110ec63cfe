"""A search while the database is unreachable: 503 things:persistence.unavailable with a fixed
message; the driver's text (which names hosts, pools and states of the server) goes only to the
operator's log (issue 15: no driver text in client-visible errors)."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from twinstore.auth import AuthContext
from twinstore.model.errors import UnavailableError
from twinstore.runtime import Runtime
from twinstore.search import SearchService
from twinstore.settings import Settings


async def test_a_search_during_an_outage_is_503_without_the_drivers_text(
    settings: Settings, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    assert settings.database_url is not None
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    await pool.close()  # every acquire now fails inside the driver
    service = SearchService(pool, runtime.search.cache)
    with caplog.at_level(logging.WARNING, "twinstore.search"), pytest.raises(UnavailableError) as raised:
        await service.count(AuthContext(subjects=("nginx:ditto",)), None, None)
    body = raised.value.to_dict()
    assert (body["status"], body["error"]) == (503, "things:persistence.unavailable")
    assert body["message"] == "The database is not reachable; retry later."
    assert "pool" not in str(body).lower()
    assert "pool" in caplog.text.lower()  # the operator still sees why
