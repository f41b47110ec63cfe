"""Settings: defaults < TOML config file < environment (``TWINSTORE_*``) < command line.

Nothing is read or connected at import time.

>>> s = load_settings({"TWINSTORE_PORT": "9000"})
>>> s.port, s.embedded
(9000, True)

List and table settings are JSON in the environment:

>>> issuers = '[{"issuer": "https://idp", "prefix": "idp", "secret": "k"}]'
>>> s = load_settings({"TWINSTORE_JWT_ISSUERS": issuers})
>>> s.jwt_issuers[0].prefix, s.jwt_issuers[0].allowed_algorithms
('idp', ('HS256',))
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from twinstore.bus.connection import servers
from twinstore.model.partition import DEFAULT_PARTITIONS, MAX_PARTITIONS
from twinstore.model.rql import QueryLimits
from twinstore.store.rql_sql import indexable

__all__ = ["JwtIssuer", "Settings", "load_settings"]

_HMAC = frozenset({"HS256", "HS384", "HS512"})
_SIGNED = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class JwtIssuer(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One trusted issuer of JWT bearer tokens (OIDC style); exactly one key source.

    ``subjects`` are templates such as ``{{ jwt:sub }}`` or ``{{ jwt:groups }}`` (an array
    claim gives one subject per element); each value becomes the subject ``<prefix>:<value>``.
    ``algorithms`` defaults to RS256/ES256 for a key set and HS256 for a ``secret``; HMAC
    algorithms are refused for key sets (and public-key algorithms for a secret), so a token
    can never be checked with a public key taken as an HMAC secret.
    """

    issuer: str
    prefix: str
    subjects: list[str] = msgspec.field(default_factory=lambda: ["{{ jwt:sub }}"])
    audience: str | None = None
    algorithms: list[str] | None = None
    jwks_file: str | None = None
    jwks_url: str | None = None
    secret: str | None = None
    leeway: float = 30.0
    jwks_cache_seconds: float = 300.0

    def __post_init__(self) -> None:
        name = f"jwt issuer {self.issuer!r}"
        if not self.issuer:
            raise ValueError("a jwt issuer needs a non-empty 'issuer'")
        if not self.prefix or ":" in self.prefix or self.prefix != self.prefix.strip():
            raise ValueError(f"{name}: 'prefix' must be non-empty, without ':' or surrounding spaces")
        if not self.subjects:
            raise ValueError(f"{name}: 'subjects' must name at least one template")
        sources = [s for s in (self.jwks_file, self.jwks_url, self.secret) if s]
        if len(sources) != 1:
            raise ValueError(f"{name}: set exactly one of 'jwks_file', 'jwks_url', 'secret'")
        allowed = set(self.allowed_algorithms)
        if not allowed:
            raise ValueError(f"{name}: 'algorithms' must not be empty")
        if self.secret:
            if not allowed <= _HMAC:
                raise ValueError(f"{name}: with 'secret' only {sorted(_HMAC)} are allowed")
        elif not allowed <= _SIGNED:
            raise ValueError(
                f"{name}: with a key set only {sorted(_SIGNED)} are allowed (HS* needs 'secret')"
            )
        if self.leeway < 0 or self.jwks_cache_seconds <= 0:
            raise ValueError(f"{name}: 'leeway' must be >= 0 and 'jwks_cache_seconds' > 0")

    def __repr__(self) -> str:  # never print the shared secret (settings may be logged)
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        if self.secret:
            fields["secret"] = "***"
        return f"JwtIssuer({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    @property
    def allowed_algorithms(self) -> tuple[str, ...]:
        """The configured algorithms, or the default for the key source."""
        if self.algorithms is not None:
            return tuple(self.algorithms)
        return ("HS256",) if self.secret else ("RS256", "ES256")


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every setting of twinstore; the TOML file uses the same names."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    data_dir: str = ".twinstore"
    database_url: str | None = None
    nats_url: str | None = None
    users_file: str | None = None
    nats_prefix: str = "twinstore"
    # Servers of a JetStream cluster that keep each of twinstore's streams (and their durable
    # consumers): 3 survives the loss of any one server. Needs a cluster of at least that many.
    nats_replicas: int = 1
    events_max_age_seconds: float = 7 * 24 * 3600.0
    snapshot_every: int = 100
    # ---- Limits: every resource one request can consume (README "Limits" lists each with the
    # error it answers). Add new ones here, with a safe default.
    max_body_bytes: int = 1_048_576
    max_thing_bytes: int = 102_400
    # Deleting a policy that things still use: "refuse" answers 409 policies:policy.notdeletable
    # (delete or move the things first); "allow" deletes it as Ditto does, and whoever creates a
    # policy of that id next governs those things.
    policy_delete_in_use: str = "refuse"
    # Operations of one RFC 6902 JSON patch: 413 things:thing.tooLarge (the thing's size is
    # bounded while the patch is applied, op by op, by max_thing_bytes: also 413).
    max_patch_ops: int = 100
    # Open connections (HTTP and WebSocket) per process; one more is answered 503 and closed at
    # once. Lowered at start to stay below the process's open-file limit (RLIMIT_NOFILE).
    max_connections: int = 4096
    # A request head (request line and headers) not complete this long after the connection
    # opened or the previous response ended is answered 408 and closed (slowloris).
    header_read_timeout_seconds: float = 10.0
    # Failed password checks (HTTP basic) per client address and per user name within
    # auth_failure_window_seconds; more are answered 429 too.many.requests with Retry-After,
    # without a bcrypt check. Credentials that verified before are not counted or refused.
    auth_failures_per_client: int = 30
    auth_failures_per_user: int = 10
    auth_failure_window_seconds: float = 60.0
    # bcrypt checks running at once (threads, off the event loop); when 16 x this many wait,
    # one more is answered 429 at once.
    auth_bcrypt_concurrency: int = 2
    # A failed password check (wrong password, unknown user, 429 of the limits above) is answered
    # this late: a guesser waiting for its answers makes at most one guess a second per
    # connection, at no cost to the server (a sleeping request takes no CPU).
    auth_failure_delay_seconds: float = 1.0
    # A successful password check is remembered this long (HMAC of the credentials, at most
    # auth_cache_size entries), so a client sending its password on every request pays bcrypt once.
    auth_cache_seconds: float = 60.0
    auth_cache_size: int = 10_000
    # How long fetching a JWT issuer's key set (jwks_url) may take before requests answer 503.
    jwks_fetch_timeout_seconds: float = 5.0
    # WebSocket and SSE sessions re-check their credentials (users file changed, JWT expired)
    # this often; a JWT's expiry also ends its session at that time.
    credentials_recheck_seconds: float = 5.0
    # Ditto headers of one request, WebSocket or NATS command envelope (names and values; over
    # HTTP every request header, `authorization` on its own budget of the same size): 431
    # headers.too.large. Also bounds an event's originator, correlation-id and kept headers, so
    # every event's envelope fits NATS' max_payload (checked at start).
    max_header_bytes: int = 8192
    # Nesting of a written JSON value plus the segments of its path: 400 json.invalid (orjson
    # encodes at most 254 levels; Python recursion fails near 1000).
    max_json_depth: int = 100
    # RQL (search filter and option, the `condition` header/parameter, WebSocket/SSE event
    # filters; one parser) and `fields` selectors: beyond any of these the request is answered
    # 400 rql.expression.invalid (things:condition.invalid for a condition,
    # json.fieldselector.invalid for fields). Terms are operators plus the values of each `in`:
    # what the SQL of a search grows with (PostgreSQL takes at most 32767 parameters).
    rql_max_length: int = 65_536
    rql_max_depth: int = 32
    rql_max_terms: int = 2_000
    rql_max_in_values: int = 1_000
    rql_max_sort_fields: int = 10
    fields_max_count: int = 100
    fields_max_depth: int = 32
    # Rows of one telemetry message (adapters split their batches at the same number): a message
    # with more is terminated and reported 413 ingest:message.tooLarge on the errors stream.
    ingest_max_rows_per_message: int = 10_000
    max_batch: int = 512
    # The one partition count of the system (twinstore.model.partition): a thing's ingest subject
    # and consumer, its journal partition, the relay publishing its events, its events subject
    # and its anomaly scorer are all partition_of(thingId, partitions). Fixed when the database
    # is created (unset: 64 for a new database, the database's own otherwise); a start with
    # another number is refused. Adapters have no database: theirs must be set to the same.
    partitions: int | None = None
    # Journal transactions in flight per process, each committing the queued writes of one
    # partition on a pooled connection of its own; at most half of pool_size (the rest serves
    # reads): a smaller pool lowers it.
    journal_writers: int = 4
    # Consecutive partitions committed together (partition // N): 1 makes every write
    # transaction single-partition (single-shard on a database distributed by partition); more
    # gives bigger group commits on one database, and more lock overlap between processes.
    journal_partitions_per_transaction: int = 8
    pool_size: int = 10
    # A database statement (a commit included) not answered within this many seconds is
    # abandoned (cancelled) and its request answered 503, its outcome unknown and so never
    # acknowledged: what bounds a request while the database hangs (a synchronous standby lost,
    # a primary gone silent) instead of letting it wait forever. Also the connection timeout of
    # each host of a multi-host URL (twinstore.store.connection). Migrations at start are not
    # bounded (they may rebuild indexes of a large journal).
    database_timeout_seconds: float = 30.0
    relay_poll_interval: float = 1.0
    log_level: str = "info"
    # auto: text lines on a terminal, JSON lines otherwise (files, pipes, log collectors); text; json.
    log_format: str = "auto"
    # One info line per HTTP request / WebSocket session on the twinstore.access logger (off:
    # only 5xx and requests slower than a second, at warning level; a line costs ~15 us).
    access_log: bool = False
    # SIGTERM to exit: readiness down, WebSocket/SSE sessions closed, requests and batches in
    # flight finished, NATS drained; a process not done by then exits anyway (status 1).
    shutdown_grace_seconds: float = 25.0
    dev_mode: bool = False
    jwt_issuers: list[JwtIssuer] = msgspec.field(default_factory=list)
    preauth_enabled: bool = False
    preauth_trusted: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    # Reverse proxies (CIDR) whose X-Forwarded-For names the client (for per-client limits and
    # logs); from anyone else the header is ignored. Pre-authentication is judged on the direct
    # peer (the proxy), never on a forwarded address.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    # Paths whose range filters (gt/ge/lt/le) search answers from B-tree indexes, e.g.
    # ["attributes/floor", "features/env/properties/temperature"]; equality needs none.
    search_indexes: list[str] = msgspec.field(default_factory=list)
    # Path of a PEM file with the Ed25519 private key signing `twinstore audit checkpoint`.
    audit_signing_key: str | None = None
    # NATS ingestion (twinstore.ingest): `serve` runs the ingest workers unless disabled.
    ingest_enabled: bool = True
    # source name (the Twinstore-Source header) -> the subjects it writes as (policies decide);
    # a source not listed writes as ingest_default_subjects, or is refused when that is empty.
    ingest_sources: dict[str, list[str]] = msgspec.field(default_factory=dict)
    ingest_default_subjects: list[str] = msgspec.field(default_factory=list)
    ingest_batch: int = 1000
    ingest_max_age_seconds: float = 7 * 24 * 3600.0
    # Anomaly detection (twinstore.anomaly.worker): `serve` scores watched features unless disabled.
    anomaly_enabled: bool = True
    anomaly_checkpoint_every: int = 1000
    anomaly_checkpoint_seconds: float = 1.0
    # Worker processes (`twinstore ingest`, `twinstore anomaly`) serve GET /metrics, /health and
    # /ready on 0.0.0.0:<metrics_port> when set (0: any free port); `serve` has them on its own port.
    metrics_port: int | None = None
    # Days of thing history kept by `twinstore audit cleanup` (none: keep everything).
    history_retention_days: float | None = None

    def __post_init__(self) -> None:
        for name in ("preauth_trusted", "trusted_proxies"):
            for cidr in getattr(self, name):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ValueError(f"{name}: {cidr!r} is not an IP network (CIDR)") from None
        if not 0 <= self.auth_failure_delay_seconds <= 60:
            raise ValueError("auth_failure_delay_seconds must be 0..60")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ValueError("max_connections must be 1..1000000")
        for name in (
            "header_read_timeout_seconds",
            "auth_failure_window_seconds",
            "auth_cache_seconds",
            "jwks_fetch_timeout_seconds",
            "credentials_recheck_seconds",
            "database_timeout_seconds",
        ):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name} must be a number of seconds in (0, 3600]")
        for name in ("auth_failures_per_client", "auth_failures_per_user", "auth_bcrypt_concurrency"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ValueError(f"{name} must be 1..1000000")
        if not 1 <= self.auth_cache_size <= 10_000_000:
            raise ValueError("auth_cache_size must be 1..10000000")
        for path in self.search_indexes:
            if not indexable(tuple(path.strip("/").split("/"))):
                raise ValueError(
                    f"search_indexes: {path!r} must be a path below attributes/ or features/ "
                    "without '*' or array indexes, e.g. 'attributes/floor'"
                )
        if not 1 <= self.max_patch_ops <= 100_000:
            raise ValueError("max_patch_ops must be 1..100000")
        if self.policy_delete_in_use not in ("refuse", "allow"):
            raise ValueError("policy_delete_in_use must be 'refuse' or 'allow'")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be a TCP port 0..65535 (or unset)")
        if self.history_retention_days is not None and not self.history_retention_days > 0:
            raise ValueError("history_retention_days must be a positive number of days (or unset)")
        if self.partitions is not None and not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1..{MAX_PARTITIONS} (or unset: the database's)")
        if not 1 <= self.journal_partitions_per_transaction <= 1024:
            raise ValueError("journal_partitions_per_transaction must be 1..1024")
        if not 1 <= self.nats_replicas <= 5:  # JetStream's own bound
            raise ValueError("nats_replicas must be 1..5 (JetStream keeps a stream on at most 5 servers)")
        if self.nats_url is not None:
            servers(self.nats_url)  # comma-separated servers of one cluster; refuses an empty list
        if not 1 <= self.journal_writers <= 64:
            raise ValueError("journal_writers must be 1..64")
        if not 1 <= self.ingest_batch <= 10_000:
            raise ValueError("ingest_batch must be 1..10000")
        if not 1 <= self.anomaly_checkpoint_every <= 100_000 or not 0 < self.anomaly_checkpoint_seconds <= 60:
            raise ValueError(
                "anomaly_checkpoint_every must be 1..100000 and anomaly_checkpoint_seconds in (0, 60]"
            )
        if not 1024 <= self.max_header_bytes <= 1_048_576:
            raise ValueError("max_header_bytes must be 1024..1048576")
        if not 8 <= self.max_json_depth <= 200:
            raise ValueError("max_json_depth must be 8..200 (JSON deeper than 254 levels cannot be encoded)")
        if self.log_format not in ("auto", "text", "json"):
            raise ValueError("log_format must be auto (text on a terminal, else JSON), text or json")
        if not 1 <= self.shutdown_grace_seconds <= 3600:
            raise ValueError("shutdown_grace_seconds must be 1..3600 (Kubernetes' default grace is 30 s)")
        for source, subjects in self.ingest_sources.items():
            if not source or not subjects:
                raise ValueError(f"ingest_sources: {source!r} needs at least one subject")
        for name in ("rql_max_length", "rql_max_terms", "rql_max_in_values", "ingest_max_rows_per_message"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ValueError(f"{name} must be 1..1000000")
        for name in ("rql_max_depth", "rql_max_sort_fields", "fields_max_count", "fields_max_depth"):
            if not 1 <= getattr(self, name) <= 256:  # deeper nesting would reach Python's recursion limit
                raise ValueError(f"{name} must be 1..256")
        issuers = [i.issuer for i in self.jwt_issuers]
        if len(set(issuers)) != len(issuers):
            raise ValueError("jwt_issuers: each 'issuer' may be configured only once")

    @property
    def query_limits(self) -> QueryLimits:
        """The ``rql_*`` and ``fields_*`` limits, as the parsers take them."""
        return QueryLimits(
            max_length=self.rql_max_length,
            max_depth=self.rql_max_depth,
            max_terms=self.rql_max_terms,
            max_in_values=self.rql_max_in_values,
            max_sort_fields=self.rql_max_sort_fields,
            max_fields=self.fields_max_count,
            max_field_depth=self.fields_max_depth,
        )

    @property
    def search_index_paths(self) -> list[tuple[str, ...]]:
        """``search_indexes`` as field paths (``("attributes", "floor")``)."""
        return [tuple(p.strip("/").split("/")) for p in self.search_indexes]

    @property
    def embedded(self) -> bool:
        """True when no database or NATS is configured: embedded servers are started."""
        return self.database_url is None or self.nats_url is None


_ENV_PREFIX = "TWINSTORE_"
_INT = {f.name for f in msgspec.structs.fields(Settings) if f.type in (int, int | None)}
_FLOAT = {f.name for f in msgspec.structs.fields(Settings) if f.type in (float, float | None)}
_BOOL = {f.name for f in msgspec.structs.fields(Settings) if f.type is bool}
_SCALAR = (str, int, float, bool, str | None, int | None, float | None)
_JSON = {f.name for f in msgspec.structs.fields(Settings) if f.type not in _SCALAR}


def _coerce(name: str, value: str) -> Any:
    if name in _INT:
        return int(value)
    if name in _FLOAT:
        return float(value)
    if name in _BOOL:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if name in _JSON:  # lists and tables: JSON, e.g. TWINSTORE_PREAUTH_TRUSTED='["10.0.0.0/8"]'
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError as exc:
            raise SystemExit(
                f"twinstore: invalid setting: {_ENV_PREFIX}{name.upper()} must be JSON ({exc})"
            ) from exc
    return value


# Settings replaced by another one: refused by name with what replaces it (msgspec would say
# "unknown field", and an environment variable nobody reads would go unnoticed).
_REPLACED = {
    "event_partitions": "partitions",
    "ingest_partitions": "partitions",
}


def _refuse_replaced(where: list[tuple[str, Mapping[str, Any]]], environ: Mapping[str, str]) -> None:
    for old, new in _REPLACED.items():
        found = [origin for origin, values in where if old in values]
        if environ.get(_ENV_PREFIX + old.upper()):
            found.append(f"the environment variable {_ENV_PREFIX}{old.upper()}")
        if found:
            raise SystemExit(
                f"twinstore: invalid setting: {old} (named in {', '.join(found)}) is replaced by "
                f"`{new}`, the one partition count of ingest and events subjects, journal, relay and "
                "anomaly scoring, stored in the database (unset: the database's; "
                f"{DEFAULT_PARTITIONS} for a new one). Remove {old}; see the README, \"Upgrading: "
                "one partition count\", before changing the count."
            )


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    **overrides: Any,
) -> Settings:
    """Merge the config file, the environment and explicit overrides (None is ignored)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(_ENV_PREFIX + "CONFIG")
    file_values: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as fh:
            data = tomllib.load(fh)
        file_values = data.get("twinstore", data)
        values.update(file_values)
    _refuse_replaced([(f"the config file {config_file}", file_values), ("the options", overrides)], environ)
    names = {f.name for f in msgspec.structs.fields(Settings)}
    for name in names:
        raw = environ.get(_ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, Settings)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"twinstore: invalid setting: {exc}") from exc
