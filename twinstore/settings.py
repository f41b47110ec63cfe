"""Settings: defaults < TOML config file < environment (``TWINSTORE_*``) < command line.

Nothing is read or connected at import time.

>>> s = load_settings({"TWINSTORE_PORT": "9000"})
>>> s.port, s.embedded
(9000, True)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["Settings", "load_settings"]


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
    event_partitions: int = 16
    events_max_age_seconds: float = 7 * 24 * 3600.0
    snapshot_every: int = 100
    max_body_bytes: int = 1_048_576
    max_thing_bytes: int = 102_400
    max_batch: int = 512
    pool_size: int = 10
    relay_poll_interval: float = 1.0
    log_level: str = "info"
    log_format: str = "json"
    dev_mode: bool = False

    @property
    def embedded(self) -> bool:
        """True when no database or NATS is configured: embedded servers are started."""
        return self.database_url is None or self.nats_url is None


_ENV_PREFIX = "TWINSTORE_"
_INT = {f.name for f in msgspec.structs.fields(Settings) if f.type is int}
_FLOAT = {f.name for f in msgspec.structs.fields(Settings) if f.type is float}
_BOOL = {f.name for f in msgspec.structs.fields(Settings) if f.type is bool}


def _coerce(name: str, value: str) -> Any:
    if name in _INT:
        return int(value)
    if name in _FLOAT:
        return float(value)
    if name in _BOOL:
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    **overrides: Any,
) -> Settings:
    """Merge the config file, the environment and explicit overrides (None is ignored)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(_ENV_PREFIX + "CONFIG")
    if config_file:
        with open(config_file, "rb") as fh:
            data = tomllib.load(fh)
        values.update(data.get("twinstore", data))
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
