"""``/metrics``, ``/health`` and ``/ready``: answered once here for the API and the workers.

* ``/health`` (liveness): 200 ``{"status": "UP"}`` whenever the process's event loop answers.
  It never looks at the database or NATS: an outage of either must not make Kubernetes
  restart every pod.
* ``/ready`` (readiness): 200 when the database answers with the current schema (migrations
  done) and NATS is connected, else 503, both in Ditto's health shape
  (``{"status", "children": {"database": …, "nats": …}}``, :meth:`Runtime.ready`).
* ``/metrics``: the runtime's registry in the Prometheus text format (:mod:`twinstore.metrics`).

The API serves them through litestar (:mod:`twinstore.api.operations`); the worker processes
(``twinstore ingest``, ``twinstore anomaly``), which serve no HTTP API, through
:class:`OperationsListener` on ``metrics_port``: a minimal HTTP/1.1 server on asyncio (one GET
per connection, no dependencies), started and stopped by the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import orjson

from twinstore.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from twinstore.runtime import Runtime

__all__ = ["JSON", "OperationsListener", "answer", "health", "metrics", "ready"]

log = logging.getLogger("twinstore.operations")

JSON = "application/json"
Answer = tuple[int, str, bytes]  # status, content type, body
_UP = orjson.dumps({"status": "UP"})


async def health(runtime: Runtime) -> Answer:
    """Liveness: the process runs (whatever the state of the database and NATS)."""
    return 200, JSON, _UP


async def ready(runtime: Runtime) -> Answer:
    """Readiness: database reachable with the current schema, NATS connected."""
    ok, body = await runtime.ready()
    return (200 if ok else 503), JSON, orjson.dumps(body)


async def metrics(runtime: Runtime) -> Answer:
    return 200, CONTENT_TYPE, await runtime.metrics.render()


PATHS = {"/health": health, "/ready": ready, "/metrics": metrics}


async def answer(runtime: Runtime, path: str) -> Answer | None:
    """The answer to ``GET path`` (None: not one of the three)."""
    endpoint = PATHS.get(path)
    return None if endpoint is None else await endpoint(runtime)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
MAX_HEAD_BYTES = 16_384
READ_TIMEOUT = 10.0


class OperationsListener:
    """``GET /metrics``, ``/health``, ``/ready`` of a runtime on ``host:port`` (worker processes)."""

    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        self.runtime = runtime
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        if self.port == 0:  # tests: the port the system chose
            self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and health listening", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body, method = await self._respond(head)
            lines = [
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}",
                "Connection: close",
            ]
            if status == 405:
                lines.append("Allow: GET, HEAD")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sent no complete request head in time gets nothing
        except Exception:
            log.exception("operations listener: request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, str]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or len(head) > MAX_HEAD_BYTES:
            return 400, JSON, orjson.dumps({"status": 400, "error": "request.invalid"}), "GET"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in PATHS:
            return 404, JSON, orjson.dumps({"status": 404, "error": "gateway:routing.notfound"}), method
        if method not in ("GET", "HEAD"):
            return 405, JSON, orjson.dumps({"status": 405, "error": "gateway:method.notallowed"}), method
        found = await answer(self.runtime, target)
        assert found is not None
        return (*found, method)
