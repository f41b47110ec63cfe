"""The one place an HTTP request or WebSocket upgrade is authenticated (every route calls
:func:`authenticate`)."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection

from twinstore.auth import AuthContext
from twinstore.logs import set_field

__all__ = ["authenticate"]


async def authenticate(
    connection: ASGIConnection[Any, Any, Any, Any], *, authorization: str | None = None
) -> AuthContext:
    """The caller's subjects (401 ``gateway:authentication.failed`` when none can be established).

    ``authorization`` replaces the ``Authorization`` header (the WebSocket's ``?access_token=``
    and its ``JWT-TOKEN`` refresh, which browsers cannot send as a header).
    """
    client = connection.client
    headers: Any = connection.headers
    if authorization is not None:
        headers = {**{k.lower(): v for k, v in connection.headers.items()}, "authorization": authorization}
    context: AuthContext = await connection.app.state.runtime.auth.authenticate(
        headers, client.host if client is not None else None
    )
    set_field("subject", context.subject)  # on the request's log lines from now on
    return context
