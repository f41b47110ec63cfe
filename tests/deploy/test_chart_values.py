"""values.schema.json and the chart's own checks refuse wrong values, through Helm itself
(`helm template` and `helm lint` fail), and the schema's settings are twinstore's settings."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from twinstore.settings import Settings

from .conftest import CHART, NAMESPACE, RELEASE, helm

# (values, what Helm's message names)
SCHEMA_REFUSES: list[tuple[dict[str, Any], str]] = [
    ({"api": {"replicas": "three"}}, "/api/replicas"),
    ({"ingest": {"replicas": -1}}, "/ingest/replicas"),
    ({"replicaCount": 3}, "replicaCount"),  # unknown top-level key
    ({"api": {"service": {"port": -80}}}, "/api/service/port"),
    ({"api": {"service": {"port": 70000}}}, "/api/service/port"),
    ({"api": {"service": {"type": "ExternalName"}}}, "/api/service/type"),
    ({"metrics": {"port": 0}}, "/metrics/port"),
    ({"api": {"autoscaling": {"enabled": True, "minReplicas": 0}}}, "/api/autoscaling/minReplicas"),
    ({"api": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}}, "targetCPUUtilizationPercentage"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"database": {"existingSecret": {"name": "db", "kee": "uri"}}}, "kee"),
    ({"settings": {"log_level": "verbose"}}, "/settings/log_level"),
    ({"settings": {"partitions": 0}}, "/settings/partitions"),
    ({"settings": {"partitions": 2048}}, "/settings/partitions"),
    (
        {"adapters": [{"name": "plc-1", "type": "opcua", "config": {"partitions": 16}}]},
        "/adapters/0/config",
    ),
    ({"settings": {"anomaly_checkpoint_seconds": 61}}, "/settings/anomaly_checkpoint_seconds"),
    ({"settings": {"search_indexes": ["thingId"]}}, "/settings/search_indexes"),
    ({"settings": {"database_url": "postgresql://db/x"}}, "database_url"),  # a secret: not in the ConfigMap
    ({"settings": {"ingest_sources": {"plc-1": []}}}, "/settings/ingest_sources"),
    ({"auth": {"jwt": {"issuers": [{"issuer": "ci", "prefix": "ci"}]}}}, "/auth/jwt/issuers/0"),
    (
        {
            "auth": {
                "jwt": {"issuers": [{"issuer": "ci", "prefix": "ci", "secret": "s", "jwks_url": "https://x"}]}
            }
        },
        "/auth/jwt/issuers/0",
    ),
    ({"audit": {"signingKey": "not a pem key"}}, "/audit/signingKey"),
    ({"adapters": [{"name": "plc_1", "type": "opcua", "config": {}}]}, "/adapters/0/name"),
    ({"adapters": [{"name": "plc-1", "type": "modbus", "config": {}}]}, "/adapters/0/type"),
    ({"adapters": [{"name": "plc-1", "type": "opcua"}]}, "/adapters/0"),
    (
        {"adapters": [{"name": "plc-1", "type": "opcua", "config": {"spool_dir": "/data"}}]},
        "/adapters/0/config",
    ),
    ({"ingress": {"hosts": [{"host": "x", "paths": [{"path": "api", "pathType": "Prefix"}]}]}}, "path"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
]

# Values the schema accepts but the templates refuse with a message.
TEMPLATE_REFUSES: list[tuple[dict[str, Any], str]] = [
    (
        {"database": {"url": "", "existingSecret": {"name": "", "key": "uri"}}},
        "set database.url or database.existingSecret.name",
    ),
    (
        {"nats": {"url": "", "existingSecret": {"name": "", "key": "url"}}},
        "set nats.url or nats.existingSecret.name",
    ),
    ({"settings": {"shutdown_grace_seconds": 30}}, "must be above settings.shutdown_grace_seconds"),
    ({"anomaly": {"terminationGracePeriodSeconds": 10}}, "anomaly.terminationGracePeriodSeconds"),
    (
        {"api": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}}},
        "set targetCPUUtilizationPercentage",
    ),
    (
        {"ingest": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "maxReplicas must be at least",
    ),
    (
        {
            "nats": {"existingSecret": {"name": "nats-creds", "key": "url"}},
            "adapters": [
                {"name": "plc-1", "type": "opcua", "config": {"opcua": {"endpoint": "opc.tcp://plc:4840"}}}
            ],
        },
        "needs its own nats_url",
    ),
]

# Set by the chart from other values (or secrets), never through `settings`.
CHART_MANAGED = {
    "host",
    "port",
    "workers",
    "data_dir",
    "database_url",
    "nats_url",
    "users_file",
    "jwt_issuers",
    "audit_signing_key",
    "metrics_port",
    "ingest_enabled",
    "anomaly_enabled",
}


@pytest.mark.parametrize(("values", "where"), SCHEMA_REFUSES, ids=[w for _, w in SCHEMA_REFUSES])
def test_schema_refuses(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="values don't meet the specifications") as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(refused.value)
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    assert any(m["severity"] == 3 and where in m["error"] for m in report["messages"]), report


@pytest.mark.parametrize(("values", "message"), TEMPLATE_REFUSES, ids=[m for _, m in TEMPLATE_REFUSES])
def test_template_refuses(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_settings_are_twinstores_settings() -> None:
    """Each key under `settings` is a field of twinstore's Settings, with the same kind of value,
    and each field of Settings is either there or set by the chart: a setting added to
    twinstore/settings.py must be added to values.schema.json (or to CHART_MANAGED here)."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["settings"]["properties"]
    fields = {f.name: f for f in msgspec.structs.fields(Settings)}
    assert set(schema) <= set(fields), f"not twinstore settings: {sorted(set(schema) - set(fields))}"
    missing = set(fields) - set(schema) - CHART_MANAGED
    assert not missing, f"settings neither in values.schema.json nor set by the chart: {sorted(missing)}"
    assert not set(schema) & CHART_MANAGED
    for name, prop in schema.items():
        default = fields[name].default
        if default is msgspec.NODEFAULT or name in ("log_level", "log_format"):
            continue
        value = (
            default if fields[name].default_factory is msgspec.NODEFAULT else fields[name].default_factory()
        )
        # twinstore's default passes the chart's schema for it
        assert _accepts(prop, value), f"settings.{name}: default {value!r} refused by {prop}"


def _accepts(prop: dict[str, Any], value: Any) -> bool:
    if "anyOf" in prop:
        return any(_accepts(p, value) for p in prop["anyOf"])
    kinds = {
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "string": str,
        "array": list,
        "object": dict,
        "null": type(None),
    }
    if "enum" in prop:
        return value in prop["enum"]
    kind = prop["type"]
    if isinstance(value, bool) and kind != "boolean":
        return False
    return isinstance(value, kinds[kind])
