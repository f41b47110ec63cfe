"""The persisted events of one thing over a range, as a caller may read them.

Shared by Ditto's two ways of streaming history: SSE (``GET /api/2/things/{id}`` with
``from-historical-revision`` ..., :mod:`twinstore.api.sse`) and the Ditto Protocol's streaming
subscriptions (``.../streaming/subscribeForPersistedEvents`` on ``/ws/2``, :mod:`twinstore.api.ws`).

* :func:`parse_range` reads the range (revisions or timestamps) from either's names;
* :meth:`History.resolve` takes the caller's access to each life of the thing
  (:class:`~twinstore.service.HistoryAccess`: a life, from a creation to the deletion ending
  it, is judged by the policy it had last) and turns the range into revisions: 404
  ``things:thing.notfound`` when the caller may read no life of the thing, 404
  ``things:thing.history.notfound`` when the range lies outside its history; events of a life
  the caller may not read are left out, as if they were not there;
* :meth:`History.events` reads the journal one page at a time (none held beyond a page) and
  yields each event as far as the caller may read it (Ditto 3.9's partial events), skipping
  deletions, events with nothing readable, events that do not touch the streamed resource,
  and events that fail the RQL ``filter`` (evaluated on the event, as for live events).

>>> rng = parse_range({"fromHistoricalRevision": 3}, WS_NAMES, require_from=False)
>>> (rng.from_revision, rng.to_revision, rng.by_time)
(3, None, False)
>>> parse_range({}, WS_NAMES, require_from=False).from_revision
0
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from policies import SubjectView
from twinstore.api.live import event_matches, event_thing
from twinstore.enforcement import readable_event
from twinstore.model import patch as jp
from twinstore.model import rql
from twinstore.model.errors import InvalidInputError, history_not_found, not_found
from twinstore.model.thing import Event
from twinstore.runtime import Runtime
from twinstore.service import HistoryAccess

__all__ = ["HISTORY_PAGE", "SSE_NAMES", "WS_NAMES", "History", "HistoryRange", "RangeNames", "parse_range"]

HISTORY_PAGE = 500  # events read from the journal per query


class RangeNames(NamedTuple):
    """What the range's four bounds are called where they are read from."""

    from_revision: str
    to_revision: str
    from_timestamp: str
    to_timestamp: str


SSE_NAMES = RangeNames(
    "from-historical-revision",
    "to-historical-revision",
    "from-historical-timestamp",
    "to-historical-timestamp",
)
WS_NAMES = RangeNames(
    "fromHistoricalRevision", "toHistoricalRevision", "fromHistoricalTimestamp", "toHistoricalTimestamp"
)

_REVISION = re.compile(r"[0-9]{1,18}")


@dataclass
class HistoryRange:
    """The range asked for: revisions, or timestamps (:attr:`by_time`); a missing bound is open."""

    from_revision: int | None = None
    to_revision: int | None = None
    from_timestamp: datetime | None = None
    to_timestamp: datetime | None = None

    @property
    def by_time(self) -> bool:
        return self.from_timestamp is not None or self.to_timestamp is not None


def _revision(name: str, value: Any) -> int:
    """A non-negative long, given as a JSON integer (WebSocket) or as text (query parameter)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    if isinstance(value, str) and _REVISION.fullmatch(value.strip()):
        return int(value.strip())
    raise InvalidInputError(f"The value '{value}' of '{name}' is not a valid revision (a non-negative long).")


def _timestamp(name: str, value: Any) -> datetime:
    """An ISO-8601 timestamp (UTC when it has no offset)."""
    try:
        if not isinstance(value, str):
            raise ValueError
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInputError(
            f"The value '{value}' of '{name}' is not a valid ISO-8601 timestamp (e.g. 2022-10-24T03:11:15Z)."
        ) from None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def parse_range(values: Mapping[str, Any], names: RangeNames, *, require_from: bool) -> HistoryRange:
    """The range in ``values`` under ``names``; 400 when a bound is invalid, revisions and
    timestamps are mixed, or a ``to`` lies before its ``from``. Without any ``from``: 400 when
    ``require_from`` (SSE), else the history from its start (Ditto Protocol: "the complete
    available history" when no options are given)."""
    rng = HistoryRange()
    if names.from_revision in values:
        rng.from_revision = _revision(names.from_revision, values[names.from_revision])
    if names.to_revision in values:
        rng.to_revision = _revision(names.to_revision, values[names.to_revision])
    if names.from_timestamp in values:
        rng.from_timestamp = _timestamp(names.from_timestamp, values[names.from_timestamp])
    if names.to_timestamp in values:
        rng.to_timestamp = _timestamp(names.to_timestamp, values[names.to_timestamp])
    by_revision = rng.from_revision is not None or rng.to_revision is not None
    if by_revision and rng.by_time:
        raise InvalidInputError(
            "Either the revision or the timestamp bounds of a history stream may be given, not both."
        )
    if rng.from_revision is None and rng.from_timestamp is None:
        if require_from:
            which = names.from_timestamp if rng.by_time else names.from_revision
            raise InvalidInputError(f"A history stream needs '{which}'.")
        if not rng.by_time:
            rng.from_revision = 0
    low, high = rng.from_revision, rng.to_revision
    if low is not None and high is not None and high < low:
        raise InvalidInputError(f"'{names.to_revision}' must not be lower than '{names.from_revision}'.")
    start, end = rng.from_timestamp, rng.to_timestamp
    if start is not None and end is not None and end < start:
        raise InvalidInputError(f"'{names.to_timestamp}' must not be before '{names.from_timestamp}'.")
    return rng


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


class History:
    """The persisted events of one thing's range, as ``subjects`` may read them.

    ``parts`` is the streamed resource (``[]``: the whole thing): an event is sent only if its
    readable part has something at or below it. Call :meth:`resolve` once, then iterate
    :meth:`events`.
    """

    def __init__(
        self,
        runtime: Runtime,
        subjects: tuple[str, ...],
        thing_id: str,
        rng: HistoryRange,
        filter: rql.Node | None = None,
        parts: list[str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.subjects = subjects
        self.thing_id = thing_id
        self.rng = rng
        self.filter = filter
        self.parts = parts or []
        self.first = 1
        self.last = 0
        self.access: HistoryAccess | None = None

    async def resolve(self) -> None:
        """The caller's access to the thing's lives and the revisions of the range; 404 (thing)
        when the caller may read no life of it, 404 (history) outside the history.

        Without an upper bound the range ends at the revision current now (no live continuation).
        """
        journal, service = self.runtime.journal, self.runtime.service
        assert journal is not None and service is not None
        thing_id, rng = self.thing_id, self.rng
        current = await journal.load(thing_id)
        if current.revision <= 0:
            raise not_found(thing_id, [])
        access = await service.history_access(self.subjects, current)
        if not await access.readable():
            raise not_found(thing_id, [])
        head = current.revision
        if rng.by_time:
            first = 1
            if rng.from_timestamp is not None:
                before = rng.from_timestamp - timedelta(microseconds=1)
                first = await journal.revision_at(thing_id, before) + 1
                if first > head:
                    raise history_not_found(thing_id, timestamp=_iso(rng.from_timestamp))
            last = head
            if rng.to_timestamp is not None:
                last = await journal.revision_at(thing_id, rng.to_timestamp)
                if last < first:
                    raise history_not_found(thing_id, timestamp=_iso(rng.to_timestamp))
        else:
            asked = rng.from_revision or 0
            first = max(asked, 1)
            if first > head:
                raise history_not_found(thing_id, revision=asked)
            last = head if rng.to_revision is None else min(rng.to_revision, head)
        # After a history cleanup the oldest events are gone: a range that starts before the
        # retained history is outside it (no bound, or revision 0, means "the oldest there is").
        retained = await journal.first_revision(thing_id)
        if first < retained:
            explicit = rng.from_timestamp is not None if rng.by_time else bool(rng.from_revision)
            if explicit:
                if rng.by_time:
                    assert rng.from_timestamp is not None
                    raise history_not_found(thing_id, timestamp=_iso(rng.from_timestamp))
                raise history_not_found(thing_id, revision=first)
            first = retained
        self.first, self.last, self.access = first, last, access

    def shown(self, event: Event, view: SubjectView | None) -> Event | None:
        """``event`` as the caller may see it through its life's ``view``, if it is to be sent at all."""
        if event.action == "deleted" or view is None:
            return None
        shown = readable_event(view, event)
        if shown is None or not event_matches(self.filter, shown):
            return None
        if self.parts and jp.get_at(event_thing(shown), self.parts) is jp.MISSING:
            return None
        return shown

    async def events(self) -> AsyncGenerator[Event, None]:
        """The events to send, in revision order, read from the journal a page at a time."""
        assert self.runtime.journal is not None and self.access is not None
        pages = self.runtime.journal.event_pages(self.thing_id, self.first - 1, self.last, page=HISTORY_PAGE)
        async for page in pages:
            for event in page:
                shown = self.shown(event, await self.access.view_at(event.revision))
                if shown is not None:
                    yield shown
