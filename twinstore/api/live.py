"""What a live subscriber (WebSocket ``START-SEND-EVENTS``, SSE) asked for, applied to an event.

Ditto's semantics: the RQL ``filter`` is evaluated on a thing built from the event (its value
placed at its path in ``{"thingId": ...}``), enriched with ``extraFields`` read from the
current thing state, only the part the subscriber may read. The extra fields also travel
with the event (``extra`` in the envelope; merged into the SSE data).

>>> from datetime import datetime, UTC
>>> e = Event(thing_id="a:t", revision=2, timestamp=datetime(2026, 1, 1, tzinfo=UTC),
...           action="modified", path="/attributes/x", value=1)
>>> event_thing(e)
{'thingId': 'a:t', 'attributes': {'x': 1}}
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from twinstore.bus.relay import journal_heads
from twinstore.enforcement import readable_thing
from twinstore.enforcement import with_doc as _with_doc
from twinstore.fanout import Delivery, Subscription
from twinstore.model import rql
from twinstore.model.errors import InvalidInputError, UnavailableError
from twinstore.model.fields import parse_fields
from twinstore.model.ids import parse_pointer, validate_namespace
from twinstore.model.thing import Event, ThingState
from twinstore.service import view_of

__all__ = ["LiveQuery", "Matched", "event_matches", "event_thing", "from_now", "parse_query"]

log = logging.getLogger("twinstore.live")

Loader = Callable[[str], Awaitable[ThingState]]


def event_thing(event: Event) -> dict[str, Any]:
    """The thing as far as the event tells: its value at its path, with ``thingId``."""
    parts = parse_pointer(event.path)
    if event.action == "deleted":
        return {"thingId": event.thing_id}
    if not parts:
        value = event.value if isinstance(event.value, dict) else {}
        return {**value, "thingId": event.thing_id} if "thingId" not in value else dict(value)
    doc: dict[str, Any] = {"thingId": event.thing_id}
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = event.value
    return doc


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _meta(event: Event) -> dict[str, Any]:
    return {
        "_revision": event.revision,
        "_modified": event.timestamp.isoformat().replace("+00:00", "Z"),
        "_namespace": event.thing_id.partition(":")[0],
    }


def event_matches(filter: rql.Node | None, event: Event) -> bool:
    """Whether ``event`` passes ``filter`` (evaluated on :func:`event_thing`, as for live events)."""
    return filter is None or rql.matches(filter, event_thing(event), _meta(event))


class Matched:
    """An event that passed the query: the thing it describes and the extra fields (if asked)."""

    __slots__ = ("event", "extra", "thing")

    def __init__(self, event: Event, thing: dict[str, Any], extra: dict[str, Any] | None) -> None:
        self.event = event
        self.thing = thing
        self.extra = extra


class LiveQuery:
    """``namespaces``, ``filter`` and ``extraFields`` of a subscription."""

    def __init__(
        self,
        namespaces: frozenset[str] | None = None,
        filter: rql.Node | None = None,
        extra_fields: list[list[str]] | None = None,
    ) -> None:
        self.namespaces = namespaces
        self.filter = filter
        self.extra_fields = extra_fields

    async def apply(self, delivery: Delivery, load: Loader) -> Matched | None:
        """The event with its extra fields if it matches the query, else None."""
        event = delivery.event
        if self.namespaces is not None and event.thing_id.partition(":")[0] not in self.namespaces:
            return None
        thing = event_thing(event)
        extra: dict[str, Any] | None = None
        if self.extra_fields is not None:
            state = await load(event.thing_id)
            readable = readable_thing(delivery.view, state) or {"thingId": event.thing_id}
            extra = view_of(_with_doc(state, readable), self.extra_fields)
        if self.filter is not None:
            doc = _merge(extra, thing) if extra else thing
            if not rql.matches(self.filter, doc, _meta(event)):
                return None
        return Matched(event, thing, extra)


def parse_query(params: Mapping[str, str]) -> LiveQuery:
    """``namespaces``, ``filter``, ``extraFields`` from query parameters (400 when invalid)."""
    namespaces: frozenset[str] | None = None
    text = params.get("namespaces")
    if text is not None:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise InvalidInputError("The 'namespaces' parameter must name at least one namespace.")
        namespaces = frozenset(validate_namespace(n) for n in names)
    filter_text = params.get("filter")
    node = rql.parse_filter(filter_text) if filter_text is not None else None
    extra_text = params.get("extraFields")
    extra = parse_fields(extra_text) if extra_text is not None and extra_text.strip() else None
    return LiveQuery(namespaces, node, extra)


async def from_now(sub: Subscription, pool: asyncpg.Pool) -> Subscription:
    """``sub`` receiving only changes committed after this call (Ditto: nothing from before the
    subscription), read from the journal partitions' heads; 503 (and ``sub`` closed) when it cannot be read.

    Call it after subscribing and before acknowledging: every change committed after the head
    was read reaches the subscription, nothing committed before it does.
    """
    try:
        await sub.fanout.listening()  # the process receives every event published from here on
        sub.start_after(await journal_heads(pool))
    except Exception as exc:  # any failure to read the head: the subscription cannot start
        sub.close()
        log.warning("journal head unavailable for a live subscription: %s", exc)
        raise UnavailableError(
            "The subscription could not be started: the event journal is unavailable.",
            description="Try again later.",
        ) from exc
    return sub
