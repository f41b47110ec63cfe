"""Fixtures of the Helm chart tests: the chart rendered by Helm's own engine (PyPI
``helm-python-sdk``: Helm's Go SDK as a shared library, no ``helm`` binary, no cluster)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import helm_python as helm
except ImportError:  # no wheel for this platform: these tests are left out, except in CI
    if os.environ.get("CI"):
        raise
    helm = None
    collect_ignore_glob = ["test_chart*.py"]

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "twinstore"
RELEASE = "plant"
NAMESPACE = "twins"

Manifest = dict[str, Any]


class Rendered:
    """One rendering: the manifests (in file order) and NOTES.txt."""

    def __init__(self, files: dict[str, str]) -> None:
        self.notes = files.pop(f"{CHART.name}/templates/NOTES.txt", "")
        self.objects: list[Manifest] = [
            doc
            for name in sorted(files)
            if name.endswith(".yaml")
            for doc in yaml.safe_load_all(files[name])
            if doc
        ]

    def of(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Manifest:
        found = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"{kind}/{name}: {len(found)} rendered ({[o['metadata']['name'] for o in self.of(kind)]})"
        )
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.of(kind)}


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any) -> Callable[[dict[str, Any]], Rendered]:
    def _render(values: dict[str, Any]) -> Rendered:
        return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))

    return _render
