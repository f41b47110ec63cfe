"""Detectors for every feature with a given definition (``/api/2/anomaly/definitions/{definition}``).

A rule is a detector config for a feature definition (Ditto's ``definition`` of a feature: a list
of identifiers such as ``org.acme:pump:1.0.0``), stored with the subjects of who put it. It
attaches that config, as a per-feature detector marked with the rule (``anomaly_detectors.rule``),
to every feature that has the definition **and** that the rule's subjects may WRITE:

* at once, to the features that have it when the rule is put (one scan of the things);
* later, by the scoring worker, to a feature that gets it (a thing created, a feature or its
  definition written): the event that brings the definition is the first one scored.

A per-feature ``PUT .../anomaly/detector`` replaces the rule's detector of that feature (the rule
no longer manages it); deleting the rule removes the detectors it attached. Only a caller who
shares a subject with the rule's subjects may replace or delete it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import asyncpg

from policies import WRITE
from twinstore.enforcement import PolicyCache
from twinstore.store.codec import dumps

__all__ = [
    "SELECT_RULES",
    "attach",
    "attached",
    "definitions",
    "delete_rule",
    "get_rule",
    "list_rules",
    "put_rule",
]

SELECT_RULES = "SELECT definition, config, subjects FROM anomaly_rules"
SELECT_RULE = (
    "SELECT definition, config, subjects, created, modified FROM anomaly_rules WHERE definition = $1"
)
LIST_RULES = "SELECT definition, config, subjects, created, modified FROM anomaly_rules ORDER BY definition"
COUNT_ATTACHED = "SELECT count(*) FROM anomaly_detectors WHERE rule = $1"
UPSERT_RULE = """
INSERT INTO anomaly_rules (definition, config, subjects) VALUES ($1, $2, $3)
ON CONFLICT (definition) DO UPDATE SET config = excluded.config, subjects = excluded.subjects,
    modified = clock_timestamp()
RETURNING (xmax = 0) AS created
"""
# The rule's detectors get the new config: their state goes (a new detector), as on a PUT.
RECONFIGURE = """
WITH changed AS (
    UPDATE anomaly_detectors SET config = $2, modified = clock_timestamp() WHERE rule = $1
    RETURNING thing_id, feature_id
)
DELETE FROM anomaly_state s USING changed c WHERE s.thing_id = c.thing_id AND s.feature_id = c.feature_id
"""
DELETE_RULE = "DELETE FROM anomaly_rules WHERE definition = $1"
DELETE_RULE_DETECTORS = """
WITH gone AS (DELETE FROM anomaly_detectors WHERE rule = $1 RETURNING thing_id, feature_id)
DELETE FROM anomaly_state s USING gone g WHERE s.thing_id = g.thing_id AND s.feature_id = g.feature_id
"""
# Things with a feature of the definition (a scan: rules are put rarely).
SELECT_CANDIDATES = """
SELECT id, doc FROM things
WHERE doc IS NOT NULL
  AND jsonb_path_exists(doc, '$.features.*.definition[*] ? (@ == $d)', jsonb_build_object('d', $1::text))
"""
ATTACH = """
INSERT INTO anomaly_detectors (thing_id, feature_id, config, rule)
SELECT t, f, c::jsonb, d FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS r(t, f, c, d)
ON CONFLICT (thing_id, feature_id) DO NOTHING
RETURNING 1
"""


def definitions(feature: Any) -> list[str]:
    """A feature's definition identifiers (Ditto: a list of strings).

    >>> definitions({"definition": ["org.acme:pump:1.0.0"], "properties": {}})
    ['org.acme:pump:1.0.0']
    >>> definitions({"properties": {}}), definitions("x")
    ([], [])
    """
    if not isinstance(feature, dict):
        return []
    value = feature.get("definition")
    return [d for d in value if isinstance(d, str)] if isinstance(value, list) else []


async def attach(
    pool: asyncpg.Pool,
    cache: PolicyCache,
    rules: dict[str, tuple[dict[str, Any], tuple[str, ...]]],
    things: Iterable[tuple[str, dict[str, Any]]],
    has: Callable[[str, str], bool] | None = None,
) -> int:
    """Attach the rules' detectors (definition -> (config, subjects)) to the features of
    ``things`` (id, document) that have a rule's definition, have no detector yet (``has``, if
    given, says which do) and that the rule's subjects may WRITE; how many were attached."""
    rows: list[tuple[str, str, dict[str, Any], str]] = []
    for thing_id, doc in things:
        policy_id = doc.get("policyId")
        if not isinstance(policy_id, str):
            continue
        for feature_id, feature in (doc.get("features") or {}).items():
            if has is not None and has(thing_id, feature_id):
                continue
            for definition in definitions(feature):
                rule = rules.get(definition)
                if rule is None:
                    continue
                view = await cache.view(policy_id, rule[1])
                if view is not None and view.has_unrestricted("thing", ["features", feature_id], WRITE):
                    rows.append((thing_id, feature_id, rule[0], definition))
                    break
    if not rows:
        return 0
    columns = [list(c) for c in zip(*rows, strict=True)]
    columns[2] = [dumps(c) for c in columns[2]]
    async with pool.acquire() as con:
        return len(await con.fetch(ATTACH, *columns))


async def put_rule(
    pool: asyncpg.Pool,
    cache: PolicyCache,
    definition: str,
    config: dict[str, Any],
    subjects: tuple[str, ...],
) -> tuple[bool, int]:
    """Store the rule and attach it where it applies now: (created, detectors attached)."""
    async with pool.acquire() as con, con.transaction():
        created = bool(await con.fetchval(UPSERT_RULE, definition, config, list(subjects)))
        await con.execute(RECONFIGURE, definition, config)
        candidates = [(r["id"], r["doc"]) for r in await con.fetch(SELECT_CANDIDATES, definition)]
    attached = await attach(pool, cache, {definition: (config, subjects)}, candidates)
    return created, attached


async def get_rule(pool: asyncpg.Pool, definition: str) -> asyncpg.Record | None:
    async with pool.acquire() as con:
        return await con.fetchrow(SELECT_RULE, definition)


async def attached(pool: asyncpg.Pool, definition: str) -> int:
    """How many features have the rule's detector."""
    async with pool.acquire() as con:
        return int(await con.fetchval(COUNT_ATTACHED, definition))


async def list_rules(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as con:
        return list(await con.fetch(LIST_RULES))


async def delete_rule(pool: asyncpg.Pool, definition: str) -> bool:
    """Drop the rule and the detectors it attached (their anomalies stay listed)."""
    async with pool.acquire() as con, con.transaction():
        await con.execute(DELETE_RULE_DETECTORS, definition)
        status = await con.execute(DELETE_RULE, definition)
    return bool(status != "DELETE 0")
