"""Health and readiness, OpenAPI, settings, migrations, CLI help, no-users refusal."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx

from tests.conftest import ROOT
from twinstore.api.app import create_app
from twinstore.runtime import Runtime
from twinstore.settings import Settings, load_settings
from twinstore.store.schema import MIGRATIONS, migrate


async def test_ready_reports_database_and_nats(client: httpx.AsyncClient) -> None:
    r = await client.get("/ready", auth=None)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "UP"
    assert body["children"]["database"]["status"] == "UP"
    assert body["children"]["nats"]["status"] == "UP"
    live = await client.get("/health", auth=None)
    assert (live.status_code, live.json()) == (200, {"status": "UP"})


async def test_ready_is_503_when_database_is_down(settings: Settings, runtime: Runtime) -> None:
    broken = Runtime(settings)
    broken.pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    broken.nc = runtime.nc
    await broken.pool.close()
    ok, body = await broken.ready()
    assert not ok
    assert body["children"]["database"]["status"] == "DOWN"
    app = create_app(settings, broken)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/ready")
        live = await c.get("/health")
    assert r.status_code == 503
    assert r.json()["children"]["database"]["status"] == "DOWN"
    assert r.json()["children"]["nats"]["status"] == "UP"
    assert live.status_code == 200


async def test_openapi_document_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/2/openapi/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/api/2/things/{thingId}" in paths
    assert "/api/2/things/{thingId}/features/{featureId}/properties/{propertyPath}" in paths
    assert set(paths["/api/2/things/{thingId}"]) >= {"get", "put", "patch", "delete"}


async def test_server_without_users_refuses_requests(settings: Settings, runtime: Runtime) -> None:
    open_settings = load_settings({}, database_url=settings.database_url, nats_url=settings.nats_url)
    assert open_settings.users_file is None
    no_users = Runtime(open_settings)
    no_users.service = runtime.service
    app = create_app(open_settings, no_users)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/api/2/things/org.test:x", auth=("ditto", "ditto"))
    assert r.status_code == 401
    assert r.json()["error"] == "gateway:authentication.failed"


async def test_concurrent_migrations_apply_once(scratch_database: str) -> None:
    cons = [await asyncpg.connect(scratch_database) for _ in range(4)]
    try:
        versions = await asyncio.gather(*(migrate(c) for c in cons))
        assert versions == [len(MIGRATIONS)] * 4
        rows = await cons[0].fetch("SELECT version FROM twinstore_migrations ORDER BY version")
        assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        for c in cons:
            await c.close()


def test_settings_precedence(tmp_path: Path) -> None:
    config = tmp_path / "twinstore.toml"
    config.write_text('port = 9001\nhost = "0.0.0.0"\nsnapshot_every = 7\n')
    s = load_settings({"TWINSTORE_PORT": "9002"}, config, host=None)
    assert (s.port, s.host, s.snapshot_every) == (9002, "0.0.0.0", 7)
    assert load_settings({}, config, port=9003).port == 9003


def test_cli_help_explains_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "twinstore.cli", "serve", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0
    for option in ("--host", "--port", "--data-dir", "--config", "--users-file", "--database-url"):
        assert option in out.stdout
    top = subprocess.run([sys.executable, "-m", "twinstore.cli", "--help"], capture_output=True, text=True)
    assert "TWINSTORE_DATABASE_URL" in top.stdout and "migrate" in top.stdout


def test_cli_migrate(scratch_database: str) -> None:
    url = scratch_database
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "twinstore.cli",
            "migrate",
            "--database-url",
            url,
            "--nats-url",
            "nats://unused",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert f"version {len(MIGRATIONS)}" in out.stdout
