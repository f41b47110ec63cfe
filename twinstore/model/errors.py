"""The one error hierarchy of twinstore, each class carrying Ditto's fields.

::

    DittoError                      (status, error code, message, description)
    ├── InvalidInputError           400  bad JSON, bad id, bad path, bad header ...
    │   ├── JsonInvalidError        400  json.invalid
    │   ├── ThingIdInvalidError     400  things:id.invalid
    │   ├── ThingIdNotSettableError 400  things:id.notsettable
    │   ├── ThingInvalidError       400  things:thing.invalid (shape of a thing)
    │   ├── PolicyIdInvalidError    400  policies:id.invalid
    │   ├── DefinitionIdentifierInvalidError 400 things:definition.identifier.invalid
    │   ├── MergeInvalidError       400  things:merge.invalid (null or {} merged into a thing)
    │   ├── PolicyIdNotDeletableError 400 things:policyId.notdeletable
    │   ├── ThingIdNotDeletableError 400 things:id.notdeletable
    │   ├── PatchInvalidError       400  things:patch.invalid (RFC 6902 / 7396)
    │   ├── RqlInvalidError         400  rql.expression.invalid (search filter, options, conditions)
    │   └── HeaderInvalidError      400  header.invalid
    ├── AuthenticationError         401  gateway:authentication.failed
    ├── ForbiddenError              403  things:thing.notmodifiable and friends, policies:*.notmodifiable,
    │                                    policies:policy.modificationinvalid (lock-out)
    ├── NotFoundError               404  things:thing.notfound and friends, policies:policy.notfound ...
    ├── PreconditionFailedError     412  things:precondition.failed
    ├── ConditionFailedError        412  things:condition.failed (the ``condition`` header)
    ├── PreconditionNotModifiedError 304 things:precondition.notmodified
    ├── TooLargeError               413  things:thing.tooLarge
    ├── HeadersTooLargeError        431  headers.too.large
    ├── TooManyRequestsError        429  too.many.requests (failed logins, Ditto's throttling)
    ├── UnsupportedMediaTypeError   415  mediatype.unsupported
    ├── ConflictError               409  things:thing.conflict (internal retries exhausted)
    │   └── PolicyConflictError     409  policies:policy.conflict
    └── UnavailableError            503  things:persistence.unavailable

One handler in the API turns any of them into
``{"status", "error", "message", "description"}``; NATS ingestion maps the same classes
to outcomes (4xx -> terminate and report, 503 -> retry later).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "ConditionFailedError",
    "ConflictError",
    "DefinitionIdentifierInvalidError",
    "DittoError",
    "ForbiddenError",
    "HeaderInvalidError",
    "HeadersTooLargeError",
    "InvalidInputError",
    "JsonInvalidError",
    "MergeInvalidError",
    "NotFoundError",
    "PatchInvalidError",
    "PolicyConflictError",
    "PolicyIdInvalidError",
    "PolicyIdNotDeletableError",
    "PolicyInUseError",
    "PreconditionFailedError",
    "PreconditionNotModifiedError",
    "RqlInvalidError",
    "ThingIdInvalidError",
    "ThingIdNotDeletableError",
    "ThingIdNotSettableError",
    "ThingInvalidError",
    "ThingNotCreatableError",
    "TooLargeError",
    "TooManyRequestsError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "history_not_found",
    "not_found",
    "not_modifiable",
    "policy_not_found",
]


class DittoError(Exception):
    """Base of all errors reported to clients in Ditto's error format."""

    status: ClassVar[int] = 500
    error: ClassVar[str] = "things:internalerror"
    description: ClassVar[str] = "An unexpected error occurred."

    def __init__(self, message: str, *, description: str | None = None, error: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.instance_description = description or type(self).description
        self.instance_error = error or type(self).error

    def to_dict(self) -> dict[str, Any]:
        """The Ditto error body.

        >>> NotFoundError("gone").to_dict()["status"]
        404
        """
        return {
            "status": self.status,
            "error": self.instance_error,
            "message": self.message,
            "description": self.instance_description,
        }


class InvalidInputError(DittoError):
    status = 400
    error = "things:request.invalid"
    description = "Check the request: its path, headers and body."


class RqlInvalidError(InvalidInputError):
    error = "rql.expression.invalid"
    description = (
        "Check the RQL expression (see https://www.eclipse.dev/ditto/basic-rql.html): operators such as "
        'eq(attributes/a,"x"), and(...), exists(...), quoted strings, fields like attributes/...'
    )


class JsonInvalidError(InvalidInputError):
    error = "json.invalid"
    description = (
        "Check if the JSON was valid (e.g. on https://jsonlint.com) and if it was in required format."
    )


class ThingIdInvalidError(InvalidInputError):
    error = "things:id.invalid"
    description = (
        "It must conform to the namespaced entity ID notation (see Ditto documentation): "
        "a namespace of dot-separated Java-like identifiers, a colon, and a name without "
        "control characters or slashes; at most 256 characters."
    )


class ThingIdNotSettableError(InvalidInputError):
    error = "things:id.notsettable"
    description = "Either delete the Thing ID from the body or use the same Thing ID as in the URL path."


class ThingInvalidError(InvalidInputError):
    error = "things:thing.invalid"
    description = "Check the structure of the Thing (see Ditto's thing JSON schema)."


class PolicyIdInvalidError(InvalidInputError):
    error = "policies:id.invalid"
    description = "It must conform to the namespaced entity ID notation (see Ditto documentation)."


class DefinitionIdentifierInvalidError(InvalidInputError):
    error = "things:definition.identifier.invalid"
    description = (
        "An identifier string is expected to have the structure 'namespace:name:version' where each "
        "segment must contain at least one char of [_a-zA-Z0-9\\-.] OR it must be a valid HTTP(s) URL."
    )


class MergeInvalidError(InvalidInputError):
    error = "things:merge.invalid"
    description = "Provide a non-empty JSON object to merge into the Thing."


class PolicyIdNotDeletableError(InvalidInputError):
    error = "things:policyId.notdeletable"
    description = "A Thing always has a policy ID: set another one instead of removing it."


class ThingIdNotDeletableError(InvalidInputError):
    error = "things:id.notdeletable"
    description = "The Thing ID is part of the Thing; it cannot be removed."


class PatchInvalidError(InvalidInputError):
    error = "things:patch.invalid"
    description = "Check the patch document (RFC 7396 merge patch or RFC 6902 JSON patch)."


class ThingNotCreatableError(InvalidInputError):
    error = "things:thing.notcreatable"
    description = "Check the policy of the new Thing."


class HeaderInvalidError(InvalidInputError):
    error = "header.invalid"
    description = "Verify that the header has the correct syntax and try again."


class AuthenticationError(DittoError):
    status = 401
    error = "gateway:authentication.failed"
    description = "Check if your credentials were correct."


class ForbiddenError(DittoError):
    """Readable but not writable (Ditto answers 403; not readable at all is 404)."""

    status = 403
    error = "things:thing.notmodifiable"
    description = "Check if the ID was correct and you have sufficient permissions."


class NotFoundError(DittoError):
    status = 404
    error = "things:thing.notfound"
    description = "Check if the ID of your requested Thing was correct and you have sufficient permissions."


class PreconditionFailedError(DittoError):
    status = 412
    error = "things:precondition.failed"
    description = "The comparison of the provided precondition header with the current ETag value failed."

    def __init__(self, message: str, etag: str | None = None) -> None:
        super().__init__(message)
        self.etag = etag  # the resource's current tag, sent back as ETag (None: it does not exist)


class ConditionFailedError(DittoError):
    """The ``condition`` (RQL) of a request does not hold on the thing (Ditto 2.1+)."""

    status = 412
    error = "things:condition.failed"
    description = (
        "The provided condition did not match the actual Thing state. Please check your provided condition."
    )


class PreconditionNotModifiedError(DittoError):
    status = 304
    error = "things:precondition.notmodified"
    description = "The comparison of the provided precondition header with the current ETag value was true."

    def __init__(self, message: str, etag: str) -> None:
        super().__init__(message)
        self.etag = etag


class TooLargeError(DittoError):
    status = 413
    error = "things:thing.tooLarge"
    description = "Reduce the size of the request body or of the Thing."


class HeadersTooLargeError(DittoError):
    status = 431
    error = "headers.too.large"
    description = "Send fewer or smaller headers (see the max_header_bytes setting)."


class TooManyRequestsError(DittoError):
    """Too many requests (or failed authentications) from one client or for one user."""

    status = 429
    error = "too.many.requests"
    description = "You made too many requests. Wait and try again later."

    def __init__(
        self, message: str, *, retry_after: float | None = None, description: str | None = None
    ) -> None:
        super().__init__(message, description=description)
        self.retry_after = retry_after  # seconds, sent back as Retry-After


class UnsupportedMediaTypeError(DittoError):
    status = 415
    error = "mediatype.unsupported"
    description = "Use one of the media types the resource supports for this method."


class ConflictError(DittoError):
    status = 409
    error = "things:thing.conflict"
    description = "Concurrent modifications kept conflicting; retry the request."


class PolicyConflictError(ConflictError):
    error = "policies:policy.conflict"
    description = "Choose another Policy ID, or modify the existing Policy."


class PolicyInUseError(ConflictError):
    error = "policies:policy.notdeletable"
    description = "Delete the Things that use the Policy, or give them another one, first."


class UnavailableError(DittoError):
    status = 503
    error = "things:persistence.unavailable"
    description = "The persistence is not reachable right now; retry later."


# Each resource of a thing, addressed by the first path segments (relative to the thing):
# the stem of its Ditto error codes (``<stem>.notfound`` / ``<stem>.notmodifiable``) and its
# noun. The first matching pattern wins.
_RESOURCES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("attributes", "*", "**"), "things:attribute", "attribute"),
    (("attributes",), "things:attributes", "attributes"),
    (("features", "*", "properties", "*", "**"), "things:feature.property", "property"),
    (("features", "*", "properties"), "things:feature.properties", "properties"),
    (("features", "*", "desiredProperties", "*", "**"), "things:feature.desiredProperty", "desired property"),
    (("features", "*", "desiredProperties"), "things:feature.desiredProperties", "desired properties"),
    (("features", "*", "definition"), "things:feature.definition", "feature definition"),
    (("features", "*"), "things:feature", "feature"),
    (("features",), "things:features", "features"),
    (("definition",), "things:definition", "definition"),
    (("policyId",), "things:policyId", "policy ID"),
)


def _matches(pattern: tuple[str, ...], parts: list[str]) -> bool:
    if pattern[-1] == "**":
        fixed = pattern[:-1]
        if len(parts) < len(fixed):
            return False
    else:
        fixed = pattern
        if len(parts) != len(fixed):
            return False
    return all(p in ("*", part) for p, part in zip(fixed, parts, strict=False))


def _resource(parts: list[str]) -> tuple[str, str]:
    """(error code stem, noun) of the resource at ``parts`` of a thing."""
    if not parts:
        return "things:thing", "Thing"
    return next(((code, noun) for pattern, code, noun in _RESOURCES if _matches(pattern, parts)), ("", ""))


def not_found(thing_id: str, parts: list[str]) -> NotFoundError:
    """The Ditto "not found" error for a missing (or unreadable) resource of a thing.

    >>> not_found("a:b", ["features", "f", "properties", "x"]).instance_error
    'things:feature.property.notfound'
    >>> not_found("a:b", []).instance_error
    'things:thing.notfound'
    """
    code, noun = _resource(parts)
    if not parts:
        return NotFoundError(
            f"The Thing with ID '{thing_id}' could not be found or requester had "
            "insufficient permissions to access it."
        )
    if not code:
        return NotFoundError(f"'/{'/'.join(parts)}' of the Thing '{thing_id}' does not exist.")
    return NotFoundError(
        f"The {noun} at '/{'/'.join(parts)}' of the Thing with ID '{thing_id}' does not exist or "
        "the requester had insufficient permissions to access it.",
        error=code + ".notfound",
        description=f"Check if the {noun} path and the Thing ID were correct.",
    )


def not_modifiable(thing_id: str, parts: list[str]) -> ForbiddenError:
    """Ditto's 403 for a resource of a thing that the requester may read but not write.

    >>> not_modifiable("a:b", ["attributes", "x"]).instance_error
    'things:attribute.notmodifiable'
    >>> not_modifiable("a:b", []).instance_error
    'things:thing.notmodifiable'
    """
    code, noun = _resource(parts)
    where = f"The {noun} at '/{'/'.join(parts)}' of the Thing" if parts else "The Thing"
    return ForbiddenError(
        f"{where} with ID '{thing_id}' could not be modified as the requester had insufficient "
        "permissions ('WRITE' is required).",
        error=(code or "things:thing") + ".notmodifiable",
    )


def policy_not_found(policy_id: str) -> NotFoundError:
    """Ditto's 404 for a policy that does not exist or that the requester may not read."""
    return NotFoundError(
        f"The Policy with ID '{policy_id}' could not be found or requester had insufficient "
        "permissions to access it.",
        error="policies:policy.notfound",
        description="Check if the ID of the Policy was correct and you have sufficient permissions.",
    )


def history_not_found(
    thing_id: str, *, revision: int | None = None, timestamp: str | None = None
) -> NotFoundError:
    """Ditto's 404 for a thing's state at a revision or timestamp outside its history.

    >>> history_not_found("a:b", revision=7).instance_error
    'things:thing.history.notfound'
    """
    at = f"revision '{revision}'" if revision is not None else f"timestamp '{timestamp}'"
    return NotFoundError(
        f"The Thing with ID '{thing_id}' at {at} could not be found or requester had insufficient "
        "permissions to access it.",
        error="things:thing.history.notfound",
        description="Check if the ID of your requested Thing was correct, you have sufficient permissions "
        "and ensure that the asked for revision/timestamp does not exceed the history-retention-duration.",
    )
