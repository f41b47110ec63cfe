"""Small helpers shared by the HTTP API tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import orjson

from twinstore.bus.relay import relay_lock_class

if TYPE_CHECKING:
    from twinstore.runtime import Runtime
    from twinstore.settings import Settings

JSON = {"content-type": "application/json"}
MERGE = {"content-type": "application/merge-patch+json"}
JSON_PATCH = {"content-type": "application/json-patch+json"}


def body(value: Any) -> bytes:
    """``value`` as JSON bytes (httpx's ``json=None`` would send no body at all)."""
    return orjson.dumps(value)


def url(thing_id: str, path: str = "") -> str:
    return f"/api/2/things/{thing_id}{path}"


def assert_error(r: httpx.Response, status: int, error: str) -> dict[str, Any]:
    """``r`` is a Ditto error response with ``status`` and error code ``error`` (required: a
    status alone does not say which of a dozen refusals it was)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["status"] == status, body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body.get("description"), str), body
    assert body["error"] == error, body
    return body  # type: ignore[no-any-return]


async def create(client: httpx.AsyncClient, thing_id: str, body: dict[str, Any] | None = None) -> None:
    r = await client.put(url(thing_id), json=body if body is not None else {})
    assert r.status_code == 201, r.text


async def revision(client: httpx.AsyncClient, thing_id: str) -> int:
    """The thing's revision, read two ways (fields=_revision and the ETag), which must agree."""
    r = await client.get(url(thing_id), params={"fields": "_revision"})
    assert r.status_code == 200, r.text
    rev = r.json()["_revision"]
    assert r.headers["etag"] == f'"rev:{rev}"'
    return int(rev)


async def thing(client: httpx.AsyncClient, thing_id: str) -> dict[str, Any]:
    r = await client.get(url(thing_id))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def full_access(*subjects: str) -> dict[str, Any]:
    """A policy granting ``subjects`` READ and WRITE on everything (like Ditto's default policy)."""
    rights = {"grant": ["READ", "WRITE"], "revoke": []}
    return {
        "entries": {
            "owner": {
                "subjects": {s: {"type": "test"} for s in subjects},
                "resources": {"thing:/": rights, "policy:/": rights, "message:/": rights},
            }
        }
    }


async def make_policy(client: httpx.AsyncClient, policy_id: str, doc: dict[str, Any] | None = None) -> None:
    """Create (or replace) a policy; by default one giving ``nginx:ditto`` full access."""
    r = await client.put(
        f"/api/2/policies/{policy_id}", json=doc if doc is not None else full_access("nginx:ditto")
    )
    assert r.status_code in (201, 204), r.text


@contextlib.asynccontextmanager
async def relay_held(runtime: Runtime, settings: Settings) -> AsyncIterator[None]:
    """No relay publishes in the block: this process's is stopped and the test holds the locks
    of every journal partition a relay needs to publish it (other processes' relays of the same
    prefix started inside the block get none); afterwards the local relay starts again."""
    assert runtime.relay is not None and runtime.recorder is not None
    assert settings.database_url is not None
    con = await asyncpg.connect(settings.database_url)
    try:
        await runtime.relay.stop()
        await con.execute("SET statement_timeout = '15s'")
        await con.execute(
            "SELECT pg_advisory_lock($1, p) FROM generate_series(0, $2::int - 1) AS p",
            relay_lock_class(runtime.subjects),
            runtime.recorder.partitions,
        )
        yield
    finally:
        await con.close()  # releases the locks
        runtime.relay.start()
