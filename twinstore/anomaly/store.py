"""Anomaly detection in PostgreSQL: detector configs, detector state, the anomalies found.

Tables (migration 10, keys lead with the thing id; each row holds the thing's partition, part of
its key since migration 17, so the scorer of a partition and a label write one partition):

* ``anomaly_detectors``: one config per (thing, feature) — ``{"algorithm", "parameters",
  "properties"}``; ``modified`` changes on every PUT and fences checkpoints of older configs.
* ``anomaly_state``: the last scored revision, the detector's checkpoint, the latest score.
* ``anomalies``: one row per anomalous revision, with an optional operator label.

Config validation uses the detector registry (:func:`twinstore.anomaly.detectors.create`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg

from twinstore.anomaly.detectors import REGISTRY, UnknownDetectorError, create
from twinstore.model.errors import InvalidInputError
from twinstore.store.codec import GENESIS, canonical, storable
from twinstore.store.recorder import Recorder, record

__all__ = [
    "LABELS",
    "DetectorConfigError",
    "decode_cursor",
    "delete_detector",
    "encode_cursor",
    "finite",
    "get_detector",
    "label_anomaly",
    "latest",
    "leaves",
    "list_anomalies",
    "put_detector",
    "validate_config",
]

LABELS = ("confirmed", "false-alarm")

UPSERT_DETECTOR = """
INSERT INTO anomaly_detectors (thing_id, feature_id, config, partition) VALUES ($1, $2, $3, $4)
ON CONFLICT (thing_id, feature_id, partition) DO UPDATE
    SET config = excluded.config, modified = clock_timestamp(),
    rule = NULL  -- the feature's own detector now, not a definition rule's
RETURNING (xmax = 0) AS created
"""
# A new config starts a new detector: the old one's state is dropped with it (same transaction).
DELETE_STATE = "DELETE FROM anomaly_state WHERE thing_id = $1 AND feature_id = $2 AND partition = $3"
SELECT_DETECTOR = """
SELECT config, created, modified FROM anomaly_detectors WHERE thing_id = $1 AND feature_id = $2
"""
DELETE_DETECTOR = "DELETE FROM anomaly_detectors WHERE thing_id = $1 AND feature_id = $2 AND partition = $3"
SELECT_DETECTORS = "SELECT thing_id, feature_id, config, modified FROM anomaly_detectors"
# Changes with every PUT (a newer ``modified``) and DELETE (fewer rows) of a detector or rule.
SELECT_DETECTORS_FINGERPRINT = """
SELECT (SELECT count(*) FROM anomaly_detectors), (SELECT max(modified) FROM anomaly_detectors),
       (SELECT count(*) FROM anomaly_rules), (SELECT max(modified) FROM anomaly_rules)
"""
SELECT_EARLIEST_DETECTOR = "SELECT min(modified) FROM anomaly_detectors"
SELECT_LATEST = """
SELECT s.revision, s.score, s.threshold, s.anomalous, s.scored_at, d.config
FROM anomaly_state s JOIN anomaly_detectors d USING (thing_id, feature_id, partition)
WHERE s.thing_id = $1 AND s.feature_id = $2 AND s.scored_at IS NOT NULL
"""
SELECT_STATE = "SELECT revision, state FROM anomaly_state WHERE thing_id = $1 AND feature_id = $2"
# Written only while the detector is still the one configured at ``modified`` ($9): a replaced
# or deleted detector's last checkpoint never comes back. ``$10``: the thing's partition.
SAVE_STATE = """
INSERT INTO anomaly_state (thing_id, feature_id, revision, state, score, threshold, anomalous, scored_at,
                           partition)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $10
WHERE EXISTS (SELECT 1 FROM anomaly_detectors
              WHERE thing_id = $1 AND feature_id = $2 AND partition = $10 AND modified = $9)
ON CONFLICT (thing_id, feature_id, partition) DO UPDATE SET
    revision = excluded.revision, state = excluded.state, score = excluded.score,
    threshold = excluded.threshold, anomalous = excluded.anomalous, scored_at = excluded.scored_at
"""
INSERT_ANOMALY = """
INSERT INTO anomalies (thing_id, feature_id, revision, ts, score, threshold, contributions, x, partition)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING
"""
# False alarms of a partition no detector has learnt yet (served by the partial index
# anomalies_feedback), and the mark that one was (in the scorer's checkpoint of that partition:
# every statement of it names the partition, so it stays on one shard when distributed).
SELECT_FEEDBACK = """
SELECT thing_id, feature_id, revision, x FROM anomalies
WHERE label = 'false-alarm' AND NOT fed AND partition = $1
ORDER BY thing_id, feature_id, revision
"""
MARK_FED = """
UPDATE anomalies SET fed = true WHERE thing_id = $1 AND feature_id = $2 AND revision = $3 AND partition = $4
"""
SELECT_ANOMALIES = """
SELECT revision, ts, score, threshold, contributions, label, labelled_by, labelled_at FROM anomalies
WHERE thing_id = $1 AND feature_id = $2 AND revision < $3
  AND ts >= coalesce($4, '-infinity'::timestamptz) AND ts < coalesce($5, 'infinity'::timestamptz)
ORDER BY revision DESC LIMIT $6
"""
LABEL_ANOMALY = """
UPDATE anomalies SET label = $4, labelled_by = $5, labelled_at = $6
WHERE thing_id = $1 AND feature_id = $2 AND revision = $3 AND partition = $7
"""
# Labels are journal events of their own entity, ``anomaly`` with id ``<thingId>/<featureId>``,
# hash-chained like every other entity (audit verify and checkpoints cover them).
LABEL_ENTITY = "anomaly"
SELECT_LABEL_HEAD = """
SELECT revision, hash FROM journal WHERE entity = 'anomaly' AND id = $1 AND partition = $2
ORDER BY revision DESC LIMIT 1
"""


class DetectorConfigError(InvalidInputError):
    error = "things:anomaly.detector.invalid"
    description = "Check the algorithm (see the README's Anomaly detection), its parameters and properties."


def validate_config(body: Any) -> dict[str, Any]:
    """A detector config from a request body (400 :class:`DetectorConfigError` when wrong).

    >>> validate_config({"algorithm": "mahalanobis", "parameters": {"warmup": 20}})
    {'algorithm': 'mahalanobis', 'parameters': {'warmup': 20}, 'properties': None, 'feedback': True}
    >>> validate_config({"algorithm": "magic"})
    Traceback (most recent call last):
    ...
    twinstore.anomaly.store.DetectorConfigError: no detector 'magic' (known: ...)
    """
    if not isinstance(body, dict):
        raise DetectorConfigError("The detector must be a JSON object with 'algorithm'.")
    unknown = sorted(set(body) - {"algorithm", "parameters", "properties", "feedback"})
    if unknown:
        raise DetectorConfigError(f"The detector has no field {unknown[0]!r}.")
    algorithm = body.get("algorithm", "mahalanobis")
    if not isinstance(algorithm, str):
        raise DetectorConfigError(f"'algorithm' must be one of: {', '.join(sorted(REGISTRY))}.")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise DetectorConfigError("'parameters' must be a JSON object.")
    properties = body.get("properties")
    if properties is not None and (
        not isinstance(properties, list)
        or not properties
        or not all(isinstance(p, str) and p.strip("/") for p in properties)
    ):
        raise DetectorConfigError("'properties' must be a non-empty list of property paths.")
    try:
        create(algorithm, parameters)
    except UnknownDetectorError as exc:
        raise DetectorConfigError(str(exc)) from None
    if properties is not None:
        properties = [p.strip("/") for p in properties]
    feedback = body.get("feedback", True)
    if not isinstance(feedback, bool):
        raise DetectorConfigError("'feedback' must be true or false.")
    return {"algorithm": algorithm, "parameters": parameters, "properties": properties, "feedback": feedback}


def leaves(properties: Any, selected: list[str] | None = None) -> dict[str, float]:
    """The numeric leaves of a feature's properties by path (``a/b``), or only ``selected``.

    >>> leaves({"t": 1, "nested": {"p": 2.5, "s": "x"}, "on": True})
    {'t': 1.0, 'nested/p': 2.5}
    >>> leaves({"t": 1, "u": 2}, ["u"])
    {'u': 2.0}
    """
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), inner)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)

    walk("", properties)
    if selected is not None:
        return {key: out[key] for key in selected if key in out}
    return out


def finite(value: float | None) -> float | None:
    """JSON has no infinity (a threshold while calibrating): ``None`` instead."""
    return value if value is not None and math.isfinite(value) else None


def encode_cursor(revision: int) -> str:
    return base64.urlsafe_b64encode(f"r{revision}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text[:1] == "r":
            return int(text[1:])
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidInputError(f"The cursor {cursor!r} is not one this API handed out.")


async def put_detector(
    pool: asyncpg.Pool, partition: int, thing_id: str, feature_id: str, config: Mapping[str, Any]
) -> bool:
    """Store the config (a new detector: its old state goes); True when it was created.
    ``partition``: the thing's."""
    async with pool.acquire() as con, con.transaction():
        created = bool(await con.fetchval(UPSERT_DETECTOR, thing_id, feature_id, dict(config), partition))
        await con.execute(DELETE_STATE, thing_id, feature_id, partition)
    return created


async def get_detector(pool: asyncpg.Pool, thing_id: str, feature_id: str) -> asyncpg.Record | None:
    async with pool.acquire() as con:
        return await con.fetchrow(SELECT_DETECTOR, thing_id, feature_id)


async def delete_detector(pool: asyncpg.Pool, partition: int, thing_id: str, feature_id: str) -> bool:
    """Drop the detector and its state (the anomalies found stay listed); False when none.
    ``partition``: the thing's."""
    async with pool.acquire() as con, con.transaction():
        status = await con.execute(DELETE_DETECTOR, thing_id, feature_id, partition)
        await con.execute(DELETE_STATE, thing_id, feature_id, partition)
    return bool(status != "DELETE 0")


async def latest(pool: asyncpg.Pool, thing_id: str, feature_id: str) -> asyncpg.Record | None:
    async with pool.acquire() as con:
        return await con.fetchrow(SELECT_LATEST, thing_id, feature_id)


async def list_anomalies(
    pool: asyncpg.Pool,
    thing_id: str,
    feature_id: str,
    *,
    before: int,
    start: datetime | None,
    end: datetime | None,
    size: int,
) -> list[asyncpg.Record]:
    async with pool.acquire() as con:
        return list(await con.fetch(SELECT_ANOMALIES, thing_id, feature_id, before, start, end, size))


async def label_anomaly(
    pool: asyncpg.Pool,
    recorder: Recorder,
    thing_id: str,
    feature_id: str,
    revision: int,
    label: str,
    who: str,
    correlation_id: str | None = None,
) -> bool:
    """Label the anomaly at ``revision`` and append the label as a journal event (entity
    ``anomaly``, id ``<thingId>/<featureId>``, action ``labelled``, path
    ``/anomalies/<revision>/label``, value ``{"revision", "label"}``), in one transaction under
    the write lock of the thing's journal partition; False (nothing written) when there is no
    such anomaly."""
    entity_id = f"{thing_id}/{feature_id}"
    path = f"/anomalies/{revision}/label"
    value = storable(canonical({"revision": revision, "label": label}))
    partition = recorder.partition(entity_id)
    async with pool.acquire() as con, con.transaction():
        await recorder.lock(con, [partition])
        now = datetime.now(UTC)
        status = await con.execute(LABEL_ANOMALY, thing_id, feature_id, revision, label, who, now, partition)
        if status == "UPDATE 0":
            return False
        head = await con.fetchrow(SELECT_LABEL_HEAD, entity_id, partition)
        previous, number = (bytes(head["hash"]), head["revision"] + 1) if head else (GENESIS, 1)
        entry = record(
            previous, partition, LABEL_ENTITY, entity_id, number, now, "labelled", path, value, who,
            correlation_id,
        )
        await recorder.append(con, [entry])
    return True
