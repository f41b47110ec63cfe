"""Structured logs: JSON lines, and the correlation id on every line a request or command causes."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from tests.api.test_ws import BASIC, ask, command, serving
from tests.conftest import AUTH, new_thing_id
from twinstore.api.app import create_app
from twinstore.logs import ContextFilter, JsonFormatter, bound, configure_logging
from twinstore.runtime import Runtime
from twinstore.settings import Settings


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The process's JSON log output (configure_logging as the CLI does) while the test runs."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


@pytest.fixture
def logged(settings: Settings) -> Settings:
    """The test settings with the access log on."""
    return msgspec.structs.replace(settings, access_log=True)


@pytest_asyncio.fixture(loop_scope="session")
async def client(logged: Settings, runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of an app with the access log on."""
    transport = httpx.ASGITransport(app=create_app(logged, runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=AUTH) as c:
        yield c


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line
    return lines


def log_inside(target: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``target.name`` log a line (logger tests.inside) before doing its work."""
    original = getattr(target, name)

    async def logged(*args: Any, **kwargs: Any) -> Any:
        logging.getLogger("tests.inside").info("inside %s", name)
        return await original(*args, **kwargs)

    monkeypatch.setattr(target, name, logged)


async def test_request_lines_carry_its_correlation_id_and_subject(
    client: httpx.AsyncClient, runtime: Runtime, log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runtime.service is not None
    log_inside(runtime.service, "write", monkeypatch)
    thing_id = new_thing_id()
    r = await client.put(f"/api/2/things/{thing_id}", json={}, headers={"correlation-id": "log-test-1"})
    assert r.status_code == 201 and r.headers["correlation-id"] == "log-test-1"
    lines = parsed(log_lines)
    inside = [x for x in lines if x["logger"] == "tests.inside"]
    assert inside and all(x["correlation_id"] == "log-test-1" for x in inside)
    assert inside[0]["subject"] == "nginx:ditto"
    (access,) = [x for x in lines if x["logger"] == "twinstore.access"]
    assert access["correlation_id"] == "log-test-1" and access["subject"] == "nginx:ditto"
    assert (access["method"], access["path"], access["status"]) == ("PUT", f"/api/2/things/{thing_id}", 201)
    assert access["route"] == "/api/2/things/{thingId}" and access["duration_ms"] > 0
    assert access["msg"] == f"PUT /api/2/things/{thing_id} 201"


async def test_request_without_one_logs_the_id_it_answers_with(
    client: httpx.AsyncClient, log_lines: io.StringIO
) -> None:
    r = await client.get(f"/api/2/things/{new_thing_id()}")  # 404: through the error handler
    assert r.status_code == 404
    (access,) = [x for x in parsed(log_lines) if x["logger"] == "twinstore.access"]
    assert access["correlation_id"] == r.headers["correlation-id"] and access["status"] == 404
    r = await client.get("/no/such/route")
    assert r.status_code == 404
    lines = [x for x in parsed(log_lines) if x["logger"] == "twinstore.access"]
    assert (
        lines[-1]["correlation_id"] == r.headers["correlation-id"] and lines[-1]["path"] == "/no/such/route"
    )


async def test_websocket_command_lines_carry_the_command_correlation_id(
    logged: Settings, runtime: Runtime, log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runtime.service is not None
    log_inside(runtime.service, "write", monkeypatch)
    thing_id = new_thing_id()
    async with serving(logged, runtime) as url, connect(url + "/ws/2", additional_headers=BASIC) as ws:
        created = await ask(ws, command(thing_id, "create", value={}, cid="ws-cmd-1"))
        assert created["status"] == 201
        modified = await ask(ws, command(thing_id, "modify", "/attributes/a", 1, cid="ws-cmd-2"))
        assert modified["status"] == 201
    lines = parsed(log_lines)
    inside = [x["correlation_id"] for x in lines if x["logger"] == "tests.inside"]
    assert inside == ["ws-cmd-1", "ws-cmd-2"]
    (session,) = [x for x in lines if x["logger"] == "twinstore.access"]
    assert (session["method"], session["path"], session["status"]) == ("WS", "/ws/2", 101)
    assert session["subject"] == "nginx:ditto"


async def test_access_log_off_logs_only_errors_and_slow_requests(
    settings: Settings, runtime: Runtime, log_lines: io.StringIO
) -> None:
    assert not settings.access_log  # the default
    transport = httpx.ASGITransport(app=create_app(settings, runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=AUTH) as c:
        assert (await c.put(f"/api/2/things/{new_thing_id()}", json={})).status_code == 201
    assert not [x for x in parsed(log_lines) if x["logger"] == "twinstore.access"]


def test_json_lines_are_valid_with_context_extra_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("tests.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with bound(partition=3, thing_id="a:b"):
            logger.warning('with "quotes"\nand a newline', extra={"thing_id": "own:id", "keys": {1: "x"}})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    first, second, third = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "warning" and first["msg"] == 'with "quotes"\nand a newline'
    assert first["partition"] == 3 and first["thing_id"] == "own:id"  # a record's own extra wins
    assert first["keys"] == {"1": "x"}
    assert second["partition"] == 3 and "ValueError: boom" in second["exc"]
    assert "partition" not in third and third["ts"].endswith("+00:00")
