"""Attacks on authentication and on the connections themselves, against real server processes
(uvicorn's own proxy-header handling, its protocol classes and the sockets matter here).

Issue 15: item 4 (pre-authentication through X-Forwarded-For), 10 (password guessing: 500 on
long passwords, user enumeration by timing, floods), 11 (JWT numeric claims that overflow),
12 (slowloris) and 14 (file-descriptor exhaustion, a JWKS endpoint that hangs), 13 (sessions
outliving their credentials).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.api.helpers import assert_error
from tests.conftest import ServerProcess, eventually
from twinstore.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

PRE = "x-ditto-pre-authenticated"
SECRET = "a-shared-secret-of-at-least-32-bytes!"
HMAC_ISS = "https://hmac.example"
URL_ISS = "https://hanging.example"
AUTH_FAILED = "gateway:authentication.failed"
# The failed-login delay of the servers whose tests count refusals (the limits, not the delay: that
# one has its own test with a delay of its own); at the default 1 s each refusal only made the test
# a second longer.
QUICK_FAILURES = "0.05"


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def users_file(path: Path, users: dict[str, str], cost: int = 4) -> Path:
    path.write_text(
        "".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(cost)).decode()}\n" for u, p in users.items())
    )
    return path


@pytest.fixture
def start(settings: Settings, runtime: Any) -> Iterator[Callable[..., ServerProcess]]:
    """Start a real server with extra TWINSTORE_* settings; stopped at the end of the test."""
    started: list[ServerProcess] = []

    def make(**env: str) -> ServerProcess:
        proc = ServerProcess(settings, **{f"TWINSTORE_{k.upper()}": v for k, v in env.items()})
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()


# -- item 4: X-Forwarded-For and pre-authentication ---------------------------------------------


async def test_forwarded_for_does_not_make_a_client_a_trusted_proxy(
    start: Callable[..., ServerProcess],
) -> None:
    server = start(
        preauth_enabled="true",
        preauth_trusted='["10.9.9.9/32"]',
        auth_failures_per_client="3",
        auth_failure_delay_seconds=QUICK_FAILURES,
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as c:
        r = await c.get("/api/2/whoami", headers={"x-forwarded-for": "10.9.9.9", PRE: "nginx:a"})
        assert_error(r, 401, AUTH_FAILED)
        r = await c.get("/api/2/whoami", headers={"forwarded": "for=10.9.9.9", PRE: "nginx:a"})
        assert_error(r, 401, AUTH_FAILED)
        # Without trusted proxies the header does not name the client for the failure limits either:
        # failures "from" different forwarded addresses share the peer's budget.
        for i in range(3):
            r = await c.get(
                "/api/2/whoami", headers={**basic(f"nobody{i}", "x"), "x-forwarded-for": f"192.0.2.{i}"}
            )
            assert_error(r, 401, AUTH_FAILED)
        r = await c.get("/api/2/whoami", headers={**basic("nobody9", "x"), "x-forwarded-for": "192.0.2.99"})
        assert_error(r, 429, "too.many.requests")


async def test_a_trusted_proxy_names_the_client_and_preauth_is_judged_on_the_peer(
    start: Callable[..., ServerProcess],
) -> None:
    server = start(
        preauth_enabled="true",
        preauth_trusted='["127.0.0.1/32"]',
        trusted_proxies='["127.0.0.1/32"]',
        auth_failures_per_client="3",
        auth_failure_delay_seconds=QUICK_FAILURES,
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as c:
        # The proxy (the peer, 127.0.0.1) is trusted for pre-auth, whatever client it forwards for.
        r = await c.get("/api/2/whoami", headers={PRE: "nginx:a", "x-forwarded-for": "198.51.100.7"})
        assert r.status_code == 200, r.text
        assert r.json()["defaultSubject"] == "nginx:a"
        # The client named by the trusted proxy has its own failure budget.
        for i in range(3):
            r = await c.get(
                "/api/2/whoami", headers={**basic(f"nobody{i}", "x"), "x-forwarded-for": "192.0.2.1"}
            )
            assert_error(r, 401, AUTH_FAILED)
        r = await c.get("/api/2/whoami", headers={**basic("nobody8", "x"), "x-forwarded-for": "192.0.2.1"})
        assert_error(r, 429, "too.many.requests")
        assert int(r.headers["retry-after"]) >= 1
        r = await c.get("/api/2/whoami", headers={**basic("nobody9", "x"), "x-forwarded-for": "192.0.2.2"})
        assert_error(r, 401, AUTH_FAILED)


# -- item 10: password guessing -----------------------------------------------------------------


async def test_password_over_72_bytes_is_401_not_500(
    live: dict[str, httpx.AsyncClient], live_server: ServerProcess
) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=15) as c:
        r = await c.get("/api/2/whoami", headers=basic("ditto", "p" * 100))
        assert_error(r, 401, AUTH_FAILED)
        r = await c.get("/api/2/whoami", headers=basic("ditto", "é" * 40))  # 80 bytes in UTF-8
        assert_error(r, 401, AUTH_FAILED)
    assert (await live["ditto"].get("/api/2/whoami")).status_code == 200


async def test_unknown_user_takes_as_long_to_refuse_as_a_known_one(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = users_file(tmp_path / "users", {"alice": "right"}, cost=10)
    server = start(
        users_file=str(path),
        auth_failures_per_client="1000",
        auth_failures_per_user="1000",
        auth_failure_delay_seconds="0",  # the bcrypt work itself is compared, not the delay
    )

    async def refuse(user: str) -> float:
        began = time.perf_counter()
        r = await c.get("/api/2/whoami", headers=basic(user, "wrong"))
        assert_error(r, 401, AUTH_FAILED)
        return time.perf_counter() - began

    async with httpx.AsyncClient(base_url=server.url, timeout=15) as c:
        await refuse("warm-up")  # the dummy hash is made once
        # Interleaved, so that a moment of load on a shared machine slows both alike.
        known_times, unknown_times = [], []
        for i in range(9):
            known_times.append(await refuse("alice"))
            unknown_times.append(await refuse(f"nobody{i}"))
        known, unknown = statistics.median(known_times), statistics.median(unknown_times)
    assert known > 0.02, known  # cost 10: tens of milliseconds
    assert unknown > 0.6 * known, (known, unknown)


async def test_failed_logins_are_limited_per_user_and_a_logged_in_client_is_not(
    start: Callable[..., ServerProcess],
) -> None:
    server = start(
        auth_failures_per_client="1000", auth_failures_per_user="3", auth_failure_delay_seconds=QUICK_FAILURES
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as c:
        assert (await c.get("/api/2/whoami", headers=basic("ditto", "ditto"))).status_code == 200
        for _ in range(3):
            assert_error(await c.get("/api/2/whoami", headers=basic("ditto", "guess")), 401, AUTH_FAILED)
        r = await c.get("/api/2/whoami", headers=basic("ditto", "guess"))
        assert_error(r, 429, "too.many.requests")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Credentials that verified before still work; other users are not locked.
        assert (await c.get("/api/2/whoami", headers=basic("ditto", "ditto"))).status_code == 200
        assert_error(await c.get("/api/2/whoami", headers=basic("other", "guess")), 401, AUTH_FAILED)
        assert (await c.get("/api/2/whoami", headers=basic("other", "secret"))).status_code == 200


async def test_a_flood_of_wrong_passwords_does_not_stop_logged_in_clients(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = users_file(tmp_path / "users", {"alice": "right", "bob": "builder"}, cost=10)
    server = start(users_file=str(path))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as good:
        assert (await good.get("/api/2/whoami", headers=basic("alice", "right"))).status_code == 200
        stop = asyncio.Event()
        statuses: dict[int, int] = {}

        async def attacker(n: int) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    r = await c.get("/api/2/whoami", headers=basic("bob", f"guess{n}"))
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        flood = [asyncio.create_task(attacker(n)) for n in range(32)]
        try:
            await eventually(lambda: statuses.get(429, 0) > 50, 30, "the flood is answered 429")
            latencies = []
            for _ in range(20):
                began = time.perf_counter()
                r = await good.get("/api/2/whoami", headers=basic("alice", "right"))
                latencies.append(time.perf_counter() - began)
                assert r.status_code == 200
        finally:
            stop.set()
            await asyncio.gather(*flood, return_exceptions=True)
    assert set(statuses) <= {401, 429}, statuses
    assert max(latencies) < 1.0, latencies  # was 17 s for a real login under 10 wrong passwords/s


async def test_a_first_burst_of_right_credentials_is_never_refused(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """200 requests at once with right credentials not checked before: one bcrypt check serves
    them all, none takes a failure token (each used to, and the 11th got 429)."""
    path = users_file(tmp_path / "users", {"alice": "right"}, cost=10)
    server = start(users_file=str(path))
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as c:
        answers = await asyncio.gather(
            *(c.get("/api/2/whoami", headers=basic("alice", "right")) for _ in range(200))
        )
    assert [r.status_code for r in answers] == [200] * 200, {r.status_code for r in answers}


async def test_a_failed_login_is_answered_late_so_a_guesser_is_slowed(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Every refusal of presented credentials waits auth_failure_delay_seconds: 16 connections
    guessing back to back make about 16 guesses a second, while a right password is answered
    at once."""
    path = users_file(tmp_path / "users", {"alice": "right"}, cost=4)
    server = start(users_file=str(path), auth_failure_delay_seconds="0.5", auth_failures_per_client="1000")
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as c:
        began = time.perf_counter()
        assert_error(await c.get("/api/2/whoami", headers=basic("alice", "wrong")), 401, AUTH_FAILED)
        assert time.perf_counter() - began >= 0.5
        began = time.perf_counter()
        assert (await c.get("/api/2/whoami", headers=basic("alice", "right"))).status_code == 200
        assert time.perf_counter() - began < 0.5
        guesses = 0

        async def guesser(n: int) -> None:
            nonlocal guesses
            deadline = time.perf_counter() + 2.0
            while time.perf_counter() < deadline:
                r = await c.get("/api/2/whoami", headers=basic("alice", f"guess{n}"))
                assert r.status_code in (401, 429), r.text
                guesses += 1

        await asyncio.gather(*(guesser(n) for n in range(16)))
    assert guesses <= 16 * 5, guesses  # at most 2 s / 0.5 s (+1) per connection


# -- item 11: JWT numeric claims ----------------------------------------------------------------


@pytest.mark.parametrize(
    "claim",
    [
        {"exp": 10**400},
        {"exp": float("inf")},
        {"nbf": 10**400},
        {"iat": 10**400},
        {"iat": float("inf")},
        {"exp": "tomorrow"},
        {"nbf": float("nan")},
    ],
    ids=["exp-huge", "exp-inf", "nbf-huge", "iat-huge", "iat-inf", "exp-string", "nbf-nan"],
)
async def test_jwt_with_an_overflowing_numeric_claim_is_401(
    jwt_server: ServerProcess, claim: dict[str, Any]
) -> None:
    now = int(time.time())
    body = {"iss": HMAC_ISS, "sub": "alice", "iat": now, "exp": now + 300, **claim}
    token = jwt.encode(body, SECRET, algorithm="HS256")
    async with httpx.AsyncClient(base_url=jwt_server.url, timeout=15) as c:
        r = await c.get("/api/2/whoami", headers={"authorization": f"Bearer {token}"})
        assert_error(r, 401, AUTH_FAILED)
        # the server is alive and still accepts a valid token after the bad one
        good = jwt.encode({"iss": HMAC_ISS, "sub": "alice", "exp": now + 300}, SECRET, algorithm="HS256")
        r = await c.get("/api/2/whoami", headers={"authorization": f"Bearer {good}"})
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def jwt_server(settings: Settings, runtime: Any) -> Iterator[ServerProcess]:
    """One server with an HMAC issuer for all the claim cases (each sends one token and gets its
    answer; nothing of one case carries into the next): a server start per case cost ~3 s."""
    issuers = [{"issuer": HMAC_ISS, "prefix": "shared", "secret": SECRET}]
    server = ServerProcess(settings, TWINSTORE_JWT_ISSUERS=json.dumps(issuers)).start()
    try:
        yield server
    finally:
        server.stop()


# -- item 14: a JWKS endpoint that accepts and never answers ------------------------------------


class Silent:
    """A TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/certs"

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


async def test_a_hanging_jwks_endpoint_does_not_hang_requests(start: Callable[..., ServerProcess]) -> None:
    silent = Silent()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        issuers = [{"issuer": URL_ISS, "prefix": "web", "jwks_url": silent.url}]
        server = start(jwt_issuers=json.dumps(issuers), jwks_fetch_timeout_seconds="1")
        now = int(time.time())
        token = jwt.encode({"iss": URL_ISS, "sub": "a", "exp": now + 300}, key, "RS256", headers={"kid": "k"})
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as c:
            began = time.monotonic()
            answers = await asyncio.gather(
                *[c.get("/api/2/whoami", headers={"authorization": f"Bearer {token}"}) for _ in range(20)]
            )
            took = time.monotonic() - began
            for r in answers:
                assert_error(r, 503, "gateway:authentication.provider.unavailable")
            assert took < 5, took  # one bounded fetch, not one 10 s fetch after another
            assert len(silent.accepted) == 1  # the concurrent requests shared one fetch
            began = time.monotonic()
            r = await c.get("/api/2/whoami", headers={"authorization": f"Bearer {token}"})
            assert_error(r, 503, "gateway:authentication.provider.unavailable")
            assert time.monotonic() - began < 0.5  # backing off: answered at once
            # Basic authentication is not held up by the issuer.
            assert (await c.get("/api/2/whoami", headers=basic("ditto", "ditto"))).status_code == 200
    finally:
        silent.close()


# -- item 12 and 14: slowloris, connection cap -------------------------------------------------


async def _half_sent(
    port: int, n: int, head: bytes
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if head:
            writer.write(head)
        conns.append((reader, writer))
    return conns


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sent until it closed the connection (fails after ``within`` s)."""
    return await asyncio.wait_for(reader.read(), within)


async def test_half_sent_requests_are_closed_and_others_served(start: Callable[..., ServerProcess]) -> None:
    server = start(header_read_timeout_seconds="1.5")
    began = time.monotonic()
    conns = await _half_sent(server.port, 300, b"GET /api/2/whoami HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    conns += await _half_sent(server.port, 50, b"")  # connects and sends nothing
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
            r = await c.get("/api/2/whoami", headers=basic("ditto", "ditto"))
            assert r.status_code == 200  # served while the half-sent ones wait
        answers = await asyncio.gather(*[_closed_by_server(reader, 10) for reader, _ in conns])
        took = time.monotonic() - began
        assert took < 8, took
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:20] for a in answers}
        assert b"gateway:request.timeout" in answers[0]
    finally:
        for _, writer in conns:
            writer.close()


async def test_a_keep_alive_connection_cannot_trickle_its_next_request(
    start: Callable[..., ServerProcess],
) -> None:
    server = start(header_read_timeout_seconds="1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        length = int(
            next(h for h in first.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
        )
        await reader.readexactly(length)
        for part in (b"GET", b" /he", b"alth"):  # now and then: each resets uvicorn's keep-alive timer
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.3)
        rest = await _closed_by_server(reader, 5)
        assert rest.startswith(b"HTTP/1.1 408")
    finally:
        writer.close()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_the_connection_cap_keeps_descriptors_bounded(start: Callable[..., ServerProcess]) -> None:
    server = start(max_connections="50", header_read_timeout_seconds="30")
    assert server.proc is not None
    before = _open_fds(server.proc.pid)
    conns = await _half_sent(server.port, 300, b"")
    try:
        refused = 0
        for reader, _ in conns:
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(), 0.02)
                refused += data.startswith(b"HTTP/1.1 503")
        # The 250 beyond the cap were answered 503 and closed; the server holds 50 of them.
        await eventually(lambda: _open_fds(server.proc.pid) <= before + 50 + 10, 10, "descriptors released")  # type: ignore[union-attr]
        assert refused >= 200, refused
    finally:
        for _, writer in conns:
            writer.close()
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
        await eventually(lambda: _ok(c), 10, "served again once the connections are gone")


async def _ok(c: httpx.AsyncClient) -> bool:
    try:
        return (await c.get("/api/2/whoami", headers=basic("ditto", "ditto"))).status_code == 200
    except httpx.HTTPError:
        return False


async def test_workers_have_the_same_guards(start: Callable[..., ServerProcess]) -> None:
    server = start(
        workers="2",
        header_read_timeout_seconds="1",
        preauth_enabled="true",
        preauth_trusted='["10.9.9.9/32"]',
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as c:
        r = await c.get("/api/2/whoami", headers={"x-forwarded-for": "10.9.9.9", PRE: "nginx:a"})
        assert_error(r, 401, AUTH_FAILED)
    conns = await _half_sent(server.port, 20, b"GET / HTTP/1.1\r\n")
    try:
        answers = await asyncio.gather(*[_closed_by_server(reader, 8) for reader, _ in conns])
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
    finally:
        for _, writer in conns:
            writer.close()


# -- item 13: sessions end with their credentials ------------------------------------------------


async def test_sessions_end_when_the_user_is_removed_or_the_token_expires(
    start: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = users_file(tmp_path / "users", {"temp": "pw", "stays": "pw2", "changer": "old"})
    lines = dict(line.split(":", 1) for line in path.read_text().splitlines())
    issuers = [{"issuer": HMAC_ISS, "prefix": "shared", "secret": SECRET}]
    server = start(users_file=str(path), credentials_recheck_seconds="0.3", jwt_issuers=json.dumps(issuers))
    ws_url = server.url.replace("http", "ws") + "/ws/2"
    token = jwt.encode({"iss": HMAC_ISS, "sub": "shortlived", "exp": int(time.time()) + 3}, SECRET, "HS256")

    async with (
        connect(ws_url, additional_headers=basic("temp", "pw")) as removed_ws,
        connect(ws_url, additional_headers=basic("stays", "pw2")) as staying_ws,
        connect(ws_url, additional_headers=basic("changer", "old")) as changed_ws,
        connect(ws_url, additional_headers={"authorization": f"Bearer {token}"}) as expiring_ws,
        httpx.AsyncClient(base_url=server.url, timeout=30) as c,
        c.stream(
            "GET", "/api/2/things", headers={**basic("temp", "pw"), "accept": "text/event-stream"}
        ) as sse,
    ):
        assert sse.status_code == 200
        for ws in (removed_ws, staying_ws, changed_ws, expiring_ws):
            await ws.send("START-SEND-EVENTS")
            assert await asyncio.wait_for(ws.recv(), 10) == "START-SEND-EVENTS:ACK"
        # The JWT's expiry ends its session at that time.
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(expiring_ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert "expired" in closed.value.rcvd.reason
        # Removing a user from the users file ends its sessions, WebSocket and SSE; so does a new
        # password. Users whose line did not change keep theirs.
        changed = bcrypt.hashpw(b"new", bcrypt.gensalt(4)).decode()
        path.write_text(f"stays:{lines['stays']}\nchanger:{changed}\n")
        for ws in (removed_ws, changed_ws):
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

        async def drained() -> None:
            async for _ in sse.aiter_bytes():
                pass

        await asyncio.wait_for(drained(), 10)  # the SSE stream ended
        # The other user's session goes on.
        await staying_ws.send(
            json.dumps({"topic": "_/_/things/twin/commands/retrieve", "path": "/", "headers": {}})
        )
        assert await asyncio.wait_for(staying_ws.recv(), 10)
