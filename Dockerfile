# syntax=docker/dockerfile:1
# twinstore's image: one image for every role (the Helm chart in deploy/helm/twinstore picks
# the role by arguments: `serve`, `ingest`, `anomaly`, `migrate`, `twinstore-adapter ...`).
#
#   docker build -t twinstore:0.1.0 .
#   docker run --rm twinstore:0.1.0 --help
#   docker run --rm -p 8080:8080 twinstore:0.1.0 serve --host 0.0.0.0   # embedded PostgreSQL + NATS under /tmp
#
# The base is pinned by its exact tag; pin its digest too for reproducible builds
# (docker buildx imagetools inspect python:3.11.13-slim-bookworm) with
# --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- builder: build the wheel, install it with its dependencies into a venv ----------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/twinstore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY twinstore ./twinstore
COPY policies ./policies
COPY adapters ./adapters
RUN /opt/twinstore/bin/pip wheel --no-deps --wheel-dir /tmp/dist . \
 && /opt/twinstore/bin/pip install /tmp/dist/twinstore-*.whl \
 && /opt/twinstore/bin/twinstore --help >/dev/null \
 && /opt/twinstore/bin/twinstore-adapter --help >/dev/null

# ---- final: the same Python, the venv, a non-root user --------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="twinstore" \
      org.opencontainers.image.description="Event-sourced digital-twin backend compatible with the Eclipse Ditto HTTP API v2" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 twinstore \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin twinstore
COPY --from=builder /opt/twinstore /opt/twinstore
# HOME and TMPDIR on /tmp: the chart runs a read-only root filesystem with an emptyDir there.
# Bytecode was compiled at install time; nothing is written next to the code at run time.
ENV PATH=/opt/twinstore/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
# 8080: the HTTP API (serve); 9464: /metrics, /health, /ready of the workers (TWINSTORE_METRICS_PORT).
EXPOSE 8080 9464
ENTRYPOINT ["twinstore"]
CMD ["serve", "--host", "0.0.0.0"]
