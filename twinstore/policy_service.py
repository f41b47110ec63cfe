"""The engine for policies: retrieve and write Ditto policy resources, enforced by the policy itself.

Rules (Ditto's): reading needs READ on ``policy:/<path>`` (the answer is filtered to what is
readable; nothing readable is 404 ``policies:policy.notfound``); writing needs WRITE on the
path, unrestricted (403 ``policies:<resource>.notmodifiable``); any authenticated subject may
create a policy that does not exist. A write that would leave the writer without WRITE on
``policy:/`` is refused (403 ``policies:policy.modificationinvalid`` /
``policies:entry.modificationinvalid``) unless ``allow-policy-lockout`` is set.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from policies import MISSING, READ, WRITE, SubjectView
from twinstore.auth import AuthContext
from twinstore.enforcement import PolicyCache
from twinstore.model import etag
from twinstore.model import patch as jp
from twinstore.model.errors import (
    ForbiddenError,
    PolicyConflictError,
    PolicyInUseError,
    policy_not_found,
)
from twinstore.model.ids import validate_policy_id
from twinstore.model.policy import (
    PolicyCommand,
    PolicyDelete,
    PolicyEvent,
    PolicyModify,
    PolicyState,
    _not_found,
    decide_policy,
    evolve_policy,
    resource_noun,
    validate_policy_path,
)
from twinstore.store.policies import PolicyStore

__all__ = ["PolicyService", "PolicyWrite", "PolicyWritten"]


class PolicyWrite(msgspec.Struct, kw_only=True):
    """A command for one policy with its preconditions and who sent it."""

    policy_id: str
    command: PolicyCommand
    auth: AuthContext
    correlation_id: str | None = None
    if_match: list[str] | None = None
    if_none_match: list[str] | None = None
    allow_lockout: bool = False
    must_not_exist: bool = False  # inline policies of new things: 409 if the id is taken


class PolicyWritten(msgspec.Struct, kw_only=True):
    event: PolicyEvent
    before: PolicyState
    after: PolicyState
    subjects: tuple[str, ...] = ()  # the writer's

    def tag(self, parts: list[str]) -> str | None:
        """The entity tag of the resource at ``parts`` after the write, as the writer may read it."""
        enforcer = PolicyCache.compile(self.after.policy_id, self.after.doc)
        view = None if enforcer is None else enforcer.view(self.subjects)
        return etag.resource_tag(self.after.doc, self.after.revision, parts, _visible(view))


def _visible(view: SubjectView | None) -> Any:
    """``etag.resource_tag``'s ``visible``: the part of a policy resource ``view`` may read."""

    def visible(parts: list[str], value: Any) -> Any:
        shown = MISSING if view is None else view.filter("policy", parts, value)
        return jp.MISSING if shown is MISSING else shown

    return visible


class _Changed(Exception):
    """The policy to undo is no longer the one created: it stays."""


class PolicyService:
    """Reads and writes of policies (event-sourced in the journal, entity ``policy``)."""

    def __init__(self, store: PolicyStore, cache: PolicyCache) -> None:
        self.store = store
        self.cache = cache

    async def retrieve(
        self,
        auth: AuthContext,
        policy_id: str,
        parts: list[str],
        *,
        if_match: list[str] | None = None,
        if_none_match: list[str] | None = None,
    ) -> tuple[Any, str, PolicyState]:
        """The readable part of the resource at ``parts``: (value, ETag, state)."""
        validate_policy_id(policy_id)
        validate_policy_path(parts)
        state = await self.store.load(policy_id)
        view = self._view(state, auth)
        if state.doc is None or view is None or not view.has_partial("policy", [], READ):
            raise policy_not_found(policy_id)
        value = jp.get_at(state.doc, parts)
        shown = MISSING if value is jp.MISSING else view.filter("policy", parts, value)
        # The tag of what the caller receives: a digest over hidden values would disclose them.
        tag = None if shown is MISSING else etag.etag_of(shown, state.revision, parts)
        if if_match is not None or if_none_match is not None:
            etag.check(
                if_match, if_none_match, current_tag=tag, thing_tag=f'"rev:{state.revision}"', read=True
            )
        if shown is MISSING or tag is None:
            readable = view.filter("policy", [], state.doc)
            raise _not_found(PolicyState(policy_id=policy_id, doc=readable or {}), parts)
        if not parts and isinstance(shown, dict):
            shown = {"policyId": policy_id, **shown}  # first, as Ditto writes it (jsonb sorts keys)
        return shown, tag, state

    def _view(self, state: PolicyState, auth: AuthContext) -> SubjectView | None:
        enforcer = self.cache.compile(state.policy_id, state.doc)
        return None if enforcer is None else enforcer.view(auth.subjects)

    async def write(self, request: PolicyWrite) -> PolicyWritten:
        """Authorize on the locked current state, decide, check lock-out, commit."""
        validate_policy_id(request.policy_id)
        validate_policy_path(request.command.parts)

        def decide(before: PolicyState, now: datetime) -> PolicyEvent:
            return self._decide(request, before, now)

        try:
            event, before, after = await self.store.write(request.policy_id, decide)
        finally:
            self.cache.invalidate(request.policy_id)
        return PolicyWritten(event=event, before=before, after=after, subjects=request.auth.subjects)

    async def undo_creation(self, created: PolicyWritten, correlation_id: str | None = None) -> bool:
        """Delete the policy ``created`` for a new thing whose own creation then failed, as
        Ditto's ``RollbackCreatedPolicy`` does: the policy and the thing live in different
        partitions (unless they share the id), so they are two transactions, and this undoes the
        first when the second fails. Only while the policy is still as created (its revision)
        and no thing uses it (see ``policy_delete_in_use``); True when deleted."""
        policy_id = created.after.policy_id

        def decide(before: PolicyState, now: datetime) -> PolicyEvent:
            if before.doc is None or before.revision != created.after.revision:
                raise _Changed()
            return decide_policy(
                before,
                PolicyDelete(parts=[]),
                now,
                originator=created.event.originator,
                correlation_id=correlation_id,
            )

        try:
            await self.store.write(policy_id, decide)
        except (_Changed, PolicyInUseError):
            return False
        finally:
            self.cache.invalidate(policy_id)
        return True

    def _decide(self, request: PolicyWrite, before: PolicyState, now: datetime) -> PolicyEvent:
        parts = request.command.parts
        view: SubjectView | None = None
        if before.doc is not None:
            if request.must_not_exist:
                raise PolicyConflictError(f"The Policy with ID '{request.policy_id}' already exists.")
            view = self._view(before, request.auth)
            if view is None or not view.has_partial("policy", [], READ):
                raise policy_not_found(request.policy_id)
            if not view.has_unrestricted("policy", parts, WRITE):
                noun, code = resource_noun(parts)
                raise ForbiddenError(
                    f"The {noun} at '/{'/'.join(parts)}' of the Policy with ID '{request.policy_id}' "
                    "could not be modified as the requester had insufficient permissions "
                    "('WRITE' is required).",
                    error=code + ".notmodifiable",
                    description="Check if the ID of the Policy was correct and you have sufficient "
                    "permissions.",
                )
        elif not (isinstance(request.command, PolicyModify) and not parts):
            raise _not_found(before, parts)
        if request.if_match is not None or request.if_none_match is not None:
            etag.check(
                request.if_match,
                request.if_none_match,
                current_tag=None
                if before.doc is None
                else etag.resource_tag(before.doc, before.revision, parts, _visible(view)),
                thing_tag=None if before.doc is None else f'"rev:{before.revision}"',
                read=False,
            )
        event = decide_policy(
            before,
            request.command,
            now,
            originator=request.auth.subject,
            correlation_id=request.correlation_id,
        )
        after = evolve_policy(before, event)
        if after.doc is not None and not request.allow_lockout:
            view = self._view(after, request.auth)
            if view is None or not view.has_permission("policy", [], WRITE):
                entry = len(parts) >= 2
                raise ForbiddenError(
                    (f"The PolicyEntry with Label '{parts[1]}'" if entry else "The Policy")
                    + f" on the Policy with ID '{request.policy_id}' could not be modified as the resulting "
                    "Policy would leave the requester without 'WRITE' on 'policy:/'"
                    " (set 'allow-policy-lockout' to do it anyway).",
                    error="policies:entry.modificationinvalid"
                    if entry
                    else "policies:policy.modificationinvalid",
                    description="There must always be at least one PolicyEntry with 'WRITE' permissions on "
                    "resource 'policy:/'.",
                )
        return event
