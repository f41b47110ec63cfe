"""HTTP basic authentication against an htpasswd file with bcrypt hashes (subject ``nginx:<user>``).

bcrypt is slow on purpose (~50-250 ms); paying it on every request would cap the API at a
few requests per second. A successful check is remembered as an HMAC of the credentials
under a random per-process key, so the cache holds no password and no reusable hash, and it
is dropped when the users file changes (mtime/size) or after ``ttl`` seconds.

>>> import asyncio, bcrypt, tempfile
>>> f = tempfile.NamedTemporaryFile("w", suffix=".htpasswd", delete=False)
>>> _ = f.write("ditto:" + bcrypt.hashpw(b"ditto", bcrypt.gensalt(4)).decode() + "\\n"); f.close()
>>> asyncio.run(BasicAuth(f.name).authenticate("Basic ZGl0dG86ZGl0dG8="))
'nginx:ditto'
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path

import bcrypt

from twinstore.model.errors import AuthenticationError

__all__ = ["BasicAuth", "default_dev_users", "write_users_file"]

log = logging.getLogger("twinstore.auth")


def write_users_file(path: Path, users: dict[str, str]) -> None:
    """Write an htpasswd file with bcrypt hashes (``$2b$``, cost 10)."""
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(10)).decode()}" for user, pw in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


class BasicAuth:
    """Verifies ``Authorization: Basic`` headers; ``users_file`` None refuses everyone."""

    def __init__(self, users_file: str | Path | None, *, ttl: float = 300.0, max_cache: int = 10_000) -> None:
        self.users_file = Path(users_file) if users_file else None
        self.ttl = ttl
        self.max_cache = max_cache
        self._key = secrets.token_bytes(32)
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[float, int] | None = None
        self._verified: dict[bytes, tuple[str, float]] = {}

    def _reload(self) -> None:
        assert self.users_file is not None
        try:
            stat = self.users_file.stat()
        except OSError:
            self._users, self._stamp = {}, None
            self._verified.clear()
            return
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._stamp:
            return
        users: dict[str, bytes] = {}
        for line in self.users_file.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            user, _, hashed = line.partition(":")
            if hashed.startswith("$2y$"):  # Apache's name for the same algorithm
                hashed = "$2b$" + hashed[4:]
            users[user] = hashed.encode()
        self._users, self._stamp = users, stamp
        self._verified.clear()
        log.info("loaded users file", extra={"users": len(users), "path": str(self.users_file)})

    async def authenticate(self, authorization: str | None) -> str:
        """The subject of valid credentials, else :class:`AuthenticationError` (401)."""
        if self.users_file is None:
            raise AuthenticationError(
                "No users are configured on this server, so no request can be authenticated.",
                description="Set TWINSTORE_USERS_FILE to an htpasswd file with bcrypt hashes.",
            )
        if not authorization:
            raise AuthenticationError("The request is missing the 'Authorization' header.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise AuthenticationError(f"The authorization scheme '{scheme}' is not supported; use Basic.")
        self._reload()
        digest = hmac.new(self._key, token.strip().encode(), hashlib.sha256).digest()
        now = time.monotonic()
        cached = self._verified.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationError("The Basic credentials are not valid base64 'user:password'.") from None
        hashed = self._users.get(user)
        if (
            not sep
            or hashed is None
            or not await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
        ):
            raise AuthenticationError("The username or password is not correct.")
        subject = f"nginx:{user}"
        if len(self._verified) >= self.max_cache:
            self._verified.clear()
        self._verified[digest] = (subject, now + self.ttl)
        return subject


def default_dev_users(data_dir: Path) -> Path:
    """Create ``<data_dir>/users.htpasswd`` with ``ditto``/``ditto`` (development mode only)."""
    path = data_dir / "users.htpasswd"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        write_users_file(path, {"ditto": "ditto"})
    return path
