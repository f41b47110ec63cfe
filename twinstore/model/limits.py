"""Bounds on input checked before a write is decided: JSON depth and Ditto header size.

Checked where input is decoded and again before a write joins a group commit, so a value that
would exhaust recursion (policy checks, encoding) is refused with a 4xx for its sender alone.

>>> check_depth({"a": [1, {"b": 2}]}, "/attributes", 4)
>>> check_depth({"a": [1, {"b": 2}]}, "/attributes/x", 4)
Traceback (most recent call last):
...
twinstore.model.errors.JsonInvalidError: The JSON value and its path are nested 5 levels deep; ...
>>> headers_size({"correlation-id": "abc", "response-required": False})
39
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from twinstore.model.errors import HeadersTooLargeError, JsonInvalidError

__all__ = ["check_depth", "check_headers", "configure", "headers_size", "json_depth", "limits"]


class Limits(NamedTuple):
    max_header_bytes: int = 8192
    max_json_depth: int = 100


_limits = Limits()


def configure(max_header_bytes: int, max_json_depth: int) -> None:
    """Set the limits from the settings (Runtime does, once per process): envelopes are decoded
    where no settings are at hand (WebSocket, NATS ingestion)."""
    global _limits
    _limits = Limits(max_header_bytes, max_json_depth)


def limits() -> Limits:
    """The limits in force (:func:`configure`; else the settings' defaults)."""
    return _limits


def json_depth(value: Any, limit: int) -> int:
    """The nesting depth of ``value`` (a scalar is 0, ``{}``/``[]`` 1), at most ``limit + 1``:
    iterative, and it stops as soon as ``limit`` is exceeded."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


def check_depth(value: Any, path: str = "/", max_depth: int | None = None) -> None:
    """Refuse (400 ``json.invalid``) a value whose nesting plus its path's segments exceed
    ``max_depth`` (default: ``max_json_depth``): it is that deep inside the thing."""
    if max_depth is None:
        max_depth = _limits.max_json_depth
    # path.count("/") bounds the segments from above: only a path that may be too deep is split
    # (this runs for every ingested row).
    segments = path.count("/")
    if segments > max_depth or isinstance(value, (dict, list)):
        segments = sum(1 for part in path.split("/") if part)
    if segments > max_depth:
        raise JsonInvalidError(
            f"The path has {segments} segments; at most {max_depth} levels are allowed.",
            description="Use a shallower JSON structure (setting max_json_depth).",
        )
    if isinstance(value, (dict, list)):
        depth = segments + json_depth(value, max_depth - segments)
        if depth > max_depth:
            raise JsonInvalidError(
                f"The JSON value and its path are nested {depth} levels deep; at most {max_depth} "
                "are allowed.",
                description="Use a shallower JSON structure (setting max_json_depth).",
            )


def headers_size(headers: Mapping[Any, Any]) -> int:
    """Bytes of the names and values of ``headers`` (values as their text; UTF-8)."""
    total = 0
    for name, value in headers.items():
        if isinstance(value, str):
            size = len(value.encode(errors="replace"))
        elif isinstance(value, (dict, list)):  # not a Ditto header value: its JSON, if encodable
            try:
                size = len(orjson.dumps(value))
            except TypeError:  # nested too deeply to encode
                size = 1 << 30
        else:
            size = len(str(value))
        total += len(str(name).encode(errors="replace")) + size
    return total


def check_headers(headers: Mapping[Any, Any], max_bytes: int | None = None) -> None:
    """Refuse (431 ``headers.too.large``) headers whose names and values exceed ``max_bytes``
    (default: ``max_header_bytes``)."""
    if max_bytes is None:
        max_bytes = _limits.max_header_bytes
    size = headers_size(headers)
    if size > max_bytes:
        raise HeadersTooLargeError(
            f"The headers have {size} bytes; at most {max_bytes} bytes are allowed.",
        )
