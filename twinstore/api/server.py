"""uvicorn's server with twinstore's shutdown order (``twinstore serve``).

uvicorn alone, on SIGTERM, closes every WebSocket at once with 1012 (commands in flight lose
their answers), waits for server-sent event streams, which never end by themselves, until its
graceful timeout, and then raises SIGTERM again, so the process ends killed by the signal
instead of exiting 0. :class:`GracefulServer` stops in this order, one log line per phase:

1. readiness goes down (``runtime.draining``: ``/ready`` answers 503, new WebSocket and SSE
   sessions are closed at once), the listening sockets close;
2. each WebSocket session stops reading, lets its commands in flight finish and their answers
   go out, and closes with 1001 "going away" (Ditto's clients reconnect); SSE streams end;
3. HTTP requests in flight finish (idle keep-alive connections are closed);
4. the lifespan closes the runtime (:meth:`~twinstore.runtime.Runtime.close`: ingest batches,
   anomaly checkpoints, the relay's last publishes, NATS drained, pool closed);

all within ``shutdown_grace_seconds`` (:class:`~twinstore.shutdown.Shutdown`), keeping
:data:`CLOSE_RESERVE` seconds of it for step 4. The exit status is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from litestar import Litestar

from twinstore.runtime import Runtime
from twinstore.shutdown import Shutdown, phase

__all__ = ["CLOSE_RESERVE", "GracefulServer"]

log = logging.getLogger("twinstore.shutdown")

CLOSE_RESERVE = 5.0  # seconds of the grace period kept for closing the runtime
SESSIONS_CLOSE = 12.0  # at most this long for WebSocket sessions to finish their commands


class GracefulServer(uvicorn.Server):
    """A uvicorn server of one twinstore app that shuts down in twinstore's order."""

    # Called once the app has started and the sockets listen (serve's start-up banner).
    on_started: Callable[[], None] | None = None

    def __init__(self, config: uvicorn.Config, app: Litestar, stop: Shutdown) -> None:
        super().__init__(config)
        self.app = app
        self.stop = stop

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # First: the handler runs inside whatever the main thread was doing (a log write, say),
        # and if what follows fails there the signal must not be lost.
        self.should_exit = True
        self.stop.signal(sig)  # the second signal exits at once

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, but the signal is not raised again after the shutdown (exit status 0)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _budget(self) -> float:
        return max(0.5, self.stop.remaining() - CLOSE_RESERVE)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        runtime: Runtime | None = getattr(self.app.state, "runtime", None)
        with phase("readiness down, no new connections"):
            if runtime is not None:
                runtime.begin_shutdown()
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                sock.close()
        if runtime is not None and runtime.sessions:
            with phase("websocket sessions closed", sessions=len(runtime.sessions)):
                await runtime.close_sessions(min(SESSIONS_CLOSE, self._budget()))
        state = self.server_state
        with phase("http requests finished", connections=len(state.connections)):
            for connection in list(state.connections):
                connection.shutdown()
            try:
                async with asyncio.timeout(self._budget()):
                    while state.connections or state.tasks:
                        await asyncio.sleep(0.05)
            except TimeoutError:
                log.error("shutdown: requests still running, cancelled", extra={"tasks": len(state.tasks)})
                for task in state.tasks:
                    task.cancel(msg="twinstore: shutdown grace period used up")
        await self.lifespan.shutdown()  # Runtime.close, which logs its own phases
        self.stop.finished()

    @staticmethod
    def serve_app(
        app: Litestar, stop: Shutdown, on_started: Callable[[], None] | None = None, **config: Any
    ) -> bool:
        """Run ``app`` until shut down (``on_started`` once it listens); False when it did not start."""
        server = GracefulServer(uvicorn.Config(app, **config), app, stop)
        server.on_started = on_started
        server.run()
        return server.started
