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

Rules are per owner (the subject that put it first): another caller's rule for the same
definition is not seen and does not stop anyone from putting their own (one caller cannot
reserve a definition for everybody). A feature that several owners' rules could take gets the
detector of the oldest rule (a feature has one detector).
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

SELECT_RULES = "SELECT definition, owner, config, subjects FROM anomaly_rules ORDER BY created, owner"
# The caller's rule of a definition: its own, else one put by a subject the caller shares.
SELECT_RULE = """
SELECT definition, owner, config, subjects, created, modified FROM anomaly_rules
WHERE definition = $1 AND (owner = $2 OR subjects && $3::text[])
ORDER BY owner = $2 DESC, created LIMIT 1
"""
LIST_RULES = """
SELECT definition, owner, config, subjects, created, modified FROM anomaly_rules ORDER BY definition, created
"""
COUNT_ATTACHED = "SELECT count(*) FROM anomaly_detectors WHERE rule = $1 AND rule_owner = $2"
UPSERT_RULE = """
INSERT INTO anomaly_rules (definition, owner, config, subjects) VALUES ($1, $2, $3, $4)
ON CONFLICT (definition, owner) DO UPDATE SET config = excluded.config, subjects = excluded.subjects,
    modified = clock_timestamp()
RETURNING (xmax = 0) AS created
"""
# The rule's detectors get the new config: their state goes (a new detector), as on a PUT. (Joined
# on the partition too: on a database distributed by partition, a join of two tables must be.)
RECONFIGURE = """
WITH changed AS (
    UPDATE anomaly_detectors SET config = $2, modified = clock_timestamp() WHERE rule = $1 AND rule_owner = $3
    RETURNING thing_id, feature_id, partition
)
DELETE FROM anomaly_state s USING changed c
WHERE s.thing_id = c.thing_id AND s.feature_id = c.feature_id AND s.partition = c.partition
"""
DELETE_RULE = "DELETE FROM anomaly_rules WHERE definition = $1 AND owner = $2"
DELETE_RULE_DETECTORS = """
WITH gone AS (
    DELETE FROM anomaly_detectors WHERE rule = $1 AND rule_owner = $2
    RETURNING thing_id, feature_id, partition
)
DELETE FROM anomaly_state s USING gone g
WHERE s.thing_id = g.thing_id AND s.feature_id = g.feature_id AND s.partition = g.partition
"""
# Things with a feature of the definition (a scan: rules are put rarely).
SELECT_CANDIDATES = """
SELECT id, doc FROM things
WHERE doc IS NOT NULL
  AND jsonb_path_exists(doc, '$.features.*.definition[*] ? (@ == $d)', jsonb_build_object('d', $1::text))
"""
# Each detector in its thing's partition (read from the thing's row: a thing deleted meanwhile
# keeps it, and one no longer there gets no detector).
ATTACH = """
INSERT INTO anomaly_detectors (thing_id, feature_id, config, rule, rule_owner, partition)
SELECT r.t, r.f, r.c::jsonb, r.d, r.o, th.partition
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS r(t, f, c, d, o)
JOIN things th ON th.id = r.t
ON CONFLICT (thing_id, feature_id, partition) DO NOTHING
RETURNING 1
"""

# A rule as the scorer keeps it: (config, subjects of who put it, owner).
Rule = tuple[dict[str, Any], tuple[str, ...], str]


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
    rules: dict[str, list[Rule]],
    things: Iterable[tuple[str, dict[str, Any]]],
    has: Callable[[str, str], bool] | None = None,
) -> int:
    """Attach the rules' detectors (definition -> its rules, oldest first) to the features of
    ``things`` (id, document) that have a rule's definition, have no detector yet (``has``, if
    given, says which do) and that the rule's subjects may WRITE; how many were attached."""
    rows: list[tuple[str, str, dict[str, Any], str, str]] = []
    for thing_id, doc in things:
        policy_id = doc.get("policyId")
        if not isinstance(policy_id, str):
            continue
        for feature_id, feature in (doc.get("features") or {}).items():
            if has is not None and has(thing_id, feature_id):
                continue
            found = None
            for definition in definitions(feature):
                for config, subjects, owner in rules.get(definition, ()):
                    view = await cache.view(policy_id, subjects)
                    if view is not None and view.has_unrestricted("thing", ["features", feature_id], WRITE):
                        found = (thing_id, feature_id, config, definition, owner)
                        break
                if found is not None:
                    rows.append(found)
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
    owner: str,
) -> tuple[bool, int]:
    """Store ``owner``'s rule and attach it where it applies now: (created, detectors attached)."""
    async with pool.acquire() as con, con.transaction():
        created = bool(await con.fetchval(UPSERT_RULE, definition, owner, config, list(subjects)))
        await con.execute(RECONFIGURE, definition, config, owner)
        candidates = [(r["id"], r["doc"]) for r in await con.fetch(SELECT_CANDIDATES, definition)]
    attached = await attach(pool, cache, {definition: [(config, subjects, owner)]}, candidates)
    return created, attached


async def get_rule(
    pool: asyncpg.Pool, definition: str, owner: str, subjects: tuple[str, ...]
) -> asyncpg.Record | None:
    """The caller's rule of ``definition`` (its own, else one of a subject it shares), or None."""
    async with pool.acquire() as con:
        return await con.fetchrow(SELECT_RULE, definition, owner, list(subjects))


async def attached(pool: asyncpg.Pool, definition: str, owner: str) -> int:
    """How many features have the rule's detector."""
    async with pool.acquire() as con:
        return int(await con.fetchval(COUNT_ATTACHED, definition, owner))


async def list_rules(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as con:
        return list(await con.fetch(LIST_RULES))


async def delete_rule(pool: asyncpg.Pool, definition: str, owner: str) -> bool:
    """Drop ``owner``'s rule and the detectors it attached (their anomalies stay listed)."""
    async with pool.acquire() as con, con.transaction():
        await con.execute(DELETE_RULE_DETECTORS, definition, owner)
        status = await con.execute(DELETE_RULE, definition, owner)
    return bool(status != "DELETE 0")
