"""HTTP basic authentication against an htpasswd file with bcrypt hashes (subject ``nginx:<user>``).

bcrypt is slow on purpose (~50-250 ms); paying it on every request would cap the API at a
few requests per second. A successful check is remembered as an HMAC of the credentials
under a random per-process key, so the cache holds no password and no reusable hash, and it
is dropped when the users file changes (mtime/size/inode) or after ``ttl`` seconds.

What an attacker guessing passwords meets:

* every check runs in a thread (bcrypt releases the GIL), at most ``concurrency`` at once; when
  16 x that many wait, one more is refused with 429 at once, so a flood cannot queue without end;
* an unknown user is checked against a dummy hash of the same cost as the file's, so a known
  and an unknown user take the same time to refuse (no user enumeration by timing);
* failed checks are counted per client address and per user name (token buckets refilled over
  ``window`` seconds); past the limit the answer is 429 ``too.many.requests`` with Retry-After,
  before any bcrypt. Credentials that verified in the last :data:`KNOWN_GOOD_SECONDS` are never
  refused by the limits (they are checked again with bcrypt once out of the success cache, whose
  ``ttl`` runs from the last use), so a flood of wrong passwords, even for the same user name or
  from the same address, does not lock out a client that logged in before;
* a password over 72 bytes (bcrypt's limit, on which bcrypt 5 raises) is a failed check.

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
import re
import secrets
import time
from collections import OrderedDict
from pathlib import Path

import bcrypt

from twinstore.model.errors import AuthenticationError, TooManyRequestsError

__all__ = ["BasicAuth", "FailureLimit", "default_dev_users", "write_users_file"]

log = logging.getLogger("twinstore.auth")


def write_users_file(path: Path, users: dict[str, str]) -> None:
    """Write an htpasswd file with bcrypt hashes (``$2b$``, cost 10)."""
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(10)).decode()}" for user, pw in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


MAX_PASSWORD_BYTES = 72  # bcrypt uses no more; bcrypt 5 raises on longer ones
KNOWN_GOOD_SECONDS = 24 * 3600.0
_COST = re.compile(rb"^\$2[abxy]?\$(\d\d)\$")
_WRONG = "The username or password is not correct."


class FailureLimit:
    """Token buckets by key: ``limit`` failures, refilled evenly over ``window`` seconds; at
    most ``max_keys`` buckets (the least recently used go first; a dropped bucket was full or
    belonged to an idle key).

    >>> limit = FailureLimit(2, 60.0)
    >>> limit.take("k", 0.0), limit.take("k", 0.0), limit.take("k", 0.0)
    (None, None, 30.0)
    >>> limit.take("k", 30.0) is None
    True
    """

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.rate = limit / window  # tokens per second
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.limit), now))
        return min(float(self.limit), tokens + (now - at) * self.rate)

    def take(self, key: str, now: float) -> float | None:
        """Take a token: None, or the seconds until one is there (nothing taken)."""
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return None

    def give(self, key: str, now: float) -> None:
        """Give a token back (the check it was taken for did not fail)."""
        if key in self._buckets:
            self._buckets[key] = (min(float(self.limit), self._tokens(key, now) + 1.0), now)


class BasicAuth:
    """Verifies ``Authorization: Basic`` headers; ``users_file`` None refuses everyone."""

    def __init__(
        self,
        users_file: str | Path | None,
        *,
        ttl: float = 60.0,
        max_cache: int = 10_000,
        failures_per_client: int = 30,
        failures_per_user: int = 10,
        window: float = 60.0,
        concurrency: int = 2,
        failure_delay: float = 1.0,
    ) -> None:
        self.users_file = Path(users_file) if users_file else None
        self.ttl = ttl
        self.max_cache = max_cache
        self._key = secrets.token_bytes(32)
        self._users: dict[str, bytes] = {}
        self._prints: dict[str, bytes] = {}  # user -> fingerprint of its password entry
        self._stamp: tuple[int, int, int] | None = None
        self._verified: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._known: OrderedDict[bytes, float] = OrderedDict()  # digest -> verified until
        self._cost = 10
        self._dummy: dict[int, bytes] = {}
        self.per_client = FailureLimit(failures_per_client, window)
        self.per_user = FailureLimit(failures_per_user, window)
        self._checks = asyncio.Semaphore(concurrency)
        self.failure_delay = failure_delay
        self._max_waiting = 16 * concurrency
        self._waiting = 0
        # One check per credentials at a time: requests that bring the same credentials while
        # they are being checked wait for that check (a client's first burst must not take a
        # failure token per request, nor run bcrypt per request).
        self._inflight: dict[bytes, asyncio.Future[str]] = {}

    def _reload(self) -> None:
        assert self.users_file is not None
        try:
            stat = self.users_file.stat()
        except OSError:
            self._users, self._stamp, self._prints = {}, None, {}
            self._verified.clear()
            self._known.clear()
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
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
        costs = [int(m.group(1)) for h in users.values() if (m := _COST.match(h))]
        self._cost = min(max(costs, default=10), 31)
        self._users, self._stamp = users, stamp
        self._prints = {user: hashlib.sha256(hashed).digest()[:16] for user, hashed in users.items()}
        self._verified.clear()
        self._known.clear()
        log.info("loaded users file", extra={"users": len(users), "path": str(self.users_file)})

    def fingerprint(self, user: str, *, reload: bool = True) -> bytes | None:
        """What identifies ``user``'s current password entry (None: no such user now); the users
        file is re-read when it changed (``reload=False``: it was just now, by an authentication).
        Sessions compare it with the one they started with."""
        if self.users_file is None:
            return None
        if reload:
            self._reload()
        return self._prints.get(user)

    def _check(self, password: bytes, hashed: bytes | None) -> bool:
        """bcrypt (in a worker thread); an unknown user costs the same as a known one."""
        if hashed is None:
            cost = self._cost
            dummy = self._dummy.get(cost)
            if dummy is None:
                dummy = self._dummy[cost] = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
            bcrypt.checkpw(password, dummy)
            return False
        try:
            return bcrypt.checkpw(password, hashed)
        except ValueError:  # not a bcrypt hash in the users file
            log.error("users file entry is not a bcrypt hash", extra={"path": str(self.users_file)})
            return False

    async def authenticate(self, authorization: str | None, client: str | None = None) -> str:
        """The subject of valid credentials, else :class:`AuthenticationError` (401), or
        :class:`TooManyRequestsError` (429) past the failure limits."""
        return (await self.authenticate_user(authorization, client))[0]

    async def authenticate_user(
        self, authorization: str | None, client: str | None = None
    ) -> tuple[str, str]:
        """(subject, user name) of valid credentials (see :meth:`authenticate`).

        Every refusal of presented credentials comes ``failure_delay`` seconds late: a guesser
        that waits for its answers is slowed to one guess a second per connection while the
        server only keeps a sleeping task, and a refusal takes as long whatever its reason.
        """
        try:
            return await self._authenticate_user(authorization, client)
        except (AuthenticationError, TooManyRequestsError):
            if authorization and self.users_file is not None and self.failure_delay > 0:
                await asyncio.sleep(self.failure_delay)
            raise

    async def _authenticate_user(self, authorization: str | None, client: str | None) -> tuple[str, str]:
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
            self._verified[digest] = (cached[0], now + self.ttl)  # in use: kept
            self._verified.move_to_end(digest)
            return cached[0], cached[0].removeprefix("nginx:")
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationError("The Basic credentials are not valid base64 'user:password'.") from None
        if not sep:
            raise AuthenticationError(_WRONG)
        flight = self._inflight.get(digest)
        if flight is None:
            flight = asyncio.ensure_future(self._verify(digest, user, password, client or "-", now))
            self._inflight[digest] = flight
            flight.add_done_callback(lambda f: self._landed(digest, f))
        return await asyncio.shield(flight), user

    def _landed(self, digest: bytes, flight: asyncio.Future[str]) -> None:
        self._inflight.pop(digest, None)
        if not flight.cancelled():
            flight.exception()  # retrieved: every waiter may have gone meanwhile

    async def _verify(self, digest: bytes, user: str, password: str, client_key: str, now: float) -> str:
        """The subject of ``user``:``password`` after the limits and a bcrypt check (remembered)."""
        known = self._known.get(digest, 0.0) > now
        if not known:
            self._limit(client_key, user, now)
        secret = password.encode()
        if len(secret) > MAX_PASSWORD_BYTES:
            raise AuthenticationError(_WRONG)
        if self._waiting >= self._max_waiting:
            if not known:
                self._give(client_key, user)
            raise TooManyRequestsError(
                "Too many password checks are waiting; retry in a second.", retry_after=1.0
            )
        self._waiting += 1
        try:
            await self._checks.acquire()
        finally:
            self._waiting -= 1
        # The slot is held until the thread ends, even when the request is cancelled meanwhile.
        check = asyncio.ensure_future(asyncio.to_thread(self._check, secret, self._users.get(user)))
        check.add_done_callback(lambda _: self._checks.release())
        ok = await asyncio.shield(check)
        if not ok:
            raise AuthenticationError(_WRONG)
        if not known:
            self._give(client_key, user)
        subject = f"nginx:{user}"
        now = time.monotonic()
        self._verified[digest] = (subject, now + self.ttl)
        self._known[digest] = now + KNOWN_GOOD_SECONDS
        self._known.move_to_end(digest)
        for cache in (self._verified, self._known):
            while len(cache) > self.max_cache:
                cache.popitem(last=False)  # the least recently used
        return subject

    def _limit(self, client: str, user: str, now: float) -> None:
        """Take a failure token for the client and for the user, or 429."""
        wait = self.per_client.take(client, now)
        if wait is None:
            wait = self.per_user.take("u:" + user, now)
            if wait is not None:
                self.per_client.give(client, now)
        if wait is not None:
            log.warning("too many failed logins", extra={"client": client})
            raise TooManyRequestsError(
                "Too many failed authentication attempts; retry later.",
                retry_after=max(1.0, wait),
                description="Wait for the number of seconds in the Retry-After header.",
            )

    def _give(self, client: str, user: str) -> None:
        now = time.monotonic()
        self.per_client.give(client, now)
        self.per_user.give("u:" + user, now)


def default_dev_users(data_dir: Path) -> Path:
    """Create ``<data_dir>/users.htpasswd`` with ``ditto``/``ditto`` (development mode only)."""
    path = data_dir / "users.htpasswd"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        write_users_file(path, {"ditto": "ditto"})
    return path
