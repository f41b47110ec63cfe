"""Ditto headers of an HTTP request; each may also be given as a query parameter (as Ditto)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import msgspec
import orjson
from litestar import Request
from litestar.types import ASGIApp, Receive, Scope, Send

from twinstore.logs import context_field
from twinstore.model.errors import HeaderInvalidError, HeadersTooLargeError, InvalidInputError
from twinstore.model.etag import parse_etags
from twinstore.model.fields import parse_fields
from twinstore.model.rql import parse_condition

__all__ = ["DittoHeaders", "HeaderLimit", "correlation_id", "header_value", "parse_headers"]

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
# Only Latin-1 can go back into a response header (the correlation-id is echoed); a header
# itself arrives as Latin-1, a query parameter may carry any character.
_NOT_LATIN1 = re.compile(r"[^\x00-\xff]")


def correlation_id(request: AnyRequest) -> str | None:
    """The request's correlation id (header or query); control characters make it invalid, and
    so do characters outside Latin-1 (it is echoed in a response header)."""
    value = header(request, "correlation-id")
    if value is not None and (_CONTROL.search(value) or _NOT_LATIN1.search(value)):
        raise HeaderInvalidError(
            "The value of the header 'correlation-id' must not contain control characters or "
            "characters outside ISO-8859-1."
        )
    return value or None


# Ditto headers a request may also give as query parameters (see :func:`header`): they count
# towards max_header_bytes like the headers themselves.
_QUERY_HEADERS = frozenset(
    {
        "correlation-id",
        "response-required",
        "if-match",
        "if-none-match",
        "allow-policy-lockout",
        "condition",
        "at-historical-revision",
        "at-historical-timestamp",
        "timeout",
    }
)


def headers_size(scope: Scope) -> tuple[int, int]:
    """Bytes of a request's headers (names and values) but ``authorization``, with its Ditto
    headers given as query parameters; and of ``authorization`` (its own budget)."""
    total = authorization = 0
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization += len(name) + len(value)
        else:
            total += len(name) + len(value)
    query: bytes = scope.get("query_string", b"")
    if query:
        for part in query.split(b"&"):
            name, _, value = part.partition(b"=")
            if name.decode("latin-1").lower() in _QUERY_HEADERS:
                total += len(name) + len(value)
    return total, authorization


class HeaderLimit:
    """ASGI wrapper: a request (or WebSocket upgrade) whose headers exceed ``max_bytes`` is
    answered 431 ``headers.too.large`` before any handler runs, so nothing of it is committed
    or echoed. uvicorn's httptools parser (used when installed) sets no limit of its own."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            total, authorization = headers_size(scope)
            if total > self.max_bytes or authorization > self.max_bytes:
                size = total if total > self.max_bytes else authorization
                await self._refuse(scope, receive, send, size)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        error = HeadersTooLargeError(
            f"The request's headers have {size} bytes; at most {self.max_bytes} bytes are allowed."
        )
        body = orjson.dumps(error.to_dict())
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        kind: str = scope["type"]
        if kind == "http":
            await send({"type": "http.response.start", "status": error.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        elif "websocket.http.response" in (scope.get("extensions") or {}):
            await receive()  # websocket.connect
            await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
        else:
            await receive()
            await send({"type": "websocket.close", "code": 1008, "reason": "headers too large"})


def header_value(url: str) -> str:
    """``url`` for a response header (``Location``): characters outside printable ASCII are
    percent-encoded as UTF-8 (as Ditto does), so an id or path of any script can be answered.

    >>> header_value("http://h/api/2/things/ns:caf\u00e9 \u20ac")
    'http://h/api/2/things/ns:caf%C3%A9%20%E2%82%AC'
    """
    return quote(url, safe="!#$%&'()*+,/:;=?@[]~")


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
