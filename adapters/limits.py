"""Bounds on what a device may send through an adapter (hostile or broken input).

Every adapter hands rows to :class:`adapters.base.Forwarder`, which checks each row before it
is spooled: a row whose value is nested deeper than ``max_json_depth``, holds a number JSON
cannot carry (NaN, Infinity), cannot be encoded as JSON, or is larger than ``max_row_bytes``
(encoded) is dropped, logged (without its value) and counted; its neighbours go on. Sending
``null`` instead of NaN is no way out: a telemetry row is applied as a merge, where ``null``
deletes the property.

>>> value_problem({"a": [1.5, {"b": 2}]}, 100) is None
True
>>> value_problem([float("nan")], 100)
'not-finite'
>>> deep: list = []
>>> for _ in range(5): deep = [deep]
>>> value_problem(deep, 4), value_problem(deep, 6)
('too-deep', None)
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_MESSAGE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_ROW_BYTES",
    "MAX_SPARKPLUG_METRICS",
    "NOT_FINITE",
    "NOT_JSON",
    "TOO_DEEP",
    "TOO_LARGE",
    "TOO_MANY",
    "UNDECODABLE",
    "value_problem",
]

#: Bytes of one device message (an MQTT payload) the adapter decodes at all; brokers allow up to
#: 256 MB, which one device could use to exhaust the adapter's memory and CPU.
MAX_PAYLOAD_BYTES = 262_144
#: Bytes of one telemetry row encoded as JSON: the service stores no thing larger than its
#: max_thing_bytes (100 KiB by default), so a larger value could never land.
MAX_ROW_BYTES = 102_400
#: Nesting of a row's value: the service refuses JSON deeper than its max_json_depth (100).
MAX_JSON_DEPTH = 100
#: Payload bytes of one NATS message (NATS' default max_payload); the server's own, learnt at
#: connect, applies when smaller.
MAX_MESSAGE_BYTES = 1_048_576
#: Metrics in one Sparkplug B payload (a BIRTH of a large node has thousands).
MAX_SPARKPLUG_METRICS = 10_000

# Why a row or message was dropped (the keys of the adapters' counters).
TOO_LARGE = "too-large"
TOO_DEEP = "too-deep"
TOO_MANY = "too-many"  # values in one message (Sparkplug metrics)
NOT_FINITE = "not-finite"
NOT_JSON = "not-json"  # a row's value JSON cannot encode
UNDECODABLE = "undecodable"  # a message that is neither what its protocol says nor text


def value_problem(value: Any, max_depth: int) -> str | None:
    """Why ``value`` cannot be sent as JSON (:data:`TOO_DEEP`, :data:`NOT_FINITE`), or None.
    Iterative: a value nested a million levels deep costs no recursion."""
    if type(value) is float:
        return None if math.isfinite(value) else NOT_FINITE
    if not isinstance(value, dict | list | tuple):
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return TOO_DEEP
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, float):
                if not math.isfinite(child):
                    return NOT_FINITE
            elif isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
    return None
