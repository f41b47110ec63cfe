"""JetStream streams of twinstore: one way to declare them (created, or updated, at start).

Every stream is file-stored, limits-retained for ``max_age`` seconds, deduplicates
``Nats-Msg-Id`` over two minutes and is kept on ``replicas`` servers of a JetStream cluster
(the ``nats_replicas`` setting). The durable consumers twinstore creates on them leave their
own replica count unset (0), which JetStream reads as the stream's: they survive a server
loss as the stream does. An existing stream is brought to the configured count (JetStream
adds or removes peers).
"""

from __future__ import annotations

import nats.js
import nats.js.api
import nats.js.errors

__all__ = ["DUPLICATE_WINDOW", "delete_streams", "ensure_stream"]

DUPLICATE_WINDOW = 120.0


async def ensure_stream(
    js: nats.js.JetStreamContext,
    name: str,
    subjects: list[str],
    max_age_seconds: float,
    replicas: int = 1,
) -> None:
    """Create the stream ``name`` over ``subjects``, or bring an existing one to this config."""
    config = nats.js.api.StreamConfig(
        name=name,
        subjects=subjects,
        storage=nats.js.api.StorageType.FILE,
        retention=nats.js.api.RetentionPolicy.LIMITS,
        max_age=max_age_seconds,
        duplicate_window=DUPLICATE_WINDOW,
        num_replicas=replicas,
    )
    try:
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)
    except nats.js.errors.APIError as exc:
        if replicas > 1:  # the usual cause: a single server, or a cluster smaller than replicas
            raise RuntimeError(
                f"JetStream refused the stream {name} with {replicas} replicas ({exc}); note that "
                f"nats_replicas={replicas} needs a JetStream cluster of at least {replicas} servers"
            ) from exc
        raise


async def delete_streams(js: nats.js.JetStreamContext, prefix: str) -> list[str]:
    """Delete every stream twinstore makes for ``prefix`` (events, ingest, ingest errors), e.g.
    after a test or a benchmark; the names of those that existed."""
    base = prefix.upper().replace(".", "_")
    deleted = []
    for name in (f"{base}_EVENTS", f"{base}_INGEST", f"{base}_INGEST_ERRORS"):
        try:
            await js.delete_stream(name)
            deleted.append(name)
        except nats.js.errors.NotFoundError:
            pass
    return deleted
