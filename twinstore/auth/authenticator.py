"""Who made a request: pre-authenticated header, then Bearer JWT, then HTTP basic."""

from __future__ import annotations

from collections.abc import Mapping
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
        """Basic (``users_file``), JWT (``jwt_issuers``) and pre-auth (``preauth_*``)."""
        return cls(
            settings.users_file,
            bearer=JwtAuth(settings.jwt_issuers) if settings.jwt_issuers else None,
            preauth=PreAuth(enabled=settings.preauth_enabled, trusted=settings.preauth_trusted),
        )

    async def authenticate(self, headers: Mapping[str, str], client_host: str | None = None) -> AuthContext:
        """The caller's subjects, else :class:`AuthenticationError` (401)."""
        preauthenticated = self.preauth.subjects(headers.get(PREAUTH_HEADER), client_host)
        if preauthenticated is not None:
            return AuthContext(subjects=preauthenticated)
        authorization = headers.get("authorization")
        if self.bearer is None:  # basic only: BasicAuth's own messages
            return AuthContext(subjects=(await self.basic.authenticate(authorization),))
        if not authorization:
            raise AuthenticationError("The request is missing the 'Authorization' header.")
        scheme, _, credentials = authorization.strip().partition(" ")
        match scheme.lower():
            case "bearer":
                return AuthContext(subjects=await self.bearer.authenticate(credentials.strip()))
            case "basic" if self.basic.users_file is not None:
                return AuthContext(subjects=(await self.basic.authenticate(authorization),))
            case "basic":
                raise AuthenticationError(
                    "Basic authentication is not enabled on this server; use a Bearer token."
                )
        raise AuthenticationError(
            f"The authorization scheme '{scheme}' is not supported; use Bearer or Basic."
        )
