"""Graceful shutdown: the clock of one process's stop, and the log line of each of its phases.

The first SIGTERM (or SIGINT) starts :class:`Shutdown`: the process stops taking work and
finishes what it holds (:class:`~twinstore.api.server.GracefulServer` for ``twinstore serve``,
:meth:`~twinstore.runtime.Runtime.close` for every process). A second signal exits at once
(status 128 + signal), and a process still running ``shutdown_grace_seconds`` after the first
exits anyway (status 1), before Kubernetes' SIGKILL at the end of the pod's grace period.

Each phase logs one line when it ends: ``{"msg": "shutdown: <phase>", "phase", "duration_ms"}``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Shutdown", "phase"]

log = logging.getLogger("twinstore.shutdown")


@contextmanager
def phase(name: str, **fields: Any) -> Iterator[None]:
    """Time the block and log ``shutdown: <name>`` with its duration (also when it fails)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        duration = round((time.perf_counter() - start) * 1000, 1)
        log.info("shutdown: %s", name, extra={"phase": name, "duration_ms": duration, **fields})


class Shutdown:
    """One process's stop: started by the first signal, bounded by ``grace`` seconds."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.started: float | None = None
        self._watchdog: threading.Timer | None = None

    def signal(self, signum: int) -> None:
        """A SIGTERM / SIGINT arrived: start the clock, or (the second one) exit now."""
        # A handler runs in whatever context the main thread was in (a request's): not its ids.
        contextvars.Context().run(self._signal, signum)

    def _signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.started is not None:
            log.error("shutdown: second %s, exiting now", name, extra={"signal": name})
            os._exit(128 + signum)
        self.started = time.monotonic()
        log.info(
            "shutdown: %s received, stopping within %.0f s",
            name,
            self.grace,
            extra={"signal": name, "grace_seconds": self.grace},
        )
        self._watchdog = threading.Timer(self.grace, self._expired)
        self._watchdog.daemon = True
        self._watchdog.start()

    def remaining(self) -> float:
        """Seconds left of the grace period (all of it before the first signal)."""
        if self.started is None:
            return self.grace
        return max(0.0, self.grace - (time.monotonic() - self.started))

    def finished(self) -> None:
        """Everything is closed: stop the watchdog, log the total."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.started is not None:
            duration = round((time.monotonic() - self.started) * 1000, 1)
            log.info("shutdown: done", extra={"phase": "done", "duration_ms": duration})

    def _expired(self) -> None:
        log.error(
            "shutdown: not done after the grace period of %.0f s, exiting",
            self.grace,
            extra={"grace_seconds": self.grace},
        )
        os._exit(1)
