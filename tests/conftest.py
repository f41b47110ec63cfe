"""Shared fixtures: real PostgreSQL and NATS (the machine's, or embedded ones), never mocks.

With ``TWINSTORE_TEST_DATABASE_URL`` and ``TWINSTORE_TEST_NATS_URL`` set the tests use those
servers; otherwise they start the embedded servers once per session. Each session gets its own
database and its own NATS subject prefix / stream, so runs never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import bcrypt
import httpx
import msgspec
import nats
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import settings as hypothesis_settings
from litestar import Litestar

from twinstore.api.app import create_app
from twinstore.bus.streams import delete_streams
from twinstore.runtime import Runtime
from twinstore.settings import Settings, load_settings
from twinstore.store.codec import GENESIS, chain_hash

# Hypothesis' 200 ms deadline per example measures the machine's load rather than the code (a
# loaded 2-core run failed a merge-patch property on it); pytest-timeout bounds every test.
hypothesis_settings.register_profile("twinstore", deadline=None)
hypothesis_settings.load_profile("twinstore")

ROOT = Path(__file__).resolve().parent.parent
AUTH = ("ditto", "ditto")
# Ingest sources of the test settings: "plc" writes as integration:plc, "ditto-user" as the
# basic user the API tests use (nginx:ditto), so ingested writes need no extra policy.
INGEST_SOURCES = {"plc": ["integration:plc"], "ditto-user": ["nginx:ditto"]}


# ---- collection ---------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Schemathesis names an operation's item ``test[GET /api/2/things]``, but pytest 9.2 builds a
    node id from the item's original name and parametrization only, so every operation of a test
    had the bare test name as its id. Each gets its operation back: reports and durations name it,
    and pytest-xdist's per-file scheduling, which keys items by node id, runs all 67 operations
    (with duplicate ids it ran the first of each test only)."""
    for item in items:
        label = getattr(item, "operation_label", None)
        node_id = getattr(item, "_id", None)
        if isinstance(label, str) and not item.nodeid.endswith("]") and hasattr(node_id, "with_params"):
            item._id = node_id.with_params(label)


# ---- environment, waiting, teardown -----------------------------------------------------


def require(condition: object, reason: str) -> None:
    """Skip the calling test (or module) unless ``condition`` holds - except in CI (``CI`` set),
    where a missing tool, data set, spec or service fails it: a green CI run ran every test.
    Every skip that depends on the machine goes through here."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: nothing may be skipped for want of it)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def twinstore_on(
    database_url: str, *args: str, timeout: float = 120, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """``twinstore <args>`` as a process against ``database_url`` (output captured); ``env``: more
    variables for it, None removing one the test's own environment has."""
    environ = {**os.environ, "TWINSTORE_DATABASE_URL": database_url}
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run(
        [sys.executable, "-m", "twinstore.cli", *args],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


Check = Callable[[], "bool | Awaitable[bool]"]


async def eventually(check: Check, timeout: float, what: str, interval: float = 0.05) -> None:
    """Wait until ``check()`` (sync or async) is true; fail after ``timeout`` s naming ``what``.
    The tests wait on conditions, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:g} s: {what}")
        await asyncio.sleep(interval)


def eventually_sync(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """:func:`eventually` for tests without an event loop."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in {timeout:g} s: {what}")
        time.sleep(interval)


def _stacks(tasks: set[asyncio.Task[Any]]) -> str:
    lines = []
    for task in tasks:
        frames = task.get_stack()
        where = " <- ".join(f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}" for f in frames[-3:])
        lines.append(f"{task.get_name()} at {where or '?'}")
    return "; ".join(lines)


async def cancel_and_wait(*tasks: asyncio.Task[Any], timeout: float = 15.0) -> None:
    """Cancel ``tasks`` and wait for them at most ``timeout`` s. A task that ignores its
    cancellation fails the teardown (naming where it hangs) instead of hanging the run; an
    exception a task ended with is raised, as ``await task`` would."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        raise AssertionError(f"not ended {timeout:g} s after cancel(): {_stacks(pending)}")
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise exc


async def bounded(aw: Awaitable[Any], timeout: float, what: str) -> Any:
    """``await aw`` for at most ``timeout`` s (run as a task of its own, so even an awaitable that
    swallows cancellation cannot hold the test): a teardown step that hangs fails, naming ``what``."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        raise AssertionError(f"{what}: not done in {timeout:g} s ({_stacks({task})})")
    return task.result()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> int:
    """SIGTERM, at most ``timeout`` s for the exit, then SIGKILL (and at most 10 s more)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def kill_process(proc: subprocess.Popen[Any]) -> int:
    """SIGKILL and reap (bounded: a process stuck in the kernel fails the test instead)."""
    if proc.poll() is None:
        proc.kill()
    return proc.wait(10)


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database (keeps host, socket and query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(admin database URL, NATS URL) of real servers."""
    db = os.environ.get("TWINSTORE_TEST_DATABASE_URL")
    bus = os.environ.get("TWINSTORE_TEST_NATS_URL")
    if db and bus:
        yield db, bus
        return
    from twinstore.embedded import EmbeddedServers

    tmp = Path(tempfile.mkdtemp(prefix="twinstore-test-"))
    embedded = EmbeddedServers(tmp)
    try:
        embedded_db, embedded_bus = embedded.start()
        yield db or embedded_db, bus or embedded_bus
    finally:
        embedded.stop()
        # 46-107 MB of PostgreSQL cluster and JetStream store: not left in the temp folder.
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def server_logs() -> Iterator[Path]:
    """The directory of the ServerProcess log files, removed at the end of the session."""
    path = Path(tempfile.mkdtemp(prefix="twinstore-server-logs-"))
    ServerProcess.log_dir = path
    try:
        yield path
    finally:
        ServerProcess.log_dir = None
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users.htpasswd"
    lines = [
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}"
        for user, pw in {"ditto": "ditto", "other": "secret", "eve": "eve-secret"}.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def signing_key() -> rsa.RSAPrivateKey:
    """The RSA key of the test JWT issuers (its public half goes into their JWKS)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def wrong_key() -> rsa.RSAPrivateKey:
    """An RSA key no issuer knows: tokens signed with it must be refused."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def drop_database(admin_url: str, url: str) -> None:
    """Drop a database made by :func:`fresh_database` (connections still open are ended)."""
    name = urlsplit(url).path.lstrip("/")

    async def drop() -> None:
        con = await asyncpg.connect(admin_url)
        try:
            await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await con.close()

    asyncio.run(drop())


def fresh_database(admin_url: str) -> str:
    """Create an empty database for this session and return its URL."""
    name = f"twinstore_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def create() -> None:
        con = await asyncpg.connect(admin_url)
        try:
            await con.execute(f'CREATE DATABASE "{name}"')
        finally:
            await con.close()

    asyncio.run(create())
    return with_database(admin_url, name)


@pytest.fixture(scope="session")
def settings(servers: tuple[str, str], users_file: Path) -> Iterator[Settings]:
    admin_url, nats_url = servers
    database_url = fresh_database(admin_url)
    yield load_settings(
        {},
        database_url=database_url,
        nats_url=nats_url,
        users_file=str(users_file),
        nats_prefix=f"t{secrets.token_hex(4)}",
        snapshot_every=10,
        relay_poll_interval=0.05,
        max_body_bytes=262_144,
        # wrong-credential tests of the in-process app need no second-long answers (the real
        # servers of tests/security keep the default delay)
        auth_failure_delay_seconds=0.01,
        # NATS ingestion (tests/test_ingest.py): a configured source and a default for others
        ingest_sources=INGEST_SOURCES,
        # the session database's partition count (ingest, journal, relay, events, anomaly): few,
        # so that the few things of a test share partitions and the workers stay light
        partitions=4,
    )
    drop_database(admin_url, database_url)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(settings)
    await rt.open()
    try:
        yield rt
    finally:
        try:
            await bounded(rt.close(), 60, "closing the session's runtime")
        finally:
            nc = await nats.connect(settings.nats_url)
            with contextlib.suppress(Exception):
                await bounded(delete_streams(nc.jetstream(), settings.nats_prefix), 30, "deleting streams")
            await bounded(nc.close(), 10, "closing NATS")


@pytest.fixture(scope="session")
def app(settings: Settings, runtime: Runtime) -> Litestar:
    """The in-process API on the session's runtime, built once: building it (route registration,
    a signature model per handler) takes 0.1-0.2 s, which every test's client paid before. It holds
    no state of its own (the runtime has the auth limits, caches and metrics), so tests share it."""
    return create_app(settings, runtime)


@pytest_asyncio.fixture(loop_scope="session")
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://twinstore", auth=AUTH) as c:
        yield c


def new_thing_id(prefix: str = "org.test") -> str:
    return f"{prefix}:{secrets.token_hex(6)}"


@pytest.fixture
def thing_id() -> str:
    return new_thing_id()


@pytest_asyncio.fixture(loop_scope="session")
async def ingest_reports(runtime: Runtime) -> AsyncIterator[list[dict[str, Any]]]:
    """NATS ingestion's refusal reports published on the errors subject from now on."""
    assert runtime.nc is not None
    got: list[dict[str, Any]] = []

    async def on(msg: Any) -> None:
        got.append(orjson.loads(msg.data))

    sub = await runtime.nc.subscribe(runtime.ingest_subjects.errors_subject, cb=on)
    yield got
    await sub.unsubscribe()


# ---- journal checks ----------------------------------------------------------------------

SELECT_JOURNAL = """
SELECT entity, id, revision, ts, action, path, value::text AS value, originator, correlation_id, hash
FROM journal WHERE entity = 'thing' AND id = $1 ORDER BY revision
"""


def verify_chain(rows: list[asyncpg.Record]) -> bytes:
    """Revisions 1..n without a gap, each hash chained to the previous row's; returns the head."""
    assert [r["revision"] for r in rows] == list(range(1, len(rows) + 1))
    previous = GENESIS
    for r in rows:
        value = None if r["value"] is None else r["value"].encode()
        expected = chain_hash(
            previous,
            r["entity"],
            r["id"],
            r["revision"],
            r["ts"],
            r["action"],
            r["path"],
            value,
            r["originator"],
            r["correlation_id"],
        )
        assert bytes(r["hash"]) == expected, f"hash chain broken at revision {r['revision']}"
        previous = expected
    return previous


# ---- server processes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A real ``twinstore serve`` process on the test database and NATS."""

    # Where the log files go (the session's server_logs fixture); the system temp folder if unset.
    log_dir: Path | None = None

    def __init__(self, settings: Settings, port: int | None = None, **env: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TWINSTORE_DATABASE_URL": settings.database_url or "",
            "TWINSTORE_NATS_URL": settings.nats_url or "",
            "TWINSTORE_USERS_FILE": settings.users_file or "",
            "TWINSTORE_NATS_PREFIX": settings.nats_prefix,
            "TWINSTORE_RELAY_POLL_INTERVAL": "0.05",
            "TWINSTORE_SNAPSHOT_EVERY": str(settings.snapshot_every),
            "TWINSTORE_INGEST_SOURCES": json.dumps(settings.ingest_sources),
            "TWINSTORE_PARTITIONS": str(settings.partitions),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        fd, self.log_path = tempfile.mkstemp(prefix="twinstore-server-", suffix=".log", dir=self.log_dir)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twinstore.cli", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log_path).read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not become healthy: {Path(self.log_path).read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            kill_process(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def logs(self) -> str:
        return Path(self.log_path).read_text()


@pytest.fixture(scope="module")
def live_server(settings: Settings, runtime: Runtime) -> Iterator[ServerProcess]:
    """One real ``twinstore serve`` process per test module, on the session's database and NATS
    (uvicorn's own handling of headers, proxies and slow clients applies)."""
    proc = ServerProcess(settings).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def server_process(settings: Settings, runtime: Runtime) -> Iterator[Any]:
    """Factory of server processes, all stopped at the end of the test."""
    started: list[ServerProcess] = []

    def make(**env: str) -> ServerProcess:
        proc = ServerProcess(settings, **env)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def own_settings(servers: tuple[str, str], settings: Settings) -> AsyncIterator[Settings]:
    """A database and NATS prefix used only by this test's server processes (its streams and
    database are removed afterwards)."""
    database_url = await asyncio.to_thread(fresh_database, servers[0])
    own = msgspec.structs.replace(settings, database_url=database_url, nats_prefix=f"c{secrets.token_hex(4)}")
    yield own
    nc = await nats.connect(own.nats_url)
    with contextlib.suppress(Exception):
        await delete_streams(nc.jetstream(), own.nats_prefix)
    await nc.close()
    con = await asyncpg.connect(servers[0])
    try:
        name = urlsplit(database_url).path.lstrip("/")  # (an embedded URL has a path in its query)
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


@pytest.fixture
def scratch_database(servers: tuple[str, str]) -> Iterator[str]:
    """An extra empty database for one test, dropped afterwards."""
    url = fresh_database(servers[0])
    yield url
    drop_database(servers[0], url)
