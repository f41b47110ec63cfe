"""JWT bearer tokens from configured (OIDC-style) issuers, as Ditto's JWT authentication.

The unverified ``iss`` claim only *selects* an issuer configuration; the token is then
verified against that issuer alone: the header's ``alg`` must be one the issuer allows (so
``none`` and HS256-with-a-public-key never reach a key), the signature must verify with the
issuer's key for the ``kid``, and ``exp`` (required), ``nbf``, ``iat``, ``iss`` and (if
configured) ``aud`` are checked with the issuer's leeway. Every failure is a 401 whose
message names the check that failed. A verified token is remembered by its SHA-256 until
min(exp, now + ``cache_seconds``), so a client reusing its token pays no signature check.

Subjects come from templates: ``{{ jwt:sub }}``, ``{{ jwt:groups }}`` (an array claim gives
one subject per element), nested claims as ``{{ jwt:realm_access/roles }}``; each value is
prefixed with the issuer's ``prefix``.

>>> subjects_of({"sub": "u1", "groups": ["a", "b"]}, "idp", ["{{ jwt:sub }}", "{{ jwt:groups }}"])
('idp:u1', 'idp:a', 'idp:b')
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import jwt
from jwt import exceptions as jwt_errors

from twinstore.auth.keys import KeySource, key_source
from twinstore.model.errors import AuthenticationError
from twinstore.settings import JwtIssuer

__all__ = ["IssuerVerifier", "JwtAuth", "subjects_of"]

MAX_TOKEN_BYTES = 16_384
# NumericDate claims beyond the year 9999 (or not finite) are refused: PyJWT's int() of an
# infinite float, and our float() of a huge int, raise OverflowError, which is no 401.
MAX_NUMERIC_DATE = 253_402_300_799
NUMERIC_DATES = ("exp", "nbf", "iat")
_PLACEHOLDER = re.compile(r"\{\{\s*jwt:([^\s}|]+)\s*\}\}")


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("/"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _values(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(v) for v in items if isinstance(v, str | int | float) and not isinstance(v, bool) and str(v)]


def subjects_of(claims: dict[str, Any], prefix: str, templates: Sequence[str]) -> tuple[str, ...]:
    """``<prefix>:<value>`` for every value the templates give (missing claims give none)."""
    subjects: dict[str, None] = {}
    for template in templates:
        names = _PLACEHOLDER.findall(template)
        literals = _PLACEHOLDER.split(template)[::2]
        choices = [_values(_claim(claims, name)) for name in names]
        for combination in itertools.product(*choices):
            value = literals[0] + "".join(v + lit for v, lit in zip(combination, literals[1:], strict=True))
            if value.strip():
                subjects[f"{prefix}:{value}"] = None
    return tuple(subjects)


def _when(timestamp: Any) -> str:
    try:
        return datetime.fromtimestamp(float(timestamp), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        return repr(timestamp)


class IssuerVerifier:
    """Verifies tokens of one issuer and turns their claims into subjects."""

    def __init__(
        self, config: JwtIssuer, keys: KeySource | None = None, *, fetch_timeout: float = 5.0
    ) -> None:
        self.config = config
        self.algorithms = config.allowed_algorithms
        self.keys = keys or key_source(
            name=f"issuer '{config.issuer}'",
            secret=config.secret,
            jwks_file=config.jwks_file,
            jwks_url=config.jwks_url,
            cache_seconds=config.jwks_cache_seconds,
            timeout=fetch_timeout,
        )

    async def verify(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        """The verified claims (401 naming the failed check)."""
        c = self.config
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthenticationError(
                f"The JWT algorithm '{alg}' is not allowed for issuer '{c.issuer}' "
                f"(allowed: {', '.join(self.algorithms)})."
            )
        kid = header.get("kid")
        key = await self.keys.key(kid if isinstance(kid, str) else None, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=c.audience,
                issuer=c.issuer,
                leeway=c.leeway,
                options={"require": ["exp", "iss"], "verify_aud": c.audience is not None},
            )
        except jwt_errors.InvalidTokenError as exc:
            raise AuthenticationError(self._explain(exc, token)) from None
        except (OverflowError, ValueError, TypeError):  # a claim PyJWT cannot compare
            raise AuthenticationError("The JWT has a claim that is not valid.") from None
        return claims

    def _explain(self, exc: jwt_errors.InvalidTokenError, token: str) -> str:
        c = self.config
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt_errors.InvalidTokenError:
            claims = {}
        match exc:
            case jwt_errors.InvalidSignatureError():
                return f"The JWT signature is not valid for the key of issuer '{c.issuer}'."
            case jwt_errors.ExpiredSignatureError():
                return f"The JWT expired at {_when(claims.get('exp'))} (leeway {c.leeway:g} s)."
            case jwt_errors.ImmatureSignatureError():
                claim = "nbf" if "nbf" in str(exc) else "iat"
                return f"The JWT is not valid before {_when(claims.get(claim))} ('{claim}' claim)."
            case jwt_errors.MissingRequiredClaimError():
                return f"The JWT has no '{exc.claim}' claim."
            case jwt_errors.InvalidAudienceError():
                return f"The JWT audience {claims.get('aud')!r} does not contain '{c.audience}'."
            case jwt_errors.InvalidIssuerError():
                return f"The JWT issuer does not match '{c.issuer}'."
            case jwt_errors.InvalidAlgorithmError() | jwt_errors.InvalidKeyError():
                return f"The JWT cannot be verified with the key of issuer '{c.issuer}': {exc}."
        return f"The JWT is not valid: {exc}."

    async def authenticate(self, token: str, header: dict[str, Any]) -> tuple[tuple[str, ...], float]:
        """(subjects, exp) of a valid token."""
        claims = await self.verify(token, header)
        subjects = subjects_of(claims, self.config.prefix, self.config.subjects)
        if not subjects:
            raise AuthenticationError(
                f"The JWT of issuer '{self.config.issuer}' gives no subject: none of the claims in "
                f"{', '.join(self.config.subjects)} is present."
            )
        return subjects, float(claims["exp"])


class JwtAuth:
    """``Authorization: Bearer <jwt>`` against the configured issuers."""

    def __init__(
        self,
        issuers: Sequence[JwtIssuer],
        *,
        cache_seconds: float = 60.0,
        max_cache: int = 10_000,
        fetch_timeout: float = 5.0,
    ) -> None:
        self.issuers = {i.issuer: IssuerVerifier(i, fetch_timeout=fetch_timeout) for i in issuers}
        self.cache_seconds = cache_seconds
        self.max_cache = max_cache
        self._verified: dict[bytes, tuple[tuple[str, ...], float, float]] = {}

    async def authenticate(self, token: str) -> tuple[str, ...]:
        """The subjects of a valid token, else :class:`AuthenticationError` (401)."""
        return (await self.authenticate_token(token))[0]

    async def authenticate_token(self, token: str) -> tuple[tuple[str, ...], float]:
        """(subjects, exp) of a valid token, else :class:`AuthenticationError` (401)."""
        if not token:
            raise AuthenticationError("The Bearer authorization has no token.")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError(f"The JWT is longer than {MAX_TOKEN_BYTES} characters.")
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        cached = self._verified.get(digest)
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        verifier, header = self._select(token)
        subjects, exp = await verifier.authenticate(token, header)
        if len(self._verified) >= self.max_cache:
            self._verified = {k: v for k, v in self._verified.items() if v[2] > now}
            if len(self._verified) >= self.max_cache:
                self._verified.clear()
        self._verified[digest] = (subjects, exp, min(exp, now + self.cache_seconds))
        return subjects, exp

    def _select(self, token: str) -> tuple[IssuerVerifier, dict[str, Any]]:
        """The issuer named by the unverified ``iss`` claim, and the token's header."""
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt_errors.InvalidTokenError as exc:
            raise AuthenticationError(f"The Bearer token is not a well-formed JWT: {exc}.") from None
        if str(header.get("alg", "")).lower() == "none":
            raise AuthenticationError("The JWT is not signed (alg 'none'); unsigned tokens are refused.")
        for name in NUMERIC_DATES:
            value = claims.get(name)
            if value is None:
                continue
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not -MAX_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE  # False for NaN and infinities
            ):
                raise AuthenticationError(
                    f"The JWT claim '{name}' is not a NumericDate (seconds since 1970 up to the year 9999)."
                )
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise AuthenticationError("The JWT has no 'iss' claim, so its issuer cannot be trusted.")
        verifier = self.issuers.get(issuer)
        if verifier is None:
            raise AuthenticationError(f"The JWT issuer '{issuer}' is not a trusted issuer of this server.")
        return verifier, header
