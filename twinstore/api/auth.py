"""The one place an HTTP request is authenticated (every route calls :func:`authenticate`)."""

from __future__ import annotations

from typing import Any

from litestar import Request

from twinstore.auth import AuthContext

__all__ = ["authenticate"]


async def authenticate(request: Request[Any, Any, Any]) -> AuthContext:
    """The caller's subjects (401 ``gateway:authentication.failed`` when none can be established)."""
    client = request.client
    context: AuthContext = await request.app.state.runtime.auth.authenticate(
        request.headers, client.host if client is not None else None
    )
    return context
