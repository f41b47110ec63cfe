"""Ditto headers of an HTTP request; each may also be given as a query parameter (as Ditto)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request

from twinstore.logs import context_field
from twinstore.model.errors import HeaderInvalidError, InvalidInputError
from twinstore.model.etag import parse_etags
from twinstore.model.fields import parse_fields
from twinstore.model.rql import parse_condition

__all__ = ["DittoHeaders", "correlation_id", "parse_headers"]

AnyRequest = Request[Any, Any, Any]


class DittoHeaders(msgspec.Struct, kw_only=True):
    correlation_id: str
    response_required: bool = True
    if_match: list[str] | None = None
    if_none_match: list[str] | None = None
    fields: list[list[str]] | None = None
    allow_policy_lockout: bool = False
    condition: Any = None  # a parsed RQL node (twinstore.model.rql.Node)
    at_historical_revision: int | None = None
    at_historical_timestamp: datetime | None = None


def header(request: AnyRequest, name: str) -> str | None:
    """A Ditto header from the headers, else from the query string."""
    value = request.headers.get(name)
    if value is None:
        value = request.query_params.get(name)
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def correlation_id(request: AnyRequest) -> str | None:
    """The request's correlation id (header or query); control characters make it invalid."""
    value = header(request, "correlation-id")
    if value is not None and _CONTROL.search(value):
        raise HeaderInvalidError(
            f"The value {value!r} of the header 'correlation-id' must not contain control characters."
        )
    return value or None


def _bool(name: str, value: str | None, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise HeaderInvalidError(f"The value '{value}' of the header '{name}' is not a valid boolean.")


_REVISION = re.compile(r"[+-]?[0-9]{1,19}")


def parse_historical(request: AnyRequest) -> tuple[int | None, datetime | None]:
    """``at-historical-revision`` (an integer), ``at-historical-timestamp`` (ISO-8601; UTC if no offset)."""
    rev_text = header(request, "at-historical-revision")
    ts_text = header(request, "at-historical-timestamp")
    if rev_text is not None and ts_text is not None:
        raise HeaderInvalidError(
            "Only one of the headers 'at-historical-revision' and 'at-historical-timestamp' may be given."
        )
    revision = None
    if rev_text is not None:
        if not _REVISION.fullmatch(rev_text.strip()):
            raise HeaderInvalidError(
                f"The value '{rev_text}' of the header 'at-historical-revision' is not a valid long."
            )
        revision = int(rev_text.strip())
    ts = None
    if ts_text is not None:
        try:
            ts = datetime.fromisoformat(ts_text.strip())
        except ValueError:
            raise HeaderInvalidError(
                f"The value '{ts_text}' of the header 'at-historical-timestamp' is not a valid "
                "ISO-8601 timestamp (e.g. 2022-10-24T03:11:15Z)."
            ) from None
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
    return revision, ts


def parse_headers(request: AnyRequest) -> DittoHeaders:
    """Parse and validate the Ditto headers of ``request``."""
    fields_text = request.query_params.get("fields")
    if fields_text is not None and not fields_text.strip():
        raise InvalidInputError(
            "The 'fields' parameter must not be empty.", error="json.fieldselector.invalid"
        )
    at_revision, at_timestamp = parse_historical(request)
    return DittoHeaders(
        at_historical_revision=at_revision,
        at_historical_timestamp=at_timestamp,
        # A request without one gets the id its log lines carry (twinstore.api.access).
        correlation_id=correlation_id(request) or context_field("correlation_id") or str(uuid.uuid4()),
        response_required=_bool("response-required", header(request, "response-required"), True),
        if_match=parse_etags(header(request, "if-match")),
        if_none_match=parse_etags(header(request, "if-none-match")),
        fields=parse_fields(fields_text) if fields_text is not None else None,
        allow_policy_lockout=_bool("allow-policy-lockout", header(request, "allow-policy-lockout"), False),
        condition=parse_condition(header(request, "condition")),
    )
