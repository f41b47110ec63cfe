"""Where an issuer's verification keys come from: a JWKS file, a JWKS URL, or a shared secret.

Every source answers ``await source.key(kid, alg)`` with something PyJWT verifies with: a
:class:`jwt.PyJWK` bound to the token's algorithm, or the HMAC secret. A key set is parsed
once and reloaded when the file changes, or (URL) after ``cache_seconds`` or when a token
names a key id that is not in the set (key rotation). The HTTP fetch runs in a thread so the
event loop never blocks, one fetch at a time, and an unknown ``kid`` forces at most one
refetch per ``min_refresh`` seconds, so random key ids cannot make us hammer the provider.

A provider that hangs does not hang requests: every request waiting for a fetch waits on the
one fetch in flight, for at most ``timeout`` seconds in all (``jwks_fetch_timeout_seconds``),
then answers 503 (no key set yet) or goes on with the key set it has; a failed or timed-out
fetch is not retried for ``min_refresh`` seconds, so requests meanwhile answer at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import jwt
from jwt.exceptions import InvalidKeyError, PyJWKClientError, PyJWKError

from twinstore.model.errors import AuthenticationError, UnavailableError

__all__ = ["FileKeys", "KeySource", "SecretKey", "UrlKeys", "key_source"]

log = logging.getLogger("twinstore.auth")

PROVIDER_UNAVAILABLE = "gateway:authentication.provider.unavailable"


class KeySource(Protocol):
    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK | str: ...


class SecretKey:
    """An HMAC shared secret (HS256/384/512)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK | str:
        return self.secret


class KeySet:
    """The signing keys of one JWKS document, by ``kid``.

    >>> ks = KeySet({"keys": [{"kty": "oct", "kid": "a", "k": "c2VjcmV0"}]}, "test")
    >>> sorted(ks.keys)
    ['a']
    """

    def __init__(self, document: Any, name: str) -> None:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError(f"the key set of {name} is not a JWKS document ({{'keys': [...]}})")
        self.name = name
        self.keys: dict[str | None, dict[str, Any]] = {}
        for jwk in document["keys"]:
            if isinstance(jwk, dict) and jwk.get("use", "sig") == "sig":
                kid = jwk.get("kid")
                self.keys[kid if isinstance(kid, str) else None] = jwk
        self._bound: dict[tuple[str | None, str], jwt.PyJWK] = {}

    def find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None:  # no kid in the token: only unambiguous with a single key
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    def bind(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key for ``kid`` bound to ``alg`` (401 when it is unknown or does not fit)."""
        cached = self._bound.get((kid, alg))
        if cached is not None:
            return cached
        jwk = self.find(kid)
        if jwk is None:
            if kid is None:
                raise AuthenticationError(
                    f"The JWT has no 'kid' header and {self.name} has {len(self.keys)} keys to choose from."
                )
            raise AuthenticationError(f"The JWT key id '{kid}' is not a known key of {self.name}.")
        declared = jwk.get("alg")
        if declared is not None and declared != alg:
            raise AuthenticationError(
                f"The JWT algorithm '{alg}' does not match the algorithm '{declared}' of key '{kid}'."
            )
        try:
            bound = jwt.PyJWK(jwk, algorithm=alg)
        except (PyJWKError, InvalidKeyError, ValueError, TypeError) as exc:
            raise AuthenticationError(
                f"The key '{kid}' of {self.name} cannot verify algorithm '{alg}' ({exc})."
            ) from None
        self._bound[(kid, alg)] = bound
        return bound


class FileKeys:
    """A JWKS JSON file, reloaded when its mtime or size changes."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path = Path(path)
        self.name = name
        self._stamp: tuple[float, int] | None = None
        self._set: KeySet | None = None

    def _load(self) -> KeySet:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime, stat.st_size)
            if self._set is None or stamp != self._stamp:
                self._set = KeySet(json.loads(self.path.read_text()), self.name)
                self._stamp = stamp
                log.info("loaded jwks file", extra={"path": str(self.path), "keys": len(self._set.keys)})
        except (OSError, ValueError) as exc:
            log.error("cannot read jwks file", extra={"path": str(self.path), "error": str(exc)})
            raise UnavailableError(
                f"The signing keys of {self.name} cannot be read.",
                error=PROVIDER_UNAVAILABLE,
                description="The server's key set file is missing or invalid; contact the operator.",
            ) from None
        return self._set

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK | str:
        return self._load().bind(kid, alg)


class UrlKeys:
    """A JWKS endpoint (``jwks_uri``), cached for ``cache_seconds``, refetched on unknown kid."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        cache_seconds: float = 300.0,
        min_refresh: float = 10.0,
        timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.cache_seconds = cache_seconds
        self.min_refresh = min_refresh
        self.timeout = timeout
        # PyJWKClient does the HTTP (urllib, timeout per socket operation); we keep the cache
        # and bound the whole fetch.
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=timeout)
        self._set: KeySet | None = None
        self._fetched = float("-inf")
        self._fetch: asyncio.Task[KeySet | None] | None = None  # the one fetch in flight

    async def _fetch_set(self) -> KeySet | None:
        try:
            document = await asyncio.wait_for(asyncio.to_thread(self._client.fetch_data), self.timeout)
            self._set = KeySet(document, self.name)
        except (PyJWKClientError, ValueError, TimeoutError, OSError) as exc:
            log.error(
                "cannot fetch jwks", extra={"issuer": self.name, "error": str(exc) or type(exc).__name__}
            )
        self._fetched = time.monotonic()  # also after a failure: keep the old set a while
        return self._set

    async def _refresh(self, *, unless_after: float) -> KeySet:
        fresh = self._set is not None and self._fetched > unless_after
        # Without a key set, a failed fetch is not retried for min_refresh s: 503 at once.
        backing_off = self._set is None and self._fetched > time.monotonic() - self.min_refresh
        if self._fetch is None and not fresh and not backing_off:
            self._fetch = asyncio.create_task(self._fetch_set())
            self._fetch.add_done_callback(self._fetched_one)
        keys = self._set
        if self._fetch is not None:
            # Shielded: a request that gives up (or is cancelled) does not cancel the others' fetch.
            with contextlib.suppress(TimeoutError):
                keys = await asyncio.wait_for(asyncio.shield(self._fetch), self.timeout + 0.5)
        if keys is None:
            raise UnavailableError(
                f"The signing keys of {self.name} cannot be fetched.",
                error=PROVIDER_UNAVAILABLE,
                description="The authentication provider is not available; retry later.",
            )
        return keys

    def _fetched_one(self, task: asyncio.Task[KeySet | None]) -> None:
        if self._fetch is task:
            self._fetch = None

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK | str:
        now = time.monotonic()
        keys = self._set
        if keys is None or now - self._fetched > self.cache_seconds:
            keys = await self._refresh(unless_after=now - self.cache_seconds)
        if keys.find(kid) is None and time.monotonic() - self._fetched > self.min_refresh:
            keys = await self._refresh(unless_after=now - self.min_refresh)
        return keys.bind(kid, alg)


def key_source(
    *,
    name: str,
    secret: str | None,
    jwks_file: str | None,
    jwks_url: str | None,
    cache_seconds: float,
    timeout: float = 5.0,
) -> KeySource:
    """The key source an issuer is configured with (exactly one is set; settings check it)."""
    if secret:
        return SecretKey(secret)
    if jwks_file:
        return FileKeys(jwks_file, name)
    assert jwks_url
    return UrlKeys(jwks_url, name, cache_seconds=cache_seconds, timeout=timeout)
