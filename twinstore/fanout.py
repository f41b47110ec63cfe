"""Fan-out: committed thing events from NATS to this process's live subscribers (WS, SSE).

One :class:`FanOut` per process holds one core NATS subscription on ``<prefix>.events.>``
(the relay's JetStream publishes reach core subscribers too) while it has live subscribers, so
every such process sees every event and scale-out needs nothing more. The subscription is
made for the first subscriber (:meth:`FanOut.listening`, awaited before a subscription reads
its starting heads) and ended :data:`IDLE_SECONDS` after the last one left: receiving every
event of the deployment costs a process about as much as deciding it, and an API process
without live clients (or one busy ingesting) has nothing to do with them. Each message is decoded once to an
:class:`~twinstore.model.thing.Event`; revisions at or below the last one seen for the thing
are dropped (a relay republish after a crash never reaches a client twice), and NATS keeps
one thing's events in order (one subject per partition, one reader task).

Subscribers are indexed by thing id, namespace and "all", so routing a change costs a few
dictionary lookups, not one filter per session. A subscriber's RQL filter narrows its index
keys where it pins ``thingId`` or ``_namespace`` (:func:`filter_scope`: ``eq``/``in`` on them,
through ``and``/``or``), so a session filtering on its own things is reached only by their
events; its filter is then evaluated on those alone (by the caller). The policy view is
computed once per distinct subject set per event, from the thing's policy id (an LRU filled
from events at ``/`` or ``/policyId`` and, on a miss, from the journal) and the process's
:class:`PolicyCache`.
A subscriber gets the readable part only (:func:`readable_event`).

Deliveries carry the event's journal partition and position in it (the relay's
``Twinstore-Partition`` / ``Twinstore-Position`` headers). A live subscription starts after
each partition's highest committed position at the time it is made
(:meth:`Subscription.start_after`, :func:`~twinstore.bus.relay.journal_heads`): the relay
publishes after the commit, so the event of a change acknowledged before the subscription can
still be on its way, and is dropped instead of looking like a change made after it (positions
are handed out in commit order within a partition, so any change committed later has a
higher one there). This holds across processes: the heads are read from the database.

Every subscriber's queue is bounded: a subscriber whose queue is full is dropped with a
reason (``too slow: N events behind``) and its reader sees :class:`SlowConsumerError`; the
others are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from policies import SubjectView
from twinstore.bus.relay import PARTITION_HEADER, POSITION_HEADER
from twinstore.bus.subjects import Subjects
from twinstore.enforcement import PolicyCache, readable_event
from twinstore.mailbox import Mailbox, SlowConsumerError
from twinstore.model import rql
from twinstore.model.ids import parse_pointer
from twinstore.model.thing import Event, ThingState

__all__ = [
    "IDLE_SECONDS",
    "Delivery",
    "FanOut",
    "Scope",
    "SlowConsumerError",
    "Subscription",
    "decode_event",
    "filter_scope",
    "intersect_scopes",
    "position_of",
]

log = logging.getLogger("twinstore.fanout")

QUEUE_SIZE = 1024
LRU_SIZE = 100_000
_ACTIONS = ("created", "modified", "merged", "deleted")


Position = tuple[int, int]  # (journal partition, seq in it)


class Delivery:
    """One readable event for one subscriber, with the view it was filtered by and its journal
    position (None when the envelope did not say, e.g. one published by hand)."""

    __slots__ = ("event", "position", "view")

    def __init__(self, event: Event, view: SubjectView, position: Position | None = None) -> None:
        self.event = event
        self.view = view
        self.position = position


def position_of(headers: dict[str, str] | None) -> Position | None:
    """The journal partition and position the relay put in the headers (None when absent or not
    numbers)."""
    if not headers:
        return None
    partition, seq = headers.get(PARTITION_HEADER), headers.get(POSITION_HEADER)
    try:
        return None if partition is None or seq is None else (int(partition), int(seq))
    except ValueError:
        return None


def decode_event(data: bytes, headers: dict[str, str] | None) -> Event | None:
    """The event of a Ditto Protocol event envelope (None if it is not a thing event)."""
    try:
        envelope = orjson.loads(data)
        topic = str(envelope["topic"]).split("/")
        if len(topic) != 6 or topic[2:5] != ["things", "twin", "events"] or topic[5] not in _ACTIONS:
            return None
        thing_id = (headers or {}).get("Ditto-Thing-Id") or f"{topic[0]}:{topic[1]}"
        env_headers = envelope.get("headers") or {}
        return Event(
            thing_id=thing_id,
            revision=int(envelope["revision"]),
            timestamp=datetime.fromisoformat(envelope["timestamp"]),
            action=topic[5],  # type: ignore[arg-type]
            path=envelope.get("path") or "/",
            value=envelope.get("value"),
            originator=str(env_headers.get("ditto-originator", "")),
            correlation_id=env_headers.get("correlation-id"),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("undecodable event envelope dropped")
        return None


# Which events can reach a subscriber: those of these thing ids or of these namespaces (either
# matches); None: any event. A filter that can match nothing has the scope (empty, empty).
Scope = tuple[frozenset[str], frozenset[str]] | None
_NOTHING: frozenset[str] = frozenset()


def _namespace(thing_id: str) -> str:
    return thing_id.partition(":")[0]


def intersect_scopes(a: Scope, b: Scope) -> Scope:
    """Events in both scopes.

    >>> intersect_scopes((frozenset({"a:1", "b:2"}), frozenset()), (frozenset(), frozenset({"a"})))
    (frozenset({'a:1'}), frozenset())
    """
    if a is None or b is None:
        return b if a is None else a
    (things_a, spaces_a), (things_b, spaces_b) = a, b
    things = (
        (things_a & things_b)
        | {t for t in things_a if _namespace(t) in spaces_b}
        | {t for t in things_b if _namespace(t) in spaces_a}
    )
    return frozenset(things), spaces_a & spaces_b


def _union_scopes(scopes: list[Scope]) -> Scope:
    if any(scope is None for scope in scopes):
        return None
    things: set[str] = set()
    spaces: set[str] = set()
    for scope in scopes:
        assert scope is not None
        things |= scope[0]
        spaces |= scope[1]
    return frozenset(t for t in things if _namespace(t) not in spaces), frozenset(spaces)


def _strings(values: tuple[rql.Value, ...]) -> frozenset[str]:
    return frozenset(v for v in values if isinstance(v, str))  # thingId never equals a non-string


def filter_scope(node: rql.Node | None) -> Scope:
    """The events an RQL filter can match at most, by thing id and namespace (None: any).

    Only ``eq`` / ``in`` on ``thingId`` and ``_namespace`` narrow, combined through ``and``
    (intersection) and ``or`` (union); everything else may match any thing.

    >>> things, spaces = filter_scope(rql.parse_filter('and(in(thingId,"a:1","b:2"),gt(attributes/x,1))'))
    >>> sorted(things), sorted(spaces)
    (['a:1', 'b:2'], [])
    >>> filter_scope(rql.parse_filter('or(eq(_namespace,"a"),eq(thingId,"b:2"))'))
    (frozenset({'b:2'}), frozenset({'a'}))
    >>> filter_scope(rql.parse_filter('or(eq(thingId,"a:1"),exists(attributes/x))')) is None
    True
    """
    match node:
        case rql.Comparison(op="eq", field=("thingId",), value=value):
            return _strings((value,)), _NOTHING
        case rql.Comparison(op="eq", field=("_namespace",), value=value):
            return _NOTHING, _strings((value,))
        case rql.In(field=("thingId",), values=values):
            return _strings(values), _NOTHING
        case rql.In(field=("_namespace",), values=values):
            return _NOTHING, _strings(values)
        case rql.And(children=children):
            scope: Scope = None
            for child in children:
                scope = intersect_scopes(scope, filter_scope(child))
            return scope
        case rql.Or(children=children):
            return _union_scopes([filter_scope(child) for child in children])
        case _:
            return None


class Subscription(Mailbox[Delivery]):
    """One subscriber: what it wants (thing ids / namespaces / all) and its bounded queue."""

    def __init__(
        self,
        fanout: FanOut,
        subjects: tuple[str, ...],
        *,
        thing_ids: frozenset[str] | None = None,
        namespaces: frozenset[str] | None = None,
        maxsize: int = QUEUE_SIZE,
    ) -> None:
        super().__init__(maxsize, "events")
        self.fanout = fanout
        self.subjects = subjects
        self.thing_ids = thing_ids
        self.namespaces = namespaces
        # per partition: deliveries at or below this position are not for this subscriber
        self.after: dict[int, int] = {}

    def start_after(self, heads: dict[int, int]) -> None:
        """Drop deliveries at or below each partition's ``heads`` (changes committed before the
        subscription), also those already queued."""
        self.after = heads
        self._items = deque(d for d in self._items if not self._before(d))

    def _before(self, delivery: Delivery) -> bool:
        position = delivery.position
        return position is not None and position[1] <= self.after.get(position[0], 0)

    def offer(self, delivery: Delivery) -> bool:
        """Queue a delivery; False (and dropped) when the queue is full."""
        if self._before(delivery):
            return True  # not this subscriber's: committed before it subscribed
        return self.put(delivery)

    def close(self) -> None:
        self.fanout.unsubscribe(self)


# How long the NATS subscription outlives the last live subscriber (a reconnecting client, or
# the next test of a session, finds it still there).
IDLE_SECONDS = 30.0


class FanOut:
    """The process's NATS event subscription and its subscribers."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        cache: PolicyCache,
        load: Callable[[str], Awaitable[ThingState]],
        *,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.cache = cache
        self.load = load
        self.queue_size = queue_size
        self._by_thing: dict[str, set[Subscription]] = {}
        self._by_namespace: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._last: OrderedDict[str, int] = OrderedDict()
        self._policy_ids: OrderedDict[str, str | None] = OrderedDict()
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._switching = asyncio.Lock()  # listening() and _quiet() one at a time
        self._idle: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.received = 0
        self.delivered = 0
        self.dropped = 0

    async def start(self) -> None:
        """Ready for subscribers (the NATS subscription follows the first, see the module)."""
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        async with self._switching:
            await self._unlisten()
        self.drop_all("server shutting down")

    @property
    def listening_now(self) -> bool:
        """Whether the process holds its NATS events subscription now."""
        return self._sub is not None

    async def listening(self) -> None:
        """Hold the NATS subscription, registered at the server: every event published from
        now on reaches this process. A live subscription awaits this before it reads the
        journal heads it starts after (:func:`~twinstore.api.live.from_now`)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._sub is not None or not self._started:
            return
        async with self._switching:
            if self._sub is None and self._started:
                sub = await self.nc.subscribe(self.subjects.events_wildcard)
                await self.nc.flush()  # the server has the subscription once this returns
                self._sub = sub
                self._task = asyncio.create_task(self._run(sub), name="twinstore-fanout")
        if not self._subscribed():  # the subscriber it was for left meanwhile
            self._when_idle()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work, name="twinstore-fanout-switch")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _subscribed(self) -> bool:
        return bool(self._all or self._by_thing or self._by_namespace)

    def _when_idle(self) -> None:
        """After the last subscriber left: end the NATS subscription in IDLE_SECONDS, unless
        another subscriber came by then."""
        if self._idle is not None or self._sub is None:
            return
        def quiet() -> None:
            self._idle = None
            if not self._subscribed():
                self._spawn(self._quiet())

        self._idle = asyncio.get_running_loop().call_later(IDLE_SECONDS, quiet)

    async def _quiet(self) -> None:
        async with self._switching:
            if not self._subscribed():
                await self._unlisten()

    async def _unlisten(self) -> None:
        sub, task = self._sub, self._task
        self._sub = self._task = None
        # Policy ids learnt from events go stale while events are not received.
        self._policy_ids.clear()
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def drop_all(self, reason: str) -> None:
        """End every subscription (their readers see :class:`SlowConsumerError` with ``reason``)."""
        indexed = [*self._by_thing.values(), *self._by_namespace.values()]
        for sub in {*self._all, *(s for group in indexed for s in group)}:
            sub.drop(reason)

    # ---- subscribers ----------------------------------------------------------------------

    def subscribe(
        self,
        subjects: tuple[str, ...],
        *,
        thing_ids: frozenset[str] | None = None,
        namespaces: frozenset[str] | None = None,
        filter: rql.Node | None = None,
        maxsize: int | None = None,
    ) -> Subscription:
        """A new subscriber for some things, some namespaces (both given: things in those
        namespaces), or (both None) all things; narrowed further by what ``filter`` can match
        (:func:`filter_scope`). The subscriber still evaluates its filter on what it gets."""
        asked: Scope = None
        if thing_ids is not None:
            asked = (thing_ids, _NOTHING)
        if namespaces is not None:
            asked = intersect_scopes(asked, (_NOTHING, namespaces))
        scope = intersect_scopes(asked, filter_scope(filter))
        sub = Subscription(
            self,
            subjects,
            thing_ids=None if scope is None else scope[0],
            namespaces=None if scope is None else scope[1],
            maxsize=maxsize or self.queue_size,
        )
        if scope is None:
            self._all.add(sub)
        else:
            for thing_id in scope[0]:
                self._by_thing.setdefault(thing_id, set()).add(sub)
            for namespace in scope[1]:
                self._by_namespace.setdefault(namespace, set()).add(sub)
        if self._sub is None or self._idle is not None:
            # Start listening now; a live subscription still awaits listening() before it
            # reads its starting heads (from_now).
            self._spawn(self.listening())
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._all.discard(sub)
        for index, keys in ((self._by_thing, sub.thing_ids), (self._by_namespace, sub.namespaces)):
            for key in keys or ():
                group = index.get(key)
                if group is not None:
                    group.discard(sub)
                    if not group:
                        del index[key]
        if not self._subscribed():
            self._when_idle()

    # ---- events ---------------------------------------------------------------------------

    async def _run(self, nats_sub: Any) -> None:
        async for msg in nats_sub.messages:
            try:
                await self.handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event fan-out failed for one message")

    async def handle(self, msg: Msg) -> None:
        if not (self._all or self._by_thing or self._by_namespace):
            # Nobody to deliver to (e.g. a process busy with ingestion): skip decoding. What was
            # learnt of policies may go stale meanwhile, so it is forgotten; dedupe needs nothing
            # (a new subscriber starts after the journal's head, see Subscription.start_after).
            if self._policy_ids:
                self._policy_ids.clear()
            return
        event = decode_event(msg.data, msg.headers)
        if event is not None:
            await self.dispatch(event, position_of(msg.headers))

    def _remember(self, index: OrderedDict[str, Any], key: str, value: Any) -> None:
        index[key] = value
        index.move_to_end(key)
        if len(index) > LRU_SIZE:
            index.popitem(last=False)

    async def dispatch(self, event: Event, position: Position | None = None) -> None:
        """Dedupe, learn the policy id, and hand the readable part to each interested subscriber."""
        if self._last.get(event.thing_id, 0) >= event.revision:
            return
        self._remember(self._last, event.thing_id, event.revision)
        self.received += 1
        self._learn_policy(event)
        namespace = event.thing_id.partition(":")[0]
        targets = (
            self._by_thing.get(event.thing_id, set()) | self._by_namespace.get(namespace, set()) | self._all
        )
        if not targets:
            return
        policy_id = await self._policy_id(event.thing_id)
        if policy_id is None:
            return
        shown: dict[tuple[str, ...], Delivery | None] = {}
        for sub in targets:
            if sub.subjects not in shown:
                view = await self.cache.view(policy_id, sub.subjects)
                part = readable_event(view, event)
                shown[sub.subjects] = None if view is None or part is None else Delivery(part, view, position)
            delivery = shown[sub.subjects]
            if delivery is None:
                continue
            if sub.offer(delivery):
                self.delivered += 1
            else:
                self.dropped += 1
                log.warning("live subscriber dropped: %s", sub.reason, extra={"thing_id": event.thing_id})
                self.unsubscribe(sub)

    def _learn_policy(self, event: Event) -> None:
        parts = parse_pointer(event.path)
        if not parts and isinstance(event.value, dict) and isinstance(event.value.get("policyId"), str):
            self._remember(self._policy_ids, event.thing_id, event.value["policyId"])
        elif parts == ["policyId"] and isinstance(event.value, str):
            self._remember(self._policy_ids, event.thing_id, event.value)

    async def _policy_id(self, thing_id: str) -> str | None:
        if thing_id in self._policy_ids:
            self._policy_ids.move_to_end(thing_id)
            return self._policy_ids[thing_id]
        state = await self.load(thing_id)
        policy_id = (state.doc or {}).get("policyId")
        if not isinstance(policy_id, str):
            return None  # absent now (deleted): nothing to decide with, nothing delivered
        self._remember(self._policy_ids, thing_id, policy_id)
        return policy_id
