"""Graceful shutdown of real processes: SIGTERM ends sessions properly and exits 0 in time."""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import AUTH, INGEST_SOURCES, ServerProcess, new_thing_id
from tests.processes import IngestProcess
from twinstore.runtime import Runtime
from twinstore.settings import Settings

pytestmark = [pytest.mark.asyncio(loop_scope="session")]

BASIC = {"authorization": "Basic " + base64.b64encode(b"ditto:ditto").decode()}
GRACE = 25.0  # the default shutdown_grace_seconds


@pytest.fixture
def server(settings: Settings, runtime: Runtime) -> Iterator[ServerProcess]:
    proc = ServerProcess(settings, TWINSTORE_ANOMALY_ENABLED="false", TWINSTORE_INGEST_ENABLED="false")
    yield proc.start()
    proc.kill()


def phases(logs: str) -> list[str]:
    lines = [orjson.loads(line) for line in logs.splitlines() if line.startswith("{")]
    return [x["phase"] for x in lines if x["logger"] == "twinstore.shutdown" and "phase" in x]


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


async def test_sigterm_closes_sessions_finishes_requests_and_exits_0(server: ServerProcess) -> None:
    assert server.proc is not None
    thing_id = new_thing_id()
    async with httpx.AsyncClient(base_url=server.url, auth=AUTH, timeout=30) as client:
        assert (await client.put(f"/api/2/things/{thing_id}", json={})).status_code == 201
        async with connect(server.url.replace("http", "ws") + "/ws/2", additional_headers=BASIC) as ws:
            await ws.send("START-SEND-EVENTS")
            assert await ws.recv() == "START-SEND-EVENTS:ACK"

            opened = asyncio.Event()

            async def sse() -> list[str]:
                headers = {"accept": "text/event-stream"}
                async with client.stream("GET", f"/api/2/things/{thing_id}", headers=headers) as r:
                    opened.set()
                    return [line async for line in r.aiter_lines()]

            stream = asyncio.create_task(sse())
            # Commands in flight on the WebSocket when the signal comes are answered first.
            envelopes = [
                {
                    "topic": thing_id.replace(":", "/") + "/things/twin/commands/modify",
                    "headers": {"correlation-id": f"c{i}"},
                    "path": f"/attributes/a{i}",
                    "value": i,
                }
                for i in range(20)
            ]
            await asyncio.wait_for(opened.wait(), 10)  # the SSE stream is open when the signal comes
            for envelope in envelopes:
                await ws.send(orjson.dumps(envelope).decode())
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            answered: set[str] = set()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    message = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    if "status" in message:  # a response (events of the same writes come too)
                        assert message["status"] in (201, 204), message
                        answered.add(message["headers"]["correlation-id"])
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "server shutting down")
            assert answered == {f"c{i}" for i in range(20)}  # every command read was answered
            await asyncio.wait_for(stream, 10)  # the SSE stream ended (cleanly: no exception)
            code = await wait_exit(server.proc, GRACE)
            took = time.monotonic() - start
    assert code == 0, server.logs()[-3000:]
    assert took < 10, took
    done = phases(server.logs())
    assert done[0] == "readiness down, no new connections" and done[-1] == "done", done
    assert "websocket sessions closed" in done and "nats drained" in done, done


async def test_second_signal_exits_at_once(server: ServerProcess) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    server.proc.send_signal(signal.SIGINT)
    code = await wait_exit(server.proc, 10)
    # Python runs pending handlers by signal number: either may come first.
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM), server.logs()[-3000:]
    assert '"shutdown: second SIG' in server.logs()


async def test_ingest_worker_exits_0_on_sigterm(settings: Settings, runtime: Runtime, tmp_path: Path) -> None:
    assert settings.database_url is not None and settings.nats_url is not None
    worker = IngestProcess(
        settings.database_url,
        settings.nats_url,
        settings.nats_prefix,
        tmp_path,
        INGEST_SOURCES,
        settings.partitions,
    ).start()
    try:
        await worker.ready()
        assert worker.proc is not None
        start = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = await wait_exit(worker.proc, GRACE)
        took = time.monotonic() - start
    finally:
        worker.kill()
    assert code == 0, worker.logs()[-3000:]
    assert took < 10
    done = phases(worker.logs())
    assert done[0] == "ingest batches in flight committed and acknowledged" and done[-1] == "done", done
