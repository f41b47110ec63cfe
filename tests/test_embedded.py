"""The embedded PostgreSQL and NATS servers start, serve, stop and keep their data."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg
import nats
import pytest

from twinstore.embedded import EmbeddedServers

pytestmark = pytest.mark.embedded

T = TypeVar("T")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a private loop, leaving any loop pytest-asyncio keeps untouched."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.fixture
def servers(tmp_path: pathlib.Path) -> Iterator[EmbeddedServers]:
    embedded = EmbeddedServers(tmp_path / "data")
    yield embedded
    embedded.stop()


async def first_run(database_url: str, nats_url: str) -> None:
    con = await asyncpg.connect(database_url)
    try:
        assert await con.fetchval("SELECT 1") == 1
        assert await con.fetchval("SELECT current_database()") == "twinstore"
        await con.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        await con.execute("INSERT INTO kept VALUES (1, 'survives restart')")
    finally:
        await con.close()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="EMBEDDED", subjects=["embedded.>"])
        ack = await js.publish("embedded.one", b"hello", timeout=5)
        assert (ack.stream, ack.seq) == ("EMBEDDED", 1)
    finally:
        await nc.close()


async def second_run(database_url: str, nats_url: str) -> None:
    con = await asyncpg.connect(database_url)
    try:
        assert await con.fetchval("SELECT note FROM kept WHERE id = 1") == "survives restart"
    finally:
        await con.close()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("EMBEDDED")
        assert info.state.messages == 1
        msg = await js.get_msg("EMBEDDED", 1)
        assert msg.data == b"hello"
    finally:
        await nc.close()


def test_start_stop_restart_keeps_data(servers: EmbeddedServers) -> None:
    database_url, nats_url = servers.start()
    assert servers.start() == (database_url, nats_url)  # idempotent
    assert not nats_url.endswith(":4222")
    run(first_run(database_url, nats_url))

    servers.stop()
    servers.stop()  # safe twice
    with pytest.raises(OSError):
        run(asyncpg.connect(database_url, timeout=2))

    database_url, nats_url = servers.start()
    run(second_run(database_url, nats_url))


def test_relative_data_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    embedded = EmbeddedServers(pathlib.Path(".twinstore"))
    try:
        database_url, _ = embedded.start()
        assert str(tmp_path / ".twinstore" / "postgres") in database_url
        assert run(fetch_one(database_url)) == 1
    finally:
        embedded.stop()


async def fetch_one(database_url: str) -> int:
    con = await asyncpg.connect(database_url)
    try:
        return int(await con.fetchval("SELECT 1"))
    finally:
        await con.close()


def test_start_after_killed_process(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    script = (
        "import pathlib, sys, time\n"
        "from twinstore.embedded import EmbeddedServers\n"
        "print(*EmbeddedServers(pathlib.Path(sys.argv[1])).start(), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(data)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "child did not start the servers"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    old_nats_pid = int((data / "nats.pid").read_text())
    old_pg_pid = postmaster_pid(data)

    embedded = EmbeddedServers(data)
    try:
        with caplog.at_level(logging.INFO, logger="twinstore.embedded"):
            database_url, nats_url = embedded.start()
        assert "leftover embedded NATS" in caplog.text
        assert gone(old_nats_pid)
        assert postmaster_pid(data) == old_pg_pid  # the orphaned PostgreSQL is adopted
        assert int((data / "nats.pid").read_text()) != old_nats_pid
        assert run(fetch_one(database_url)) == 1
        run(ping_nats(nats_url))
    finally:
        embedded.stop()
    assert not (data / "postgres" / "postmaster.pid").exists()
    assert gone(old_pg_pid)


def test_postmaster_pid_naming_another_process(servers: EmbeddedServers, tmp_path: pathlib.Path) -> None:
    """After a reboot the pid in a leftover postmaster.pid may belong to anything."""
    servers.start()
    pid_file = tmp_path / "data" / "postgres" / "postmaster.pid"
    lines = pid_file.read_text().splitlines(keepends=True)
    servers.stop()
    pid_file.write_text("".join([f"{os.getpid()}\n", *lines[1:]]))
    database_url, _ = servers.start()
    assert run(fetch_one(database_url)) == 1


def postmaster_pid(data: pathlib.Path) -> int:
    return int((data / "postgres" / "postmaster.pid").read_text().split()[0])


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    cmdline = pathlib.Path(f"/proc/{pid}/cmdline")
    return cmdline.exists() and not cmdline.read_bytes()


async def ping_nats(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.flush(timeout=2)
    finally:
        await nc.close()
