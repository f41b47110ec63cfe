"""The README's "Production values" sketch, taken from README.md as it is, renders with the chart
(Helm's own engine), lints cleanly and validates strictly: the documented values stay true."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from adapters.base import forwarder_from_config
from adapters.mqtt import MqttAdapter

from .conftest import CHART, NAMESPACE, RELEASE, Rendered, helm

README = Path(__file__).resolve().parents[2] / "README.md"


def production_values() -> dict[str, Any]:
    """The first YAML block after the README's "**Production values**" paragraph."""
    text = README.read_text()
    start = text.index("**Production values**")
    block = re.search(r"```yaml\n(.*?)```", text[start:], re.S)
    assert block is not None, "no YAML block after **Production values** in README.md"
    values = yaml.safe_load(block.group(1))
    assert isinstance(values, dict) and values
    return values


def test_readme_production_values_render(render: Callable[[dict[str, Any]], Rendered]) -> None:
    values = production_values()
    r = render(values)  # a failing template (`fail`) raises here
    kinds = {o["kind"] for o in r.objects}
    assert {"Deployment", "StatefulSet", "HorizontalPodAutoscaler", "Ingress", "NetworkPolicy"} <= kinds
    for o in r.objects:
        if o["kind"] == "ServiceMonitor":
            continue  # a CRD: kubernetes-validate has no schema for it (test_chart checks its fields)
        kubernetes_validate.validate(o, "1.30", strict=True)
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert [m for m in report["messages"] if m["severity"] >= 2] == [] and report["errors"] == []
    assert "WARNING" not in r.notes  # the adapter's source is mapped in settings.ingest_sources
    # the adapter's own configuration code accepts what the chart wrote from the sketch
    secret = r.get("Secret", f"{RELEASE}-twinstore-adapter-plant-mqtt")["data"]["config.yaml"]
    config = yaml.safe_load(base64.b64decode(secret))
    assert config["source"] == "plant-mqtt" and config["nats_url"].startswith("nats://")
    MqttAdapter(config, forwarder_from_config(config, "mqtt"))
