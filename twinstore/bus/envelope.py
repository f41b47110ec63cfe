"""Ditto Protocol envelopes for thing events.

>>> from datetime import datetime, UTC
>>> from twinstore.model.thing import Event
>>> e = Event(thing_id="org.acme:pump", revision=2, timestamp=datetime(2026, 1, 1, tzinfo=UTC),
...           action="modified", path="/attributes/a", value=1, originator="nginx:ditto")
>>> event_envelope(e)["topic"]
'org.acme/pump/things/twin/events/modified'
"""

from __future__ import annotations

from typing import Any

from twinstore.model.ids import split_thing_id
from twinstore.model.thing import Event

__all__ = ["event_envelope", "thing_topic"]


def thing_topic(thing_id: str, group: str, action: str, channel: str = "twin") -> str:
    """``ns/name/things/twin/<group>/<action>`` (Ditto Protocol topic path)."""
    namespace, name = split_thing_id(thing_id)
    return f"{namespace}/{name}/things/{channel}/{group}/{action}"


def event_envelope(event: Event, extra_headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Ditto Protocol event envelope of a committed event."""
    headers: dict[str, Any] = {"ditto-originator": event.originator, "response-required": False}
    if event.correlation_id is not None:
        headers["correlation-id"] = event.correlation_id
    if event.headers:  # kept with the event: e.g. source-timestamp, source-quality of ingested values
        headers.update(event.headers)
    if extra_headers:
        headers.update(extra_headers)
    envelope: dict[str, Any] = {
        "topic": thing_topic(event.thing_id, "events", event.action),
        "headers": headers,
        "path": event.path,
        "revision": event.revision,
        "timestamp": event.timestamp.isoformat().replace("+00:00", "Z"),
    }
    if event.action != "deleted":
        envelope["value"] = event.value
    return envelope
