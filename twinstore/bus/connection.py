"""Connecting to NATS: the one reading of a ``nats_url`` setting.

A JetStream cluster is reached through several servers: ``nats_url`` may name them separated
by commas (as the ``nats`` CLI and the official chart's docs write them). nats-py takes a list
but reads a single string as one URL, so the setting is split here, for the service and the
adapters alike. The client also learns the other cluster members from the server it reached,
so one reachable seed is enough to start; naming all of them lets a start succeed while any
one is down.

>>> servers("nats://a:4222, nats://b:4222,nats://c:4222")
['nats://a:4222', 'nats://b:4222', 'nats://c:4222']
>>> servers("nats://user:pw@nats:4222")
['nats://user:pw@nats:4222']
"""

from __future__ import annotations

__all__ = ["servers"]


def servers(url: str) -> list[str]:
    """The server URLs of a ``nats_url`` setting (comma-separated); empty parts are ignored."""
    found = [part.strip() for part in url.split(",") if part.strip()]
    if not found:
        raise ValueError(f"nats_url {url!r} names no server")
    return found
