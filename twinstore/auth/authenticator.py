"""Who made a request: pre-authenticated header, then Bearer JWT, then HTTP basic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from twinstore.auth.basic import BasicAuth
from twinstore.auth.bearer import JwtAuth
from twinstore.auth.preauth import PREAUTH_HEADER, PreAuth
from twinstore.model.errors import AuthenticationError
from twinstore.settings import Settings

__all__ = ["AuthContext", "Authenticator"]


class AuthContext(msgspec.Struct, frozen=True):
    """Who made a request: one or more subjects, the first is the default (the originator).

    >>> AuthContext(subjects=("nginx:ditto",)).subject
    'nginx:ditto'
    """

    subjects: tuple[str, ...]
    # When the credentials end, for sessions (WebSocket, SSE) that outlive the request: a JWT's
    # ``exp`` (seconds since the epoch), or the basic user and its password entry's fingerprint.
    expires: float | None = None
    user: str | None = None
    fingerprint: bytes | None = None

    @property
    def subject(self) -> str:
        return self.subjects[0]


class Authenticator:
    """Every way a request can authenticate, tried in order: pre-auth, Bearer, Basic.

    ``Authenticator(users_file)`` alone is basic authentication only; :meth:`from_settings`
    adds what the settings configure.
    """

    def __init__(
        self,
        users_file: str | Path | None,
        *,
        bearer: JwtAuth | None = None,
        preauth: PreAuth | None = None,
    ) -> None:
        self.basic = BasicAuth(users_file)
        self.bearer = bearer
        self.preauth = preauth or PreAuth()

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Basic (``users_file``), JWT (``jwt_issuers``) and pre-auth (``preauth_*``), with the
        limits of the settings."""
        s = settings
        auth = cls(
            s.users_file,
            bearer=(
                JwtAuth(s.jwt_issuers, fetch_timeout=s.jwks_fetch_timeout_seconds) if s.jwt_issuers else None
            ),
            preauth=PreAuth(enabled=s.preauth_enabled, trusted=s.preauth_trusted),
        )
        auth.basic = BasicAuth(
            s.users_file,
            ttl=s.auth_cache_seconds,
            max_cache=s.auth_cache_size,
            failures_per_client=s.auth_failures_per_client,
            failures_per_user=s.auth_failures_per_user,
            window=s.auth_failure_window_seconds,
            concurrency=s.auth_bcrypt_concurrency,
            failure_delay=s.auth_failure_delay_seconds,
        )
        return auth

    async def authenticate(
        self, headers: Mapping[str, str], client_host: str | None = None, client: str | None = None
    ) -> AuthContext:
        """The caller's subjects, else :class:`AuthenticationError` (401).

        ``client_host`` is the connection's peer (pre-authentication trusts only it);
        ``client`` the client's address for the failure limits (the peer when not given).
        """
        preauthenticated = self.preauth.subjects(headers.get(PREAUTH_HEADER), client_host)
        if preauthenticated is not None:
            return AuthContext(subjects=preauthenticated)
        authorization = headers.get("authorization")
        client = client or client_host
        if self.bearer is None:  # basic only: BasicAuth's own messages
            return await self._basic(authorization, client)
        if not authorization:
            raise AuthenticationError("The request is missing the 'Authorization' header.")
        scheme, _, credentials = authorization.strip().partition(" ")
        match scheme.lower():
            case "bearer":
                subjects, expires = await self.bearer.authenticate_token(credentials.strip())
                return AuthContext(subjects=subjects, expires=expires)
            case "basic" if self.basic.users_file is not None:
                return await self._basic(authorization, client)
            case "basic":
                raise AuthenticationError(
                    "Basic authentication is not enabled on this server; use a Bearer token."
                )
        raise AuthenticationError(
            f"The authorization scheme '{scheme}' is not supported; use Bearer or Basic."
        )

    async def _basic(self, authorization: str | None, client: str | None) -> AuthContext:
        subject, user = await self.basic.authenticate_user(authorization, client)
        return AuthContext(
            subjects=(subject,), user=user, fingerprint=self.basic.fingerprint(user, reload=False)
        )

    def ended(self, context: AuthContext, now: float | None = None) -> str | None:
        """Why ``context``'s credentials no longer hold (None: they still do): the JWT expired,
        or the basic user was removed or its password changed in the users file."""
        now = time.time() if now is None else now
        if context.expires is not None and now >= context.expires:
            return "the JWT expired"
        if context.user is not None and self.basic.fingerprint(context.user) != context.fingerprint:
            return "the user's credentials changed"
        return None

    async def until_ended(self, current: Callable[[], AuthContext], recheck: float) -> str:
        """Return (the reason) once the credentials of ``current()`` end: checked every
        ``recheck`` seconds, and at a JWT's expiry. ``current`` is read at each check, so a
        session whose token was refreshed is judged by its new token."""
        while True:
            context = current()
            reason = self.ended(context)
            if reason is not None:
                return reason
            wait = recheck
            if context.expires is not None:
                wait = min(wait, max(0.0, context.expires - time.time()) + 0.01)
            await asyncio.sleep(wait)
