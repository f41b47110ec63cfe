"""The Ditto HTTP API v2 for policies (``/api/2/policies/...``) and ``POST /api/2/checkPermissions``.

Every policy resource is a path in the policy JSON; resource keys (``thing:/features/f``)
contain slashes, so the key is read from the raw request path after ``/resources/`` (it may
be sent as is or percent-encoded, ``thing%3A%2Ffeatures%2Ff``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import unquote

from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler

from policies import PERMISSIONS, RESOURCE_TYPES, Enforcer, PolicyInvalidError, parse_resource_key
from twinstore.api.auth import authenticate
from twinstore.api.headers import header_value, parse_headers
from twinstore.api.things import JSON, _options, json_response, read_json, resource_handlers
from twinstore.model.errors import InvalidInputError, JsonInvalidError
from twinstore.model.policy import PolicyDelete, PolicyModify
from twinstore.policy_service import PolicyService, PolicyWrite

__all__ = ["policy_handlers"]

P = "/api/2/policies/{policyId:str}"
E = P + "/entries/{label:str}"

# (route, fixed path below the policy, methods, noun for docs)
RESOURCES: list[tuple[str, list[str], tuple[str, ...], str]] = [
    (P, [], ("GET", "PUT", "DELETE"), "policy"),
    (P + "/entries", ["entries"], ("GET", "PUT"), "entries of a policy"),
    (E, ["entries"], ("GET", "PUT", "DELETE"), "policy entry"),
    (E + "/subjects", ["entries", "subjects"], ("GET", "PUT"), "subjects of a policy entry"),
    (E + "/subjects/{subjectId:str}", ["entries", "subjects"], ("GET", "PUT", "DELETE"), "subject"),
    (E + "/resources", ["entries", "resources"], ("GET", "PUT"), "resources of a policy entry"),
    (E + "/resources/{resourcePath:path}", ["entries", "resources"], ("GET", "PUT", "DELETE"), "resource"),
]


def _service(request: Request[Any, Any, Any]) -> PolicyService:
    service: PolicyService = request.app.state.runtime.policies
    return service


def _parts(request: Request[Any, Any, Any], fixed: list[str]) -> list[str]:
    """The path inside the policy addressed by the request."""
    params = request.path_params
    if not fixed:
        return []
    parts = ["entries"]
    if "label" in params:
        parts.append(params["label"])
    if len(fixed) > 1:
        parts.append(fixed[1])
    if "subjectId" in params:
        parts.append(params["subjectId"])
    if "resourcePath" in params:
        raw: bytes = request.scope.get("raw_path", b"")
        # <policyId>/entries/<label>/resources/<key>: the key is what follows the fourth '/'
        # (splitting at the first '/resources/' would misread an entry labelled 'resources').
        below = raw.decode(errors="replace").split("/api/2/policies/", 1)[1]
        key = unquote(below.split("/", 4)[4])
        try:
            parse_resource_key(key)
        except PolicyInvalidError as exc:
            raise InvalidInputError(exc.message, error=exc.error) from None
        parts.append(key)
    return parts


def _make(
    method: str, fixed: list[str]
) -> Callable[[Request[Any, Any, Any]], Coroutine[Any, Any, Response[bytes]]]:
    async def handler(request: Request[Any, Any, Any]) -> Response[bytes]:
        auth = await authenticate(request)
        h = parse_headers(request)
        policy_id = request.path_params["policyId"]
        parts = _parts(request, fixed)
        service = _service(request)
        headers = {"correlation-id": h.correlation_id}
        if method == "GET":
            value, tag, _ = await service.retrieve(
                auth, policy_id, parts, if_match=h.if_match, if_none_match=h.if_none_match
            )
            return json_response(200, value, {**headers, "etag": tag})
        if method == "PUT":
            command: PolicyModify | PolicyDelete = PolicyModify(
                parts=parts, value=await read_json(request, (JSON,))
            )
        else:
            command = PolicyDelete(parts=parts)
        done = await service.write(
            PolicyWrite(
                policy_id=policy_id,
                command=command,
                auth=auth,
                correlation_id=h.correlation_id,
                if_match=h.if_match,
                if_none_match=h.if_none_match,
                allow_lockout=h.allow_policy_lockout,
            )
        )
        new_tag = done.tag(parts)
        if new_tag is not None:
            headers["etag"] = new_tag
        if not h.response_required:
            return json_response(202, headers=headers)
        if done.event.action == "created":
            headers["location"] = header_value(str(request.url).split("?")[0])
            return json_response(201, done.event.value, headers)
        return json_response(204, headers=headers)

    return handler


async def check_permissions(request: Request[Any, Any, Any]) -> Response[bytes]:
    """``POST /api/2/checkPermissions``: for each named check, whether the caller has the permissions.

    ``{"k": {"resource": "thing:/features/f", "entityId": "ns:thing", "hasPermissions": ["WRITE"]}}``
    answers ``{"k": true}`` when the entity's policy grants every permission on the resource,
    unrestricted (nothing below it revoked). An entity that does not exist, and one on which the
    caller holds no permission at all, answer ``false`` whatever is asked (``"hasPermissions":
    []`` included): the answer never tells whether an entity the caller cannot see exists.
    """
    auth = await authenticate(request)
    h = parse_headers(request)
    body = await read_json(request, (JSON,))
    if not isinstance(body, dict):
        raise JsonInvalidError("The permission check request must be a JSON object of named checks.")
    runtime = request.app.state.runtime
    result: dict[str, bool] = {}
    for name, check in body.items():
        if not isinstance(check, dict):
            raise JsonInvalidError(f"The permission check '{name}' must be a JSON object.")
        resource, entity, wanted = check.get("resource"), check.get("entityId"), check.get("hasPermissions")
        if not isinstance(resource, str) or not isinstance(entity, str) or not isinstance(wanted, list):
            raise JsonInvalidError(
                f"The permission check '{name}' needs 'resource' and 'entityId' strings and a "
                "'hasPermissions' array."
            )
        if not all(isinstance(p, str) and p in PERMISSIONS for p in wanted):
            raise JsonInvalidError(f"'hasPermissions' of '{name}' may only hold {', '.join(PERMISSIONS)}.")
        try:
            kind, _ = parse_resource_key(resource)
        except PolicyInvalidError as exc:
            raise InvalidInputError(exc.message, error=exc.error) from None
        result[name] = await _check(runtime, auth.subjects, kind, entity, resource, wanted)
    return json_response(200, result, {"correlation-id": h.correlation_id})


async def _check(
    runtime: Any, subjects: tuple[str, ...], kind: str, entity: str, resource: str, wanted: list[str]
) -> bool:
    enforcer: Enforcer | None
    if kind == "policy":
        enforcer = await runtime.policies.cache.enforcer(entity)
    else:
        state = await runtime.journal.load(entity)
        policy_id = (state.doc or {}).get("policyId")
        enforcer = await runtime.policies.cache.enforcer(policy_id) if isinstance(policy_id, str) else None
    if enforcer is None:
        return False
    view = enforcer.view(subjects)
    # Someone with no permission anywhere on the entity must get the answer of a missing one; a
    # caller holding some permission there learns that it exists from using it anyway.
    if not any(view.has_partial(kind, [], p) for kind in RESOURCE_TYPES for p in PERMISSIONS):
        return False
    return view.check(resource, wanted)


def policy_handlers() -> list[HTTPRouteHandler]:
    """Route handlers for every policy resource of the Ditto API and checkPermissions."""
    handlers: list[HTTPRouteHandler] = [
        _options("/api/2/checkPermissions", ("POST",)),
        post(
            "/api/2/checkPermissions",
            operation_id="postCheckPermissions",
            tags=["Policies"],
            summary="Check the caller's permissions on resources of things and policies",
            status_code=200,
        )(check_permissions),
    ]
    for path, fixed, methods, noun in RESOURCES:
        handlers += resource_handlers(
            path, methods, noun, ["Policies"], functools.partial(_make, fixed=fixed)
        )
    return handlers
