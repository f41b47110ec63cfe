"""The container build file (Dockerfile at the repository root) and what the chart expects of
the image: read as Docker reads it (continuation lines joined, comments dropped); building it
needs a Docker daemon and the base image's registry, which tests do not have."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, rest = text.partition(" ")
        lines.append((keyword.upper(), rest.strip()))
    return lines


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def test_multi_stage_on_a_pinned_base() -> None:
    args = dict(rest.split("=", 1) for keyword, rest in instructions()[:1] if keyword == "ARG")
    base = args["PYTHON_IMAGE"]
    # an exact Python patch release on Debian bookworm, never a moving tag like 3.11-slim
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    builder, final = stages()
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")  # the venv's interpreter is the same Python
    build = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "pip wheel" in build and "pip install /tmp/dist/twinstore-" in build
    assert ("COPY", "--from=builder /opt/twinstore /opt/twinstore") in final
    assert not any(keyword == "COPY" and "--from" not in rest for keyword, rest in final), (
        "sources stay in the builder"
    )


def test_runs_as_the_charts_non_root_user() -> None:
    final = stages()[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users == ["10001:10001"]
    keywords = [keyword for keyword, _ in final]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"] == [["twinstore"]]
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    # a read-only root filesystem: home and temporary files on the chart's /tmp emptyDir
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    values = yaml.safe_load((ROOT / "deploy/helm/twinstore/values.yaml").read_text())
    assert values["securityContext"]["runAsUser"] == values["podSecurityContext"]["runAsUser"] == 10001
    exposed = {int(p) for keyword, rest in final if keyword == "EXPOSE" for p in rest.split()}
    assert exposed == {values["api"]["service"]["port"], values["metrics"]["port"]}


def test_build_context_holds_only_the_package() -> None:
    ignore = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    # every COPY source of the builder (all but the last word, the destination)
    copied = {p.rstrip("/") for keyword, rest in stages()[0] if keyword == "COPY" for p in rest.split()[:-1]}
    assert copied <= allowed, copied - allowed
    # everything setuptools packages is in the context (pyproject's packages.find include)
    assert {"twinstore", "policies", "adapters", "pyproject.toml", "README.md"} <= allowed
