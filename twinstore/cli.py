"""The ``twinstore`` command line: ``serve``, ``ingest``, ``migrate``, ``audit verify|checkpoint|cleanup``,
``replay``, ``export``, ``import``, ``simulate``.

Run ``twinstore --help`` or ``twinstore serve --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import twinstore
from twinstore.embedded import DataDirError, DataDirInUse, EmbeddedError, EmbeddedServers
from twinstore.logs import LOG_FORMATS, configure_logging, resolve_format
from twinstore.settings import Settings, load_settings
from twinstore.shutdown import Shutdown

if TYPE_CHECKING:  # rich is imported by the commands that draw a progress bar
    from rich.progress import Progress

__all__ = ["main"]

log = logging.getLogger("twinstore")

# Exit statuses of a start that fails (README "Exit status"); 1 and 2 are each command's own.
EXIT_NOT_STARTED = 3  # the embedded servers, the database or the application did not start
EXIT_PORT = 4  # cannot listen on --host:--port (in use, no permission, unknown address)
EXIT_DATA_DIR = 5  # the data dir cannot be created or written (a file, no permission)
EXIT_IN_USE = 6  # another twinstore serves (or uses) the data dir
EXIT_INTERRUPTED = 130  # Ctrl-C before the server was up (128 + SIGINT)


class StartError(Exception):
    """A start that cannot go on: one line for the user and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# Development mode (embedded servers): the subject of ingest sources not in ingest_sources,
# unless ingest_default_subjects is set; `twinstore simulate`'s policies grant it.
DEV_INGEST_SUBJECT = "integration:dev-ingest"

DESCRIPTION = """\
twinstore: an event-sourced digital-twin service speaking Eclipse Ditto's HTTP API v2.

Configuration, lowest to highest precedence: built-in defaults, a TOML file (--config or
TWINSTORE_CONFIG; keys as in the settings list of the README), environment variables
TWINSTORE_<NAME> (e.g. TWINSTORE_DATABASE_URL, TWINSTORE_NATS_URL, TWINSTORE_USERS_FILE),
then command-line options.

Without TWINSTORE_DATABASE_URL and TWINSTORE_NATS_URL, `serve` starts an embedded
PostgreSQL and an embedded NATS (JetStream) under --data-dir and runs in development mode:
if no users file is configured it creates the user ditto/ditto and says so in its log.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="directory of the embedded servers' data and the dev users file (default ./.twinstore)",
    )
    parser.add_argument("--database-url", metavar="URL", help="PostgreSQL URL (default: embedded)")
    parser.add_argument("--nats-url", metavar="URL", help="NATS URL (default: embedded)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as text or JSON (default auto: text on a terminal, JSON otherwise; "
        "setting log_format)",
    )


def _scope(parser: argparse.ArgumentParser, verb: str) -> None:
    """Which journal entities a command works on (audit verify, replay, export: audit.Scope)."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--thing", metavar="ID", help=f"{verb} only this thing")
    scope.add_argument("--namespace", metavar="NS", help=f"{verb} only entities with ids in namespace NS")
    scope.add_argument("--all", action="store_true", help=f"{verb} every entity (the default)")
    parser.add_argument(
        "--entity", choices=["thing", "policy"], help="only things or only policies (default both)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twinstore", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"twinstore {twinstore.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the HTTP API, the journal and the NATS relay",
        description=SERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(serve)
    serve.add_argument(
        "--host",
        help="address to listen on (default 127.0.0.1; another address exposes the development "
        "user ditto/ditto to the network unless --users-file is set)",
    )
    serve.add_argument(
        "--port", type=int, help="port to listen on (default 8080; checked before anything starts)"
    )
    serve.add_argument("--workers", type=int, help="HTTP worker processes (default 1)")
    serve.add_argument("--users-file", metavar="FILE", help="htpasswd file with bcrypt hashes")
    serve.add_argument(
        "--no-ingest",
        action="store_true",
        help="do not run an ingest worker in this process (setting ingest_enabled)",
    )
    serve.add_argument(
        "--no-anomaly",
        action="store_true",
        help="do not run an anomaly scoring worker in this process (setting anomaly_enabled)",
    )
    ingest = sub.add_parser(
        "ingest",
        help="run only NATS ingestion (scale-out worker): no HTTP API",
        description=INGEST,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(ingest)
    anomaly = sub.add_parser(
        "anomaly",
        help="run only anomaly scoring (scale-out worker): no HTTP API",
        description=ANOMALY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(anomaly)
    migrate = sub.add_parser(
        "migrate",
        help="apply the database schema and exit",
        description=(
            "Apply missing migrations (safe while servers run or start concurrently). A new "
            "database, or one from before partitions, gets the `partitions` setting's count "
            "(unset: 64); a database that has its count refuses another one."
        ),
    )
    _common(migrate)
    audit = sub.add_parser(
        "audit",
        help="check the integrity of the journal",
        description="Integrity checks of the event journal.",
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = audit_sub.add_parser(
        "verify",
        help="recompute the journal's hash chains and report where they break",
        description=AUDIT_VERIFY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(verify)
    _scope(verify, "verify")
    verify.add_argument(
        "--checkpoints",
        choices=["latest", "all", "none"],
        default="latest",
        help="which checkpoints to check against the journal (default latest)",
    )
    verify.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    checkpoint = audit_sub.add_parser(
        "checkpoint",
        help="seal every chain head in a (signed) checkpoint that verify checks",
        description=(
            "Read every entity's chain head and every journal partition's head in one snapshot, "
            "compute the heads' Merkle root and store a checkpoint, signed with audit_signing_key "
            "when set. `audit verify` then reports truncated chains and invalid checkpoints; "
            "`audit cleanup` removes only events at or below the partition heads it sealed."
        ),
    )
    _common(checkpoint)
    checkpoint.add_argument("--json", action="store_true", help="print the checkpoint as JSON")
    cleanup = audit_sub.add_parser(
        "cleanup",
        help="remove thing history older than the retention period (recorded, checkpoint-bound)",
        description=AUDIT_CLEANUP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(cleanup)
    _scope(cleanup, "clean up")
    cutoff = cleanup.add_mutually_exclusive_group()
    cutoff.add_argument("--before", metavar="TS", help="remove events written before TS (ISO 8601)")
    cutoff.add_argument(
        "--older-than-days",
        type=float,
        metavar="N",
        help="remove events older than N days (default: the history_retention_days setting)",
    )
    cleanup.add_argument(
        "--dry-run", action="store_true", help="report what would be removed; change nothing"
    )
    cleanup.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    replay = sub.add_parser(
        "replay",
        help="rebuild current state from the journal and compare it with the projection",
        description=REPLAY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(replay)
    _scope(replay, "replay")
    replay.add_argument(
        "--repair", action="store_true", help="rewrite the differing projection rows from the journal"
    )
    replay.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    export = sub.add_parser(
        "export",
        help="write journal events as NDJSON (Ditto Protocol envelopes plus audit fields)",
        description=EXPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(export)
    _scope(export, "export")
    export.add_argument("--from", dest="since", metavar="TS", help="only events at or after TS (ISO 8601)")
    export.add_argument("--to", dest="until", metavar="TS", help="only events at or before TS (ISO 8601)")
    export.add_argument(
        "--output", "-o", metavar="FILE", default="-", help="file to write, - for stdout (default)"
    )
    import_ = sub.add_parser(
        "import",
        help="load an exported NDJSON file into an empty store, rebuild and verify",
        description=IMPORT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(import_)
    import_.add_argument("file", metavar="FILE", help="NDJSON file written by export, - for stdin")
    import_.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    _simulate_parser(sub)
    return parser


def _simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate = sub.add_parser(
        "simulate",
        help="run a simulated plant (pumps over OPC UA and MQTT) feeding live twins",
        description=SIMULATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(simulate)
    simulate.add_argument("--things", type=int, default=2, metavar="N", help="pumps (default 2)")
    simulate.add_argument(
        "--rate", type=float, default=1.0, metavar="HZ", help="samples/s per pump (default 1)"
    )
    simulate.add_argument(
        "--namespace", default="plant", help="namespace of the things <ns>:pump-<i> (default plant)"
    )
    simulate.add_argument(
        "--api-url", metavar="URL", help="twinstore's HTTP API (default http://127.0.0.1:<port setting>)"
    )
    simulate.add_argument(
        "--user", default="ditto:ditto", metavar="USER:PASSWORD", help="basic auth (default ditto:ditto)"
    )
    simulate.add_argument(
        "--mqtt-url",
        default="mqtt://127.0.0.1:1883",
        metavar="URL",
        help="MQTT broker of the sensors (default mqtt://127.0.0.1:1883; none: OPC UA only)",
    )
    simulate.add_argument("--opcua-host", default="127.0.0.1", help="address of the PLC (default 127.0.0.1)")
    simulate.add_argument("--opcua-port", type=int, default=4840, help="port of the PLC (default 4840)")
    simulate.add_argument(
        "--dataset",
        metavar="DIR",
        help="SKAB directory to replay (default $TWINSTORE_SKAB_DIR or ../shared/datasets/skab if "
        "present); synthetic: generated signals",
    )
    simulate.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    simulate.add_argument(
        "--status-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="print the twins' values this often (0: never; default 10)",
    )
    simulate.add_argument("--seed", type=int, help="random seed of the synthetic signals")
    simulate.add_argument(
        "--grant",
        action="append",
        metavar="SUBJECT",
        help="another subject the adapters write as (ingest_default_subjects of the server); repeatable",
    )


SERVE = """\
Run the Ditto-compatible HTTP API on --host:--port, with the NATS ingest worker, the anomaly
scorer and the journal's relay. Applies migrations at start.

Without a database and NATS configured (TWINSTORE_DATABASE_URL, TWINSTORE_NATS_URL) it starts an
embedded PostgreSQL and NATS under --data-dir and runs in development mode (user ditto/ditto
unless a users file is configured). Those servers belong to this process: a second `serve` on
the same data dir is refused, while commands such as `audit verify`, `replay` or `export` with
the same --data-dir use them. Once up it prints where everything is (the URL, the OpenAPI page,
the login, the data dir, the NATS and PostgreSQL URLs). The port is checked before anything
starts: choose another with --port N (`make run ARGS="--port N"`).

Logs: text on a terminal, JSON lines otherwise (--log-format).

Exit status: 0 stopped by SIGTERM / Ctrl-C; 1 an invalid setting, or the shutdown outran
shutdown_grace_seconds; 2 invalid command-line options; 3 the embedded servers, the database
or the application did not start; 4 cannot listen on --host:--port (in use, no permission);
5 the data dir cannot be created or written (a file, no permission); 6 another twinstore
already serves the data dir; 130 interrupted (Ctrl-C) during start-up.
"""


SIMULATE = """\
Run a small simulated plant against a running twinstore, so that its twins change live: per
pump a PLC (an OPC UA server with the speed set point, current, voltage, pressure and flow)
and sensors publishing over MQTT (two accelerometers, motor and fluid temperature), with the
signals of the SKAB pump data set (replayed when found, else synthetic ones with occasional
anomalies). Both adapters (twinstore-adapter opcua and mqtt) run as child processes and feed
the things <namespace>:pump-1..N through NATS; a desired speed
(PUT .../features/pump/desiredProperties/speed) is written to the PLC over OPC UA and the
confirmed value comes back in properties.

With `make run` in another terminal nothing needs configuring: the embedded NATS is found under
--data-dir and the development mode lets the adapters write as integration:dev-ingest, which the
simulation's policy grants. Against servers of your own: --nats-url (or TWINSTORE_NATS_URL and
TWINSTORE_NATS_PREFIX as the server's), --api-url, --user, and the server's ingest_sources must
map the sources simulate-<namespace>-opcua and simulate-<namespace>-mqtt to
integration:<source> (or use --grant with its ingest_default_subjects).

Without an MQTT broker (--mqtt-url) only the OPC UA path runs. Ctrl-C stops everything.
"""


AUDIT_VERIFY = """\
Recompute every hash chain of the journal from GENESIS (after a history cleanup: from the
entity's retention anchor), in revision order per entity (things and policies), streaming the
rows in one consistent snapshot, and report either OK with the number of entities and events
checked, or for each broken chain the entity, id and revision where it breaks and why:

  missing     a revision gap (a deleted event)
  edited      the event's content no longer matches its hash
  duplicated  an event copied to another revision
  reordered   a revision holds the event written as another revision (swapped/renumbered)
  inserted    an event inserted before renumbered later events
  mismatch    the content does not match its hash (edited last event, or inserted/forged)

Then the latest checkpoint (--checkpoints all: every one) is checked: each chain head it
sealed must still be in the journal with the same hash:

  truncated           the sealed revision is gone (the newest events were deleted)
  rewritten           the sealed revision's hash differs
  checkpoint-invalid  its Merkle root does not recompute, or its signature does not verify
                      with audit_signing_key (not checked without a key)

and the records of history cleanups (`audit cleanup`):

  anchor              events left at or below a retention anchor
  snapshot-altered    the snapshot kept at a retention anchor is missing or changed
  cleanup-invalid     a cleanup run's anchors do not recompute its digest (edited, added,
                      deleted or moved anchors), or its signature does not verify (checked
                      only without --thing/--namespace)

On a terminal a progress bar shows rate and ETA; --json prints the report as JSON.

Exit status: 0 when every chain verifies, 1 when any break is found.
"""


INGEST = """\
Apply what protocol adapters publish to NATS JetStream: Ditto Protocol commands and telemetry
batches on <prefix>.ingest.<partition> (see the README, "NATS ingestion"). Every `twinstore
serve` runs an ingest worker too (unless --no-ingest); run this for more workers: all of them,
in any number of processes and machines, share the partitions (each applied by one worker at a
time, in order, exactly once). Also runs the journal's relay (standby unless elected). Stops
on SIGTERM / SIGINT after committing and acknowledging the batches in flight.

Settings: partitions, ingest_sources, ingest_default_subjects, ingest_batch (README).
"""


ANOMALY = """\
Score every update of watched features (README, "Anomaly detection") from the committed-event
stream and send anomalies as the feature's outbox messages (subject `anomaly`), on NATS and to
REST. Every `twinstore serve` scores too (unless --no-anomaly); run this for more workers: all
of them share the event partitions (each scored by one worker at a time, in order, resumed from
its checkpoint). Also runs the journal's relay (standby unless elected). Stops on SIGTERM /
SIGINT after checkpointing and acknowledging what it scored.

Settings: anomaly_checkpoint_every, anomaly_checkpoint_seconds, partitions (README).
"""


AUDIT_CLEANUP = """\
History retention: remove the oldest journal events of things, keeping per thing

  * every event written at or after the cutoff (--before TS, --older-than-days N, default
    now minus the history_retention_days setting; unset: keep everything, nothing to do),
  * every event beyond its partition's head sealed by the latest `audit checkpoint` (without
    a checkpoint nothing is removed; one made before the journal had partitions seals what
    was at or below its journal position then) or not yet published by the NATS relay in its
    partition,
  * its newest event (the chain head), and everything after the first event that stays.

Where events were removed a snapshot of the state at the last removed revision is kept and a
retention anchor (that revision and its hash) is recorded: history reads, replay and audit
verify start from it; revisions and times before it answer 404 things:thing.history.notfound.
Policy events are always kept. A thing whose removed range does not verify (hash chain) is
left alone and reported. Every run is recorded in journal_cleanups (who, cutoff, checkpoint,
the per-partition bounds it respected, counts, a digest over the bounds and its anchors,
signed with audit_signing_key when set), which audit verify checks. With audit_signing_key a
checkpoint that does not verify with it is not relied on (nothing removed). Batches of
things, each in one transaction; --dry-run only reports; --json lists the bounds.

Exit status: 0 done (or nothing to do), 1 some things were skipped, 2 refused (another cleanup
is running, or an invalid cutoff).
"""


REPLAY = """\
Rebuild the current state of every entity (things and policies) from the journal alone, folding
its events from revision 1 (after a history cleanup: from the snapshot kept at its retention
anchor) with the same functions the stores use, streamed in one consistent snapshot, and
compare it with the stored projection row (tables things and policies): revision, created,
modified, document, chain head hash, and policy_id of things / readers of policies. Each
difference is reported with the entity and id:

  missing     the entity has events but no projection row
  extra       a projection row without any event
  mismatch    the fields that differ (a document difference names its first JSON pointer)
  unreplayable  no snapshot at the thing's retention anchor (never repaired)

--repair rewrites the differing rows from the journal (one transaction per batch, under the
journal's write lock; a row written meanwhile is left to its writer) and deletes rows without
events. Running servers cache thing documents: restart them after a repair.
On a terminal a progress bar shows rate and ETA; --json prints the report as JSON.

Exit status: 0 when the projection equals the journal (with --repair: when every difference was
repaired), 1 otherwise.
"""


EXPORT = """\
Write the journal's events as NDJSON, one line per event in (entity, id, revision) order,
streamed from one consistent snapshot. Thing events are Ditto Protocol event envelopes (topic
ns/name/things/twin/events/<action>), policy events similar envelopes (ns/name/policies/events/
<action>); each line carries an `_audit` object with the exact journal row (entity, id,
revision, ts, action, path, value as the stored canonical JSON text, originator,
correlation_id, hash in hex) so that `twinstore import` can restore and re-verify it.
--from/--to restrict the event timestamps (an export of part of a chain cannot be imported
and verified on its own; neither can one of chains shortened by `audit cleanup`). On a
terminal a progress bar on stderr shows rate and ETA.
"""


IMPORT = """\
Load a file written by `twinstore export` into an EMPTY store (the schema is migrated first;
refused with exit status 2 if the journal holds any event), read in batches, inserting the
journal rows exactly (same hashes) in one transaction. Then the projections (things, policies)
are rebuilt from the journal as `twinstore replay --repair` does, and every chain is verified
as `twinstore audit verify` does.

Exit status: 0 when the import verifies, 1 when replay or verification fails, 2 when refused.
"""


def _progress(
    label: str, disable: bool, unit: str = "events"
) -> tuple[Progress, Callable[[int | None], None], Callable[[int], None]]:
    """The progress bar of the long CLI jobs (audit, replay, export, import), on stderr and only
    on a terminal: (bar, set_total, advance), the rate in ``unit``/s and an ETA once the total
    is known."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    err = Console(stderr=True)
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn(f"{{task.fields[rate]}} {unit}/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=disable or not err.is_terminal,
    )
    task = bar.add_task(label, total=None, rate="-")

    def set_total(total: int | None) -> None:
        bar.update(task, total=total)

    def advance(n: int) -> None:
        bar.advance(task, n)
        speed = bar.tasks[task].speed
        bar.update(task, rate=f"{speed:,.0f}" if speed else "-")

    return bar, set_total, advance


def _config_file(args: argparse.Namespace) -> str | None:
    """The TOML file named by --config or TWINSTORE_CONFIG; one clear line (exit 1) when it
    cannot be read or is not TOML, never a traceback."""
    import tomllib

    path: str | None = args.config or os.environ.get("TWINSTORE_CONFIG") or None
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            tomllib.load(fh)
    except OSError as exc:
        raise SystemExit(f"twinstore: cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"twinstore: the config file {path} is not valid TOML: {exc}") from None
    return path


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        None,
        _config_file(args),
        data_dir=args.data_dir,
        database_url=args.database_url,
        nats_url=args.nats_url,
        log_level=args.log_level,
        log_format=args.log_format,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        workers=getattr(args, "workers", None),
        users_file=getattr(args, "users_file", None),
    )


def _start_embedded(
    settings: Settings, servers: EmbeddedServers | None = None
) -> tuple[Settings, EmbeddedServers]:
    """Start embedded servers for what is not configured, or use the ones another process runs
    under the same data dir; development mode."""
    from twinstore.auth import default_dev_users

    data_dir = Path(settings.data_dir).resolve()
    if servers is None:
        servers = EmbeddedServers(data_dir)
    database_url, nats_url = servers.start()
    changes: dict[str, object] = {
        "database_url": settings.database_url or database_url,
        "nats_url": settings.nats_url or nats_url,
        "dev_mode": True,
    }
    if not settings.ingest_default_subjects:
        changes["ingest_default_subjects"] = [DEV_INGEST_SUBJECT]
    if not settings.ingest_default_subjects and servers.owned:  # said once, by the owner
        log.info(
            "development mode: ingest sources not in ingest_sources write as %s",
            DEV_INGEST_SUBJECT,
            extra={"ingest_default_subjects": [DEV_INGEST_SUBJECT]},
        )
    if settings.users_file is None:
        changes["users_file"] = str(default_dev_users(data_dir))
        if servers.owned:
            log.warning(
                "development mode: no users file configured, created default user 'ditto' with "
                "password 'ditto' (do not use in production)",
                extra={"users_file": changes["users_file"]},
            )
    import msgspec

    return msgspec.structs.replace(settings, **changes), servers


def _check_listen(host: str, port: int) -> None:
    """Bind --host:--port as uvicorn will, before anything starts; StartError if that fails."""
    import errno
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise StartError(
            f"cannot listen on {host}:{port}: unknown address; choose another with --host", EXIT_PORT
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    problem = f"port {port} is already in use on {host}"
                else:
                    problem = f"cannot listen on {host}:{port}: {(exc.strerror or 'error').lower()}"
                raise StartError(
                    f"{problem}; choose another port: twinstore serve --port N "
                    f'(make run ARGS="--port N")',
                    EXIT_PORT,
                ) from None


def _loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback address."""
    import ipaddress
    import socket

    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in found)


def _dev_user(settings: Settings) -> bool:
    """Whether the development user ditto/ditto (created under the data dir) is the login."""
    default = Path(settings.data_dir).resolve() / "users.htpasswd"
    return settings.dev_mode and settings.users_file == str(default)


def _browser_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _shown_url(url: str | None) -> str:
    """A database or NATS URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return "-"
    several = [part.strip() for part in url.split(",")]
    if len(several) > 1 and all("://" in part for part in several):  # NATS: one URL per server
        return ",".join(_shown_url(part) for part in several)
    parts = urlsplit(url)
    # The host part is kept as written: PostgreSQL's several hosts (h1:5432,h2:5432) and IPv6
    # brackets are not one host and port to urlsplit.
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        return url
    if ":" not in userinfo:  # PostgreSQL: a user name; NATS: a token, as secret as a password
        if parts.scheme.startswith("postgres"):
            return url
        return urlunsplit(parts._replace(netloc=f"***@{hosts}"))
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hosts}"))


def _announcer(settings: Settings, servers: EmbeddedServers | None) -> Callable[[], None]:
    """What serve says once it listens: a banner on a terminal (text logs), a JSON line
    otherwise; and the URL recorded for a second serve's refusal."""
    url = f"http://{_browser_host(settings.host)}:{settings.port}"
    exposed = _dev_user(settings) and not _loopback(settings.host)

    def announce() -> None:
        if servers is not None:
            servers.serving(url)
        fields = {
            "url": url,
            "openapi": f"{url}/api/2/openapi",
            "console": f"{url}/",
            "data_dir": str(Path(settings.data_dir).resolve()) if settings.dev_mode else None,
            "nats_url": _shown_url(settings.nats_url),
            "database_url": _shown_url(settings.database_url),
            "users_file": settings.users_file,
        }
        if resolve_format(settings.log_format, sys.stderr) == "json":
            log.info("ready", extra=fields)
            return
        mode = " (development mode: embedded PostgreSQL and NATS)" if settings.dev_mode else ""
        if _dev_user(settings):
            login = f"ditto / ditto   (development user in {settings.users_file}; not for production)"
        elif settings.users_file:
            login = f"users in {settings.users_file}"
        else:
            login = "none configured: every API request is refused with 401"
        lines = [
            "",
            f"twinstore {twinstore.__version__} is ready on {url}{mode}",
            f"  API reference  {fields['openapi']}",
            f"  Console        {fields['console']}   (for now it leads to the API reference)",
            f"  Things         {url}/api/2/things",
            f"  Login          {login}",
        ]
        if settings.dev_mode:
            lines.append(f"  Data dir       {fields['data_dir']}")
        lines += [
            f"  NATS           {fields['nats_url']}   (adapters and `nats pub` publish here)",
            f"  PostgreSQL     {fields['database_url']}",
            "  Stop           Ctrl-C",
        ]
        if exposed:
            lines.append(
                f"  WARNING        listening on {settings.host}: ditto/ditto is open to the network"
            )
        print("\n".join([*lines, ""]), file=sys.stderr, flush=True)

    return announce


def _warn_exposed(settings: Settings) -> None:
    if _dev_user(settings) and not _loopback(settings.host):
        log.warning(
            "DEVELOPMENT USER ditto/ditto REACHABLE FROM THE NETWORK: listening on %s:%s with the "
            "development users file; anyone who can reach this port can read and change every "
            "twin. Configure a users file (--users-file) or listen on 127.0.0.1.",
            settings.host,
            settings.port,
            extra={"host": settings.host, "users_file": settings.users_file},
        )


def serve(settings: Settings, config_file: str | None = None) -> None:
    import uvicorn

    from twinstore.api.guard import uvicorn_options
    from twinstore.api.server import CLOSE_RESERVE, GracefulServer

    # Before anything starts: a data dir another serve owns, or a port in use, is one line.
    servers = EmbeddedServers(Path(settings.data_dir), share=False) if settings.embedded else None
    try:
        if servers is not None:
            servers.claim()
        _check_listen(settings.host, settings.port)
        if servers is not None:
            settings, servers = _start_embedded(settings, servers)
    except BaseException:
        if servers is not None:
            servers.stop()
        raise
    # HTTP in flight may take the grace period but for what closing the runtime needs.
    http_grace = max(1, int(settings.shutdown_grace_seconds - CLOSE_RESERVE))
    if settings.users_file is None:
        log.warning("no users file configured: every API request will be refused with 401")
    try:
        _warn_exposed(settings)
        log.info("serving", extra={"host": settings.host, "port": settings.port})
        announce = _announcer(settings, servers)
        if settings.workers > 1:
            # Workers re-create the app from the environment (stateless processes): the config
            # file, then what the command line or development mode decided on top of it.
            if config_file:
                os.environ["TWINSTORE_CONFIG"] = str(Path(config_file).resolve())
            for name in ("database_url", "nats_url", "users_file", "log_level", "log_format"):
                value = getattr(settings, name)
                if value:
                    os.environ["TWINSTORE_" + name.upper()] = str(value)
            if settings.dev_mode:
                os.environ["TWINSTORE_DEV_MODE"] = "true"
            if settings.ingest_default_subjects:
                import json

                subjects = json.dumps(settings.ingest_default_subjects)
                os.environ["TWINSTORE_INGEST_DEFAULT_SUBJECTS"] = subjects
            announce()  # the workers start after this; each logs its own start
            uvicorn.run(
                "twinstore.api.app:app_from_environment",
                factory=True,
                host=settings.host,
                port=settings.port,
                workers=settings.workers,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=http_grace,
                **uvicorn_options(settings),
            )
        else:
            from twinstore.api.app import create_app

            started = GracefulServer.serve_app(
                create_app(settings),
                Shutdown(settings.shutdown_grace_seconds),
                on_started=announce,
                host=settings.host,
                port=settings.port,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=http_grace,
                **uvicorn_options(settings),
            )
            if not started:
                sys.exit(EXIT_NOT_STARTED)  # as uvicorn: the application did not start
    finally:
        if servers is not None:
            servers.stop()


def worker(settings: Settings, role: str) -> int:
    """Run one worker role, ``ingest`` or ``anomaly`` (and the relay), until SIGTERM / SIGINT."""
    from twinstore.runtime import Runtime

    servers = None
    if settings.embedded:
        settings, servers = _start_embedded(settings)

    async def run() -> None:
        runtime = Runtime(settings)
        stop = asyncio.Event()
        shutdown = Shutdown(settings.shutdown_grace_seconds)

        def on_signal(signum: int) -> None:
            shutdown.signal(signum)  # a second one exits at once
            runtime.draining = True  # /ready on metrics_port answers 503
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await runtime.open(ingest=role == "ingest", anomaly=role == "anomaly", clients=False)
        if role == "ingest":
            log.info("ingesting", extra={"stream": runtime.ingest_subjects.stream})
        else:
            log.info("scoring anomalies", extra={"partitions": runtime.subjects.partitions})
        try:
            await stop.wait()
        finally:
            log.info("stopping: finishing the work in flight", extra={"role": role})
            await runtime.close()
            shutdown.finished()

    try:
        asyncio.run(run())
    finally:
        if servers is not None:
            servers.stop()
    return 0


async def _migrate(settings: Settings) -> int:
    from twinstore.runtime import create_pool
    from twinstore.store.schema import migrate

    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, 1)
    try:
        async with pool.acquire() as con:
            return await migrate(con, settings.partitions)
    finally:
        await pool.close()


def audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``audit verify``; the exit status (0 OK, 1 broken)."""
    import json

    from rich.console import Console

    from twinstore.audit import Scope, verify_database

    assert settings.database_url is not None
    scope = Scope(entity=args.entity, thing=args.thing, namespace=args.namespace)
    bar, set_total, advance = _progress("verifying", args.json)
    with bar:
        report = asyncio.run(
            verify_database(
                settings.database_url,
                scope,
                on_total=set_total,
                progress=advance,
                checkpoints=args.checkpoints,
                signing_key=settings.audit_signing_key,
            )
        )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        out = Console(highlight=False)
        for b in report.breaks:
            out.print(f"[red]BROKEN[/red] {b}")
        rate = report.events / report.seconds if report.seconds else 0
        summary = (
            f"{report.entities} entities, {report.events} events verified in "
            f"{report.seconds:.2f} s ({rate:,.0f} events/s), {report.checkpoints} checkpoints checked"
        )
        if report.ok:
            out.print(f"[green]OK[/green]: {summary}")
        else:
            out.print(
                f"[red]FAILED[/red]: {len(report.breaks)} breaks in {report.broken_entities} "
                f"entities; {summary}"
            )
    return 0 if report.ok else 1


def audit_checkpoint(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``audit checkpoint``; prints the new checkpoint."""
    import json

    from twinstore.audit import checkpoint_database

    assert settings.database_url is not None
    cp = asyncio.run(checkpoint_database(settings.database_url, signing_key=settings.audit_signing_key))
    if args.json:
        print(json.dumps(cp.as_dict(), indent=2))
    else:
        signed = f", signed by key {cp.key_id}" if cp.key_id else ", unsigned"
        filled = sum(1 for seq in cp.partition_heads.values() if seq)
        print(
            f"checkpoint {cp.id}: {cp.heads} chain heads, sealing the {cp.events} events up to the "
            f"heads of {len(cp.partition_heads)} partitions ({filled} with events; --json lists "
            f"them), root {cp.root.hex()}{signed}"
        )
    return 0


def audit_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``audit cleanup``; the exit status (0 done, 1 things skipped, 2 refused)."""
    import getpass
    import json
    import socket

    from rich.console import Console

    from twinstore.retention import CleanupBusy, Scope, cleanup_database

    assert settings.database_url is not None
    days = args.older_than_days if args.older_than_days is not None else settings.history_retention_days
    try:
        cutoff = _timestamp(args.before)
    except ValueError as exc:
        print(f"twinstore audit cleanup: invalid timestamp: {exc}", file=sys.stderr)
        return 2
    if cutoff is None and days is not None:
        if not days > 0:
            print("twinstore audit cleanup: --older-than-days must be positive", file=sys.stderr)
            return 2
        cutoff = datetime.now(UTC) - timedelta(days=days)
    if cutoff is None:
        reason = "no retention configured (history_retention_days): all history is kept"
        print(json.dumps({"ok": True, "reason": reason}) if args.json else f"nothing removed: {reason}")
        return 0
    scope = Scope(entity=args.entity, thing=args.thing, namespace=args.namespace)
    bar, set_total, advance = _progress("cleaning up", args.json, unit="things")
    try:
        with bar:
            report = asyncio.run(
                cleanup_database(
                    settings.database_url,
                    cutoff,
                    scope,
                    run_by=f"{getpass.getuser()}@{socket.gethostname()}",
                    dry_run=args.dry_run,
                    signing_key=settings.audit_signing_key,
                    on_total=set_total,
                    progress=advance,
                )
            )
    except CleanupBusy as exc:
        print(f"twinstore audit cleanup: refused: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.ok else 1
    out = Console(highlight=False, soft_wrap=True)
    for skipped in report.skipped:
        out.print(f"[yellow]SKIPPED[/yellow] {skipped}")
    if report.reason is not None:
        out.print(f"nothing removed: {report.reason}")
        return 0
    verb = "would remove" if report.dry_run else "removed"
    open_ = sum(1 for seq in report.bounds.values() if seq)
    legacy = ", made before partitions: up to its journal position" if report.legacy_checkpoint else ""
    summary = (
        f"{verb} {report.events} events of {report.entities} things (of {report.examined}) written "
        f"before {cutoff.isoformat()}, sealed by checkpoint {report.checkpoint_id}{legacy} and "
        f"published, in {open_} of {len(report.bounds)} partitions (--json lists the bounds), "
        f"in {report.seconds:.2f} s"
    )
    if report.cleanup_id is not None:
        summary += (
            f"; {report.snapshots} snapshots written; recorded as cleanup {report.cleanup_id}, "
            f"digest {report.digest.hex()}"
        )
    label = "[green]OK[/green]" if report.ok else f"[yellow]{len(report.skipped)} SKIPPED[/yellow]"
    out.print(f"{label}: {summary}")
    return 0 if report.ok else 1


def replay(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``replay``; the exit status (0 equal or repaired, 1 differences)."""
    import json

    from rich.console import Console

    from twinstore.replay import Scope, replay_database

    assert settings.database_url is not None
    scope = Scope(entity=args.entity, thing=args.thing, namespace=args.namespace)
    bar, set_total, advance = _progress("replaying", args.json)
    with bar:
        report = asyncio.run(
            replay_database(
                settings.database_url,
                scope,
                repair=args.repair,
                on_total=set_total,
                progress=advance,
            )
        )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        out = Console(highlight=False)
        for d in report.differences:
            label = "[green]REPAIRED[/green]" if d.repaired else "[red]DIFFERS[/red]"
            out.print(f"{label} {d}")
        rate = report.events / report.seconds if report.seconds else 0
        summary = (
            f"{report.entities} entities, {report.events} events replayed in "
            f"{report.seconds:.2f} s ({rate:,.0f} events/s)"
        )
        if not report.differences:
            out.print(f"[green]OK[/green]: {summary}")
        elif report.ok:
            out.print(f"[green]REPAIRED[/green]: {report.repaired} projection rows; {summary}")
        else:
            out.print(
                f"[red]FAILED[/red]: {len(report.differences)} differences "
                f"({report.repaired} repaired); {summary}"
            )
    return 0 if report.ok else 1


def _timestamp(text: str | None) -> datetime | None:
    if text is None:
        return None
    ts = datetime.fromisoformat(text)
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def export(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``export``; writes NDJSON to --output (stdout for -)."""
    from rich.console import Console

    from twinstore.export import Scope, export_database

    assert settings.database_url is not None
    scope = Scope(entity=args.entity, thing=args.thing, namespace=args.namespace)
    try:
        since, until = _timestamp(args.since), _timestamp(args.until)
    except ValueError as exc:
        print(f"twinstore export: invalid timestamp: {exc}", file=sys.stderr)
        return 2
    bar, set_total, advance = _progress("exporting", False)
    to_stdout = args.output == "-"
    out = sys.stdout.buffer if to_stdout else open(args.output, "wb")  # noqa: SIM115
    try:
        with bar:
            report = asyncio.run(
                export_database(
                    settings.database_url,
                    out,
                    scope,
                    since=since,
                    until=until,
                    on_total=set_total,
                    progress=advance,
                )
            )
    finally:
        if not to_stdout:
            out.close()
    rate = report.events / report.seconds if report.seconds else 0
    Console(stderr=True, highlight=False).print(
        f"exported {report.events} events of {report.entities} entities in "
        f"{report.seconds:.2f} s ({rate:,.0f} events/s)"
    )
    return 0


def import_file(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``import``; the exit status (0 verified, 1 failed, 2 refused)."""
    import json

    from rich.console import Console

    from twinstore.export import JournalNotEmpty, import_database

    assert settings.database_url is not None
    bar, _, advance = _progress("importing", args.json)
    source = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    try:
        with bar:
            report = asyncio.run(import_database(settings.database_url, source, progress=advance))
    except JournalNotEmpty as exc:
        print(f"twinstore import: refused: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"twinstore import: {args.file}: {exc}", file=sys.stderr)
        return 1
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.ok else 1
    out = Console(highlight=False)
    assert report.replay is not None and report.audit is not None
    for d in report.replay.differences:
        if not d.repaired:
            out.print(f"[red]DIFFERS[/red] {d}")
    for b in report.audit.breaks:
        out.print(f"[red]BROKEN[/red] {b}")
    summary = (
        f"{report.events} events of {report.things} things and {report.policies} policies imported, "
        f"{report.replay.repaired} projection rows rebuilt, {report.audit.entities} chains verified "
        f"in {report.seconds:.2f} s"
    )
    if report.ok:
        out.print(f"[green]OK[/green]: {summary}")
    else:
        out.print(f"[red]FAILED[/red]: {summary}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> None:
    """The command line; a start that cannot go on is one line on stderr and an exit status
    (``serve --help`` lists them), never a traceback."""
    # `kill -USR1 <pid>` writes every thread's stack to stderr: for a process that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        _main(argv)
    except StartError as exc:
        _fail(str(exc), exc.status)
    except DataDirInUse as exc:
        _fail(str(exc), EXIT_IN_USE, prefix="")
    except DataDirError as exc:
        _fail(str(exc), EXIT_DATA_DIR)
    except EmbeddedError as exc:
        _fail(f"the embedded servers did not start: {exc}", EXIT_NOT_STARTED)
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C)", EXIT_INTERRUPTED)


def _fail(message: str, status: int, prefix: str = "twinstore: ") -> None:
    print(f"{prefix}{message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "serve":
        # HTTP worker processes (--workers) read the environment too.
        if args.no_ingest:
            os.environ["TWINSTORE_INGEST_ENABLED"] = "false"
        if args.no_anomaly:
            os.environ["TWINSTORE_ANOMALY_ENABLED"] = "false"
        if args.no_ingest or args.no_anomaly:
            settings = _settings(args)
        serve(settings, _config_file(args))
    elif args.command in ("ingest", "anomaly"):
        sys.exit(worker(settings, args.command))
    elif args.command == "migrate":
        sys.exit(_on_database(settings, _print_migrate))
    elif args.command == "audit":
        command = {"checkpoint": audit_checkpoint, "cleanup": audit_cleanup}.get(
            args.audit_command, audit_verify
        )
        sys.exit(_on_database(settings, lambda s: command(s, args)))
    elif args.command == "replay":
        sys.exit(_on_database(settings, lambda s: replay(s, args)))
    elif args.command == "simulate":
        from twinstore import simulate

        sys.exit(simulate.run(settings, args))
    elif args.command in ("export", "import"):
        sys.exit(
            _on_database(settings, lambda s: (export if args.command == "export" else import_file)(s, args))
        )


def _print_migrate(settings: Settings) -> int:
    print(f"schema is at version {asyncio.run(_migrate(settings))}")
    return 0


def _on_database(settings: Settings, run: Callable[[Settings], int]) -> int:
    """Run a command against the configured database (the embedded one when none is set);
    its exit status. A database without twinstore's schema is a clear error (2), not a trace."""
    import asyncpg

    from twinstore.store.schema import PartitionsMismatchError

    servers = None
    if settings.database_url is None:
        settings, servers = _start_embedded(settings)
    try:
        return run(settings)
    except asyncpg.UndefinedTableError as exc:
        print(
            f"twinstore: the database has no twinstore schema ({exc}); run `twinstore migrate` first",
            file=sys.stderr,
        )
        return 2
    except PartitionsMismatchError as exc:
        print(f"twinstore: {exc}", file=sys.stderr)
        return 2
    finally:
        if servers is not None:
            servers.stop()


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
