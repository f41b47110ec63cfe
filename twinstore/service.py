"""The engine for things: the one place that combines the store, the bus and the policies.

Interfaces (HTTP now; WebSocket, NATS ingestion later) call :class:`ThingService` with the
caller's :class:`~twinstore.auth.AuthContext` and commands, and get values (filtered to what
the caller may read) or :class:`~twinstore.model.errors.DittoError` back.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import msgspec

import policies
from policies import MISSING, READ, Enforcer, SubjectView
from twinstore.auth import AuthContext
from twinstore.enforcement import (
    PolicyCache,
    PolicyMovedError,
    check_condition,
    creates_thing,
    new_policy_id,
    readable_thing,
    thing_guard,
    with_doc,
)
from twinstore.model import etag, rql
from twinstore.model import patch as jp
from twinstore.model.errors import (
    ConflictError,
    DittoError,
    InvalidInputError,
    NotFoundError,
    PolicyConflictError,
    ThingNotCreatableError,
    UnavailableError,
    history_not_found,
    not_found,
    policy_not_found,
)
from twinstore.model.fields import select
from twinstore.model.ids import parse_pointer, validate_policy_id, validate_thing_id
from twinstore.model.limits import check_depth
from twinstore.model.policy import PolicyModify, default_policy
from twinstore.model.thing import Command, Create, Event, Merge, Modify, ThingState, decide, validate_path
from twinstore.policy_service import PolicyService, PolicyWrite, PolicyWritten
from twinstore.store.journal import Committed, Journal, Mark, Outcome, WriteRequest

__all__ = ["HistoryAccess", "Retrieved", "ThingService", "view_of"]

log = logging.getLogger("twinstore.service")


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def view_of(state: ThingState, fields: list[list[str]] | None) -> dict[str, Any]:
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
    # A historical read: the event that produced the revision shown (who, when, correlation id).
    event: Event | None = None


class HistoryAccess:
    """What one caller may read of each *life* of a thing, for every history read.

    A life is the revisions from a creation up to the deletion that ends it (or up to the head).
    A deleted id may be created again, by anyone and under another policy, so a life is judged
    by the policy it had last, never by a later (or earlier) life's:

    * the current life (the thing exists): the thing's current policy, as a current read is;
    * an ended life: the policy the thing had just before the deletion that ended it, and only
      while that policy is still the one it was then: one deleted and created again after the
      deletion (by anyone) never governed that life, and nobody reads the life through it.

    Within one life the last policy judges every revision (a thing moved to another policy is
    read as that policy allows, its earlier revisions too), as Ditto judges history by the
    thing's current policy. A caller reads a revision only through its life's view; a caller
    who may read no life at all gets 404 as for a thing that never existed. Views are looked up
    once per life, when first needed.
    """

    def __init__(
        self,
        service: ThingService,
        subjects: tuple[str, ...],
        current: ThingState,
        deletions: list[tuple[int, int]],
    ) -> None:
        self._service = service
        self._subjects = subjects
        self._current = current
        # (first revision, last revision, journal position of the deletion ending it; None: current)
        self._lives: list[tuple[int, int, int | None]] = []
        first = 1
        for revision, position in deletions:
            self._lives.append((first, revision, position))
            first = revision + 1
        if current.doc is not None and first <= current.revision:
            self._lives.append((first, current.revision, None))
        self._views: dict[int, SubjectView | None] = {}

    def _life(self, revision: int) -> int | None:
        for index, (first, last, _) in enumerate(self._lives):
            if first <= revision <= last:
                return index
        return None

    async def view_at(self, revision: int) -> SubjectView | None:
        """The caller's view of the life ``revision`` belongs to; None: the caller may not read it."""
        index = self._life(revision)
        return None if index is None else await self._view(index)

    async def readable(self) -> bool:
        """May the caller read any life of the thing (newest first: usually the first one asked)?"""
        for index in reversed(range(len(self._lives))):
            if await self._view(index) is not None:
                return True
        return False

    async def _view(self, index: int) -> SubjectView | None:
        if index not in self._views:
            self._views[index] = await self._judge(*self._lives[index])
        return self._views[index]

    async def _judge(self, first: int, last: int, ended_at: int | None) -> SubjectView | None:
        service, thing_id = self._service, self._current.thing_id
        if ended_at is None:
            policy_id = (self._current.doc or {}).get("policyId")
            view = await service.cache.view(policy_id, self._subjects) if isinstance(policy_id, str) else None
            return view if view is not None and view.has_partial("thing", [], READ) else None
        if last - 1 < first:
            return None
        try:
            state = await service.journal.load_at(thing_id, last - 1)
        except NotFoundError:  # that life lies before the retained history
            return None
        policy_id = (state.doc or {}).get("policyId")
        if not isinstance(policy_id, str):
            return None
        policy, origin = await service.policies.store.load_with_origin(policy_id)
        # The journal position orders commits of every entity (one write lock): a creation after
        # the deletion is a later life of the policy, which never governed this life of the thing.
        if policy.doc is None or origin > ended_at:
            return None
        enforcer = service.cache.compile(policy_id, policy.doc)
        view = None if enforcer is None else enforcer.view(self._subjects)
        return view if view is not None and view.has_partial("thing", [], READ) else None


class ThingService:
    """Reads and writes of things, each enforced by the thing's policy."""

    def __init__(self, journal: Journal, policies: PolicyService) -> None:
        self.journal = journal
        self.policies = policies
        self.cache: PolicyCache = policies.cache

    async def _view(self, state: ThingState, auth: AuthContext) -> SubjectView | None:
        policy_id = (state.doc or {}).get("policyId")
        if not isinstance(policy_id, str):
            return None
        return await self.cache.view(policy_id, auth.subjects)

    async def retrieve(
        self,
        auth: AuthContext,
        thing_id: str,
        path: str = "/",
        *,
        fields: list[list[str]] | None = None,
        if_match: list[str] | None = None,
        if_none_match: list[str] | None = None,
        condition: rql.Node | None = None,
        at_revision: int | None = None,
        at_timestamp: datetime | None = None,
    ) -> Retrieved:
        """The readable part of the resource at ``path``; 404 in Ditto's words when absent or unreadable.

        With ``at_revision`` or ``at_timestamp`` (the last revision at or before it) the resource
        as it was then, filtered by the policy of that revision's life (:class:`HistoryAccess`).
        """
        validate_thing_id(thing_id)
        parts = parse_pointer(path)
        validate_path(parts)
        state = await self.journal.load(thing_id)
        event = None
        view: SubjectView | None
        if at_revision is not None or at_timestamp is not None:
            state, event, view = await self._historical(auth, state, at_revision, at_timestamp)
        else:
            view = await self._view(state, auth)
        readable = readable_thing(view, state)
        if view is None or state.doc is None or readable is None:
            raise not_found(thing_id, [])
        if condition is not None:
            check_condition(view, state, condition)
        value = jp.get_at(state.doc, parts)
        if not parts:
            shown: Any = readable
        else:
            shown = jp.MISSING if value is jp.MISSING else view.filter("thing", parts, value)
        # The tag of what the caller receives: a digest over hidden values would disclose them.
        tag = None if shown is MISSING or value is jp.MISSING else etag.etag_of(shown, state.revision, parts)
        if if_match is not None or if_none_match is not None:
            etag.check(
                if_match,
                if_none_match,
                current_tag=tag,
                thing_tag=etag.etag_of(None, state.revision, []),
                read=True,
            )
        if shown is MISSING or shown is jp.MISSING or tag is None:
            # What is missing is judged on the readable part only: no probing of hidden paths.
            raise not_found(thing_id, missing_level(readable, parts))
        if not parts:
            shown = view_of(with_doc(state, readable), fields)
        elif fields is not None:
            shown = select(shown, fields)
        return Retrieved(value=shown, etag=tag, state=state, event=event)

    async def history_access(self, subjects: tuple[str, ...], current: ThingState) -> HistoryAccess:
        """The caller's access to each life of the thing (``current``: its state now); the one
        judge of every history read (``at-historical-*``, SSE and WebSocket history streams)."""
        return HistoryAccess(self, subjects, current, await self.journal.deletions(current.thing_id))

    async def _historical(
        self, auth: AuthContext, current: ThingState, at_revision: int | None, at_timestamp: datetime | None
    ) -> tuple[ThingState, Event, SubjectView]:
        """The state at a revision or time, its event and the caller's view of that revision's life.

        A caller who may read no life of the thing gets 404 as for a thing that does not exist
        (before anything about its history is told); a revision in a life the caller may not
        read is outside the history for them (404 ``things:thing.history.notfound``).
        """
        thing_id = current.thing_id
        if current.revision <= 0:
            raise not_found(thing_id, [])
        access = await self.history_access(auth.subjects, current)
        if at_timestamp is not None:
            revision = await self.journal.revision_at(thing_id, at_timestamp)
        else:
            assert at_revision is not None
            revision = at_revision
        view = await access.view_at(revision) if 0 < revision <= current.revision else None
        if view is None:
            if not await access.readable():
                raise not_found(thing_id, [])
            if at_timestamp is not None:
                raise history_not_found(thing_id, timestamp=_iso(at_timestamp))
            raise history_not_found(thing_id, revision=revision)
        state, event = await self.journal.load_historical(thing_id, revision)
        if event is None or state.doc is None:
            if at_timestamp is not None:
                raise history_not_found(thing_id, timestamp=_iso(at_timestamp))
            raise history_not_found(thing_id, revision=revision)
        return state, event, view

    async def _visible(
        self, auth: AuthContext, states: list[ThingState], fields: list[list[str]] | None
    ) -> list[dict[str, Any]]:
        policy_ids = [
            s.doc["policyId"] for s in states if s.doc is not None and isinstance(s.doc.get("policyId"), str)
        ]
        enforcers = await self.cache.enforcers(policy_ids)
        result = []
        for state in states:
            enforcer = enforcers.get((state.doc or {}).get("policyId", ""))
            readable = readable_thing(None if enforcer is None else enforcer.view(auth.subjects), state)
            if readable is not None:
                result.append(view_of(with_doc(state, readable), fields))
        return result

    async def retrieve_many(
        self, auth: AuthContext, thing_ids: list[str], fields: list[list[str]] | None
    ) -> list[dict[str, Any]]:
        """Readable things in the order asked for; absent and unreadable ones are left out (as Ditto)."""
        for thing_id in thing_ids:
            validate_thing_id(thing_id)
        states = await self.journal.load_many(thing_ids)
        return await self._visible(
            auth, [states[i] for i in thing_ids if i in states and states[i].exists], fields
        )

    async def list_things(
        self, auth: AuthContext, fields: list[list[str]] | None, limit: int
    ) -> list[dict[str, Any]]:
        """Readable things sorted by id (at most ``limit`` looked at; search comes with RQL)."""
        return await self._visible(auth, await self.journal.load_all(limit), fields)

    async def write(
        self,
        auth: AuthContext,
        request: WriteRequest,
        *,
        allow_lockout: bool = False,
        condition: rql.Node | None = None,
    ) -> Committed:
        """Authorize, then commit one command (validated, precondition-checked, group-committed).

        ``condition`` (Ditto's RQL header) must hold on the thing the write is decided on.
        """
        validate_thing_id(request.thing_id)
        # before any policy check walks the value: a deep one must not exhaust recursion there
        check_depth(getattr(request.command, "value", None), request.command.path)
        for _attempt in range(5):
            state = await self.journal.peek(request.thing_id)
            created: PolicyWritten | None = None
            if state.exists:
                guard = await self._guard_existing(auth, state, request.command, condition)
            elif creates_thing(request.command):
                guard, created = await self._prepare_creation(auth, request, allow_lockout)
            else:
                raise not_found(request.thing_id, [])
            try:
                return await self.journal.write(msgspec.structs.replace(request, guard=guard))
            except PolicyMovedError:
                await self._undo(created, request)
                continue
            except DittoError as exc:
                if refused(exc):
                    await self._undo(created, request)
                raise
        raise ConflictError("The Thing's policy kept changing during the write; retry.")

    async def write_unit(
        self, items: list[tuple[AuthContext, WriteRequest, rql.Node | None]], mark: Mark | None = None
    ) -> list[Outcome]:
        """Authorize and commit many writes (and ``mark``) in one transaction; an outcome each.

        For ingestion: each write is guarded as by :meth:`write`; a refused one is its error and
        the others go on. The states the guards are prepared from must not change within the
        unit, so a unit must not both create (or replace, delete, re-policy) a thing and write
        it again: :func:`splits_unit` tells where the caller has to start a new unit. A policy
        changed by someone else meanwhile fails the whole unit (:class:`ConflictError`);
        preparing it again is the caller's retry.
        """
        outcomes: list[Outcome | None] = [None] * len(items)
        created: dict[int, PolicyWritten] = {}  # index -> the policy its thing's creation created
        states = await self.journal.peek_many([r.thing_id for _, r, _ in items])
        # every policy of the unit in one query (a cold cache would otherwise load them one by one)
        await self.cache.enforcers(
            [p for s in states.values() if s.doc is not None and isinstance(p := s.doc.get("policyId"), str)]
        )
        guarded: list[WriteRequest] = []
        where: list[int] = []
        # A write inside a feature or attribute of an existing thing needs only the thing's guard,
        # the same for all such writes of one caller: made once per thing and caller (the journal
        # runs it on the exact state each write is decided on).
        plain: dict[tuple[str, tuple[str, ...]], Any] = {}
        for index, (auth, request, condition) in enumerate(items):
            try:
                check_depth(getattr(request.command, "value", None), request.command.path)
                state = states[request.thing_id]  # ids were validated by the caller (decoding)
                path = request.command.path
                if state.exists and condition is None and path.startswith(("/features/", "/attributes/")):
                    key = (request.thing_id, auth.subjects)
                    guard = plain.get(key)
                    if guard is None:
                        assert state.doc is not None
                        view = await self._view(state, auth)
                        guard = plain[key] = thing_guard(
                            state.thing_id, state.doc.get("policyId"), view, creating=False
                        )
                elif state.exists:
                    guard = await self._guard_existing(auth, state, request.command, condition)
                elif creates_thing(request.command):
                    guard, policy = await self._prepare_creation(auth, request, False)
                    if policy is not None:
                        created[index] = policy
                else:
                    raise not_found(request.thing_id, [])
            except DittoError as exc:
                outcomes[index] = exc
                continue
            guarded.append(msgspec.structs.replace(request, guard=guard))
            where.append(index)
        try:
            if guarded or mark is not None:
                for index, outcome in zip(where, await self.journal.write_unit(guarded, mark), strict=True):
                    outcomes[index] = outcome
        except DittoError as exc:
            if refused(exc):  # the whole unit, nothing of it written
                for index, policy in created.items():
                    await self._undo(policy, items[index][1])
            raise
        for index, policy in created.items():
            result = outcomes[index]
            if isinstance(result, DittoError) and refused(result):
                await self._undo(policy, items[index][1])
        return [o if o is not None else ConflictError("not decided") for o in outcomes]

    async def _undo(self, created: PolicyWritten | None, request: WriteRequest) -> None:
        """The policy created for a thing whose creation failed is deleted again (Ditto's
        rollback of an implicitly created policy; see PolicyService.undo_creation). A failure to
        undo leaves it (logged): the thing's own failure is what the caller gets."""
        if created is None:
            return
        try:
            undone = await self.policies.undo_creation(created, request.correlation_id)
        except Exception as exc:  # the database may be what failed the thing too
            log.warning(
                "policy created for a failed thing creation not deleted",
                extra={"policy_id": created.after.policy_id, "thing_id": request.thing_id, "error": str(exc)},
            )
            return
        if not undone:
            log.info(
                "policy created for a failed thing creation kept: changed or used meanwhile",
                extra={"policy_id": created.after.policy_id, "thing_id": request.thing_id},
            )

    async def _guard_existing(
        self, auth: AuthContext, state: ThingState, command: Command, condition: rql.Node | None
    ) -> Any:
        assert state.doc is not None
        policy_id = state.doc.get("policyId")
        view = await self._view(state, auth)
        guard = thing_guard(state.thing_id, policy_id, view, creating=False, condition=condition)
        guard(state, command)  # refuse early (the journal checks again on the state it decides on)
        body = command.value if isinstance(command, Modify) and command.path in ("", "/") else None
        if isinstance(body, dict) and "_policy" in body:
            raise InvalidInputError(
                f"The Thing with ID '{state.thing_id}' could not be modified as it contained an inline "
                "Policy.",
                error="things:policy.notallowed",
                description="Once a Thing is created it can't be modified with another Policy. Use the "
                "Policy resources to modify the existing Policy.",
            )
        moved_to = new_policy_id(state, command)
        if moved_to is not None:
            await self._check_new_policy(auth, moved_to)
        return guard

    async def _check_new_policy(self, auth: AuthContext, policy_id: str) -> None:
        """A thing may only be given a policy that exists and that the caller may read."""
        validate_policy_id(policy_id)
        view = await self.cache.view(policy_id, auth.subjects)
        if view is None or not view.has_partial("policy", [], READ):
            raise policy_not_found(policy_id)

    async def _initial_policy(self, auth: AuthContext, body: dict[str, Any], policy_id: str) -> Any:
        """The policy a new thing brings: its inline ``_policy`` or a copy (``_copyPolicyFrom``).

        ``_copyPolicyFrom`` names a policy (``"ns:policy"``) or a thing's policy
        (``"{{ ref:things/ns:thing/policyId }}"``); the caller must be able to read all of it.
        """
        inline, source = body.get("_policy"), body.get("_copyPolicyFrom")
        if inline is not None and source is not None:
            raise InvalidInputError(
                "A new Thing can bring an inline '_policy' or '_copyPolicyFrom', not both.",
                error="things:policy.notallowed",
            )
        if isinstance(inline, dict) and inline.get("policyId", policy_id) != policy_id:
            raise InvalidInputError(
                f"The Thing could not be created as its inline Policy has the ID '{inline['policyId']}' "
                f"and the Thing the Policy ID '{policy_id}'.",
                error="things:policyId.notallowed",
                description="Give the inline Policy no ID (it gets the Thing's policyId, else the Thing ID).",
            )
        if source is None:
            return inline
        if not isinstance(source, str):
            raise InvalidInputError("'_copyPolicyFrom' must be a JSON string.", error="json.invalid")
        ref = _POLICY_REF.fullmatch(source.strip())
        if ref is not None:
            got = await self.retrieve(auth, ref.group(1), "/policyId")
            source = str(got.value)
        view = await self.cache.view(source, auth.subjects)
        if view is None or not view.has_unrestricted("policy", [], READ):
            raise policy_not_found(source)
        state = await self.policies.store.load(source)
        if state.doc is None:
            raise policy_not_found(source)
        return {**state.doc, "policyId": policy_id}

    async def _prepare_creation(
        self, auth: AuthContext, request: WriteRequest, allow_lockout: bool
    ) -> tuple[Any, PolicyWritten | None]:
        """Create or find the policy of a new thing, as Ditto does: the guard that checks WRITE on
        ``thing:/``, and the policy created (``None``: an existing one), which the caller deletes
        again if the thing's creation fails (:meth:`_undo`).

        * an inline ``"_policy"``, or no ``policyId`` at all: the thing's policy is created now
          (the inline one, else Ditto's default policy, granting the creating subject READ and
          WRITE on ``thing:/``, ``policy:/`` and ``message:/``), with the id ``policyId`` or the
          thing's id; if that policy exists already, 400 ``things:thing.notcreatable`` (name it
          as ``policyId`` to use it);
        * a ``policyId`` alone: that policy must exist (else 400 ``things:thing.notcreatable``)
          and grant the creator WRITE on ``thing:/`` (else 403).
        """
        command = request.command
        assert isinstance(command, Create | Modify | Merge)
        body = command.value if isinstance(command.value, dict) else {}
        # Validate the thing and its preconditions before creating any policy for it (no orphan
        # policy for a bad body or a failed If-Match).
        absent = ThingState.absent(request.thing_id)
        if request.if_match is not None:
            etag.check(request.if_match, None, current_tag=None, thing_tag=None, read=False)
        decide(absent, _without_policy(command), datetime.now(UTC))
        policy_id = body.get("policyId", request.thing_id)
        if not isinstance(policy_id, str):
            raise InvalidInputError("'policyId' must be a JSON string.", error="json.invalid")
        inline = await self._initial_policy(auth, body, policy_id)
        created: PolicyWritten | None = None
        if inline is None and "policyId" in body:
            if await self.cache.enforcer(policy_id) is None:
                raise ThingNotCreatableError(
                    f"The Thing with ID '{request.thing_id}' could not be created as the Policy with ID "
                    f"'{policy_id}' is not existing.",
                    description="Check if the ID of the Policy you created the Thing with is correct and "
                    "that the Policy is existing.",
                )
        else:
            if inline is not None:
                # Refuse before creating it: an inline policy that does not let the creator write
                # the thing would otherwise be left behind without its thing.
                inline_view = _inline_view(inline, policy_id, auth)
                if inline_view is not None:
                    guard = thing_guard(request.thing_id, policy_id, inline_view, creating=True)
                    guard(absent, command)
            initial = inline if inline is not None else default_policy(policy_id, auth.subject)
            try:
                created = await self.policies.write(
                    PolicyWrite(
                        policy_id=policy_id,
                        command=PolicyModify(parts=[], value=initial),
                        auth=auth,
                        correlation_id=request.correlation_id,
                        allow_lockout=allow_lockout,
                        must_not_exist=True,
                    )
                )
            except PolicyConflictError:
                raise ThingNotCreatableError(
                    f"The Thing with ID '{request.thing_id}' could not be created because creation of its "
                    f"implicit Policy ID '{policy_id}' failed: a Policy with that ID exists.",
                    description="If you want to use an existing Policy, specify it as 'policyId' in the "
                    "Thing JSON you create.",
                ) from None
        view = await self.cache.view(policy_id, auth.subjects)
        return thing_guard(request.thing_id, policy_id, view, creating=True), created


_POLICY_REF = re.compile(r"\{\{\s*ref:things/([^/\s]+)/policyId\s*\}\}")


def splits_unit(command: Command) -> bool:
    """True for a command after which :meth:`ThingService.write_unit` needs a new unit: it
    creates, replaces or deletes the whole thing or moves it to another policy."""
    return command.path in ("", "/", "/policyId")


def refused(exc: DittoError) -> bool:
    """Was the write refused, nothing of it written? Not so for 503 (the database was lost, maybe
    while committing it): the policy a new thing brought is undone only after a refusal, never
    when the thing may exist after all (a cancelled request likewise leaves it: its queued write
    may still commit)."""
    return not isinstance(exc, UnavailableError)


def _inline_view(inline: Any, policy_id: str, auth: AuthContext) -> SubjectView | None:
    """The creator's view of an inline policy (``None`` if it is not valid: its write says why)."""
    doc = {**inline, "policyId": policy_id} if isinstance(inline, dict) else inline
    try:
        return Enforcer(policies.parse_policy(doc, policy_id)).view(auth.subjects)
    except policies.PolicyInvalidError:
        return None


def _without_policy(command: Command) -> Command:
    """The command without ``_policy`` / ``_copyPolicyFrom`` (they are not part of the thing)."""
    if isinstance(command, Create | Modify | Merge) and isinstance(command.value, dict):
        value = {k: v for k, v in command.value.items() if k not in ("_policy", "_copyPolicyFrom")}
        return msgspec.structs.replace(command, value=value)
    return command
