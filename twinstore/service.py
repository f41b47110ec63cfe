"""The engine: the one place that combines the store, the bus and (later) policies.

Interfaces (HTTP now; WebSocket, NATS ingestion later) call :class:`ThingService` with
commands and get values or :class:`~twinstore.model.errors.DittoError` back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from twinstore.model import etag
from twinstore.model import patch as jp
from twinstore.model.errors import not_found
from twinstore.model.fields import select
from twinstore.model.ids import parse_pointer, validate_thing_id
from twinstore.model.thing import ThingState, validate_path
from twinstore.store.journal import Committed, Journal, WriteRequest

__all__ = ["Retrieved", "ThingService", "view"]


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def view(state: ThingState, fields: list[list[str]] | None) -> dict[str, Any]:
    """A thing's JSON as Ditto returns it, with ``fields`` selection and ``_revision`` etc."""
    doc = state.doc or {}
    if fields is None:
        return doc
    meta = {
        "_namespace": state.thing_id.partition(":")[0],
        "_revision": state.revision,
        "_created": _iso(state.created),
        "_modified": _iso(state.modified),
    }
    full = {**doc, **{k: v for k, v in meta.items() if v is not None}}
    return select(full, fields)  # type: ignore[no-any-return]


def missing_level(doc: dict[str, Any], parts: list[str]) -> list[str]:
    """The first missing level of ``parts`` as Ditto's retrieve commands report it.

    A missing feature is ``feature.notfound`` for everything below it, missing attributes or
    feature properties are ``attributes.notfound`` / ``feature.properties.notfound`` for every
    path inside them; otherwise the path itself is missing.
    """
    if len(parts) > 1 and parts[0] == "attributes":
        levels = [parts[:1]]
    elif len(parts) > 2 and parts[0] == "features":
        levels = [parts[:2], parts[:3]] if len(parts) > 3 else [parts[:2]]
    else:
        levels = []
    for level in levels:
        if jp.get_at(doc, level) is jp.MISSING:
            return level
    return parts


class Retrieved(msgspec.Struct, kw_only=True):
    value: Any
    etag: str
    state: ThingState


class ThingService:
    """Reads and writes of things (authorization joins here with the policies issue)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def retrieve(
        self,
        thing_id: str,
        path: str = "/",
        *,
        fields: list[list[str]] | None = None,
        if_match: list[str] | None = None,
        if_none_match: list[str] | None = None,
    ) -> Retrieved:
        """The resource at ``path`` of a thing; 404 in Ditto's words when absent."""
        validate_thing_id(thing_id)
        parts = parse_pointer(path)
        validate_path(parts)
        state = await self.journal.load(thing_id)
        if state.doc is None:
            raise not_found(thing_id, [])
        value = jp.get_at(state.doc, parts)
        tag = None if value is jp.MISSING else etag.etag_of(value, state.revision, parts)
        if if_match is not None or if_none_match is not None:
            etag.check(
                if_match,
                if_none_match,
                current_tag=tag,
                thing_tag=etag.etag_of(None, state.revision, []),
                read=True,
            )
        if value is jp.MISSING or tag is None:
            raise not_found(thing_id, missing_level(state.doc, parts))
        if not parts:
            value = view(state, fields)
        elif fields is not None:
            value = select(value, fields)
        return Retrieved(value=value, etag=tag, state=state)

    async def retrieve_many(
        self, thing_ids: list[str], fields: list[list[str]] | None
    ) -> list[dict[str, Any]]:
        """Things in the order asked for; absent ones are left out (as Ditto)."""
        for thing_id in thing_ids:
            validate_thing_id(thing_id)
        states = await self.journal.load_many(thing_ids)
        return [view(states[i], fields) for i in thing_ids if i in states and states[i].exists]

    async def list_things(self, fields: list[list[str]] | None, limit: int) -> list[dict[str, Any]]:
        """All things sorted by id (at most ``limit``; search comes with RQL)."""
        return [view(state, fields) for state in await self.journal.load_all(limit)]

    async def write(self, request: WriteRequest) -> Committed:
        """Commit one command (validated, precondition-checked, group-committed)."""
        validate_thing_id(request.thing_id)
        return await self.journal.write(request)
