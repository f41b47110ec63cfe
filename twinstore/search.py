"""Search things with RQL (Ditto's ``/api/2/search/things``), seen through the caller's policies.

Search reads the projection, so it sees a write as soon as the write is acknowledged. One query
per page, then the policies:

1. SQL narrows the candidates: things whose policy names one of the caller's subjects among
   its ``readers`` (``policies.readers``, GIN-indexed), in the namespaces asked for, in the
   requested order, after the cursor, matching the filter -- exactly where the policy lets the
   caller read every part of the thing (``policies.full_readers``, the common case: the whole
   search is one indexed query), else a *relaxed* filter;
2. each candidate is cut down to what the caller may read
   (:func:`twinstore.enforcement.readable_thing`) and the whole filter is evaluated on that
   readable part (:func:`twinstore.model.rql.matches`): a filter on a field the caller may not
   read sees it as absent, so hidden values cannot be probed.

The relaxed SQL filter keeps exactly the conditions that a readable part can only satisfy if
the full document does (comparisons, ``exists``, ``and``, ``or``); a condition under ``not``
is dropped (it could hold on the readable part and fail on the whole), so SQL never removes a
thing the policy-aware evaluation would keep.

Paging is by keyset: the cursor holds the sort values of the last thing returned (and the sort
it was made for), so pages stay stable while things are written: no thing is returned twice or
skipped because others were added or removed before it.
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from policies import READ, SubjectView
from twinstore.auth import AuthContext
from twinstore.enforcement import PolicyCache, readable_thing, with_doc
from twinstore.model.errors import InvalidInputError, RqlInvalidError, UnavailableError
from twinstore.model.rql import (
    And,
    Comparison,
    Exists,
    Field,
    In,
    Node,
    Not,
    Or,
    SearchOptions,
    matches,
    parse_filter,
)
from twinstore.model.thing import ThingState
from twinstore.store.rql_sql import compile_filter, order_terms

__all__ = ["Page", "SearchService", "relax"]

log = logging.getLogger("twinstore.search")

_DOC = re.compile(r"\bdoc\b")
# Each thing with its policy's reader columns (aliased: ``id``, ``doc``... stay the thing's).
SOURCE = (
    "things JOIN (SELECT id AS pid, readers, full_readers, read_revokers FROM policies) AS p "
    "ON p.pid = things.policy_id"
)
# The caller ($1: its subjects) reads some part of the thing ...
READS = "p.readers && $1::text[]"
# ... or every part (migration 6: ``full_readers`` / ``read_revokers``): there, SQL decides.
FULL = "(p.full_readers && $1::text[] AND NOT p.read_revokers && $1::text[])"
# The policies that hide something from a caller who reads some part (few, usually): found
# through the GIN indexes on partial_readers and read_revokers, not by scanning all policies.
PARTIAL_POLICIES = (
    "SELECT id FROM policies AS p WHERE (p.partial_readers && $1::text[] OR p.read_revokers && $1::text[]) "
    f"AND {READS} AND NOT {FULL}"
)
BATCH = 200
COUNT_BATCH = 1000
MAX_PARAMETERS = 32_767  # what PostgreSQL's protocol (and asyncpg) take in one statement


def relax(node: Node | None, negated: bool = False) -> Node | None:
    """A filter implied by ``node`` on any sub-document (None: no condition).

    Negations are pushed to the leaves; a negated leaf becomes "no condition".

    >>> relaxed = relax(parse_filter('and(eq(attributes/x,1),not(eq(attributes/y,2)))'))
    >>> relaxed == parse_filter('eq(attributes/x,1)')
    True
    """
    match node:
        case None:
            return None
        case Not(child):
            return relax(child, not negated)
        case And(children) | Or(children):
            conjunction = isinstance(node, And) != negated
            parts = [relax(c, negated) for c in children]
            if conjunction:
                kept = [p for p in parts if p is not None]
                return None if not kept else kept[0] if len(kept) == 1 else And(tuple(kept))
            if any(p is None for p in parts):
                return None
            return Or(tuple(p for p in parts if p is not None))
        case Comparison() | In() | Exists():
            return None if negated else node
    raise AssertionError(node)  # pragma: no cover


@dataclass
class Page:
    """Readable things (``states`` with their readable documents) and the cursor of the next page."""

    states: list[ThingState]
    cursor: str | None
    next_offset: int | None = None  # with limit(offset,count): the next page's offset, -1 at the end


def _encode_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"n": str(value)}
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict) and "n" in value:
        return Decimal(value["n"])
    if isinstance(value, dict) and "t" in value:
        return datetime.fromisoformat(value["t"])
    return value


def _cursor(sort_spec: str, values: list[Any]) -> str:
    raw = orjson.dumps([sort_spec, [_encode_value(v) for v in values]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_DOC_KINDS: list[tuple[type, ...]] = [(int,), (Decimal, type(None)), (str, type(None)), (bool, type(None))]


def _kinds(sort: list[tuple[tuple[str, ...], bool]]) -> list[tuple[type, ...]]:
    """The Python types each term of :func:`order_terms` yields (a cursor must hold exactly these)."""
    kinds: list[tuple[type, ...]] = []
    for field, _ in sort:
        root = field[0]
        if root in ("thingId", "_namespace"):
            kinds.append((str,))
        elif root == "_revision":
            kinds.append((int,))
        elif root in ("_created", "_modified"):
            kinds.append((datetime,))
        else:
            kinds += _DOC_KINDS
    return [*kinds, (str,)]


def _uncursor(cursor: str, sort_spec: str, kinds: list[tuple[type, ...]]) -> list[Any]:
    invalid = InvalidInputError(
        f"The cursor '{cursor[:80]}' is not valid.", error="things:search.option.invalid"
    )
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        spec, values = orjson.loads(raw)
    except Exception:
        raise invalid from None
    if spec != sort_spec:
        raise InvalidInputError(
            "The cursor was made for another sort; give the same sort(...) as the first page.",
            error="things:search.option.invalid",
        )
    try:
        assert isinstance(values, list) and len(values) == len(kinds)
        decoded = [_decode_value(v) for v in values]
        # exact types (a bool is no int): the values become typed SQL parameters
        assert all(type(v) in k for v, k in zip(decoded, kinds, strict=True))
        assert all(-(2**63) <= v < 2**63 for v in decoded if type(v) is int)
        assert all(v.is_finite() for v in decoded if isinstance(v, Decimal))
    except Exception:
        raise invalid from None
    return decoded


def _cast(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, Decimal):
        return "numeric"
    if isinstance(value, datetime):
        return "timestamptz"
    return "text"


def _after(terms: list[tuple[str, bool]], values: list[Any], params: list[Any]) -> str:
    """Rows strictly after ``values`` in the order of ``terms`` (PostgreSQL's NULL placement:
    last when ascending, first when descending)."""

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}::{_cast(value)}"

    ors: list[str] = []
    equal: list[str] = []
    for (expr, ascending), value in zip(terms, values, strict=True):
        if value is None:
            beyond = "false" if ascending else f"({expr}) IS NOT NULL"
            same = f"({expr}) IS NULL"
        else:
            p = param(value)
            beyond = f"(({expr}) > {p} OR ({expr}) IS NULL)" if ascending else f"({expr}) < {p}"
            same = f"({expr}) = {p}"
        ors.append("(" + " AND ".join([*equal, beyond]) + ")")
        equal.append(same)
    return "(" + " OR ".join(ors) + ")"


class SearchService:
    """Search and count over the projection, filtered by policies."""

    def __init__(
        self, pool: asyncpg.Pool, cache: PolicyCache, indexed: frozenset[Field] = frozenset()
    ) -> None:
        self.pool = pool
        self.cache = cache
        self.indexed = indexed  # paths with search indexes (settings.search_indexes)

    async def _query(self, sql: str, params: list[Any]) -> list[asyncpg.Record]:
        """Rows of ``sql``, planned for these parameters.

        asyncpg caches prepared statements, and PostgreSQL switches a cached statement to a
        generic plan after five executions: blind to whether a filter matches one thing or
        half of them, or whether the caller reads everything, it can walk the whole table
        (seen: 300 ms instead of 1 ms). Search statements are always planned for their values.
        """
        if len(params) > MAX_PARAMETERS:  # rql_max_terms keeps ordinary filters far below
            raise RqlInvalidError(
                "Invalid RQL: the filter and sort need more than "
                f"{MAX_PARAMETERS} parameters; use fewer terms or shallower fields."
            )
        try:
            async with self.pool.acquire() as con, con.transaction(readonly=True):
                await con.execute("SET LOCAL plan_cache_mode = force_custom_plan")
                return list(await con.fetch(sql, *params))
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            # The driver's text is for the operator: the client learns only that it may retry.
            log.warning("search: database not reachable: %s", exc, extra={"error": type(exc).__name__})
            raise UnavailableError("The database is not reachable; retry later.") from exc

    def _where(
        self,
        auth: AuthContext,
        node: Node | None,
        namespaces: list[str] | None,
        params: list[Any],
        scope: str | list[str] = "all",
    ) -> list[str]:
        """Conditions on :data:`SOURCE` for the candidates of a search: readable by the caller,
        in ``namespaces``, matching ``node`` -- exactly where the caller reads every part of the
        thing (:data:`FULL`), relaxed where its policy hides something from the caller.
        ``scope`` "full" keeps only the former; a list of policy ids (the caller's
        :data:`PARTIAL_POLICIES`) only the things of those policies."""
        params.append(list(auth.subjects))
        where = ["doc IS NOT NULL", READS]
        if namespaces is not None:
            params.append(namespaces)
            where.append(f"split_part(id, ':', 1) = any(${len(params)}::text[])")
        if scope == "full":
            where.append(FULL)
        elif isinstance(scope, list):
            params.append(scope)
            where.append(f"policy_id = any(${len(params)}::text[])")
        if node is None:
            return where
        relaxed = relax(node)
        if scope == "full" or (scope == "all" and relaxed == node):
            where.append(compile_filter(node, params, self.indexed))  # exact for all candidates
            return where
        if relaxed is not None:  # the indexable part, implied by the filter on any readable part
            where.append(compile_filter(relaxed, params, self.indexed))
        if scope == "all":
            where.append(f"(NOT {FULL} OR {compile_filter(node, params, self.indexed)})")
        return where

    async def _partial_policies(self, auth: AuthContext) -> list[str]:
        """Ids of the policies under which the caller reads some, not every, part of a thing."""
        return [r["id"] for r in await self._query(PARTIAL_POLICIES, [list(auth.subjects)])]

    async def _views(self, auth: AuthContext, rows: list[asyncpg.Record]) -> dict[str, SubjectView | None]:
        enforcers = await self.cache.enforcers(list({r["policy_id"] for r in rows if r["policy_id"]}))
        return {pid: None if e is None else e.view(auth.subjects) for pid, e in enforcers.items()}

    @staticmethod
    def _visible(
        row: asyncpg.Record, views: dict[str, SubjectView | None], node: Node | None
    ) -> ThingState | None:
        state = ThingState(
            thing_id=row["id"],
            revision=row["revision"],
            created=row["created"],
            modified=row["modified"],
            doc=row["doc"],
        )
        readable = readable_thing(views.get(row["policy_id"]), state)
        if readable is None:
            return None
        if node is not None and not matches(node, readable, state.meta):
            return None
        return with_doc(state, readable)

    async def _sort_doc(
        self, auth: AuthContext, sort: list[tuple[tuple[str, ...], bool]], params: list[Any]
    ) -> str | None:
        """``doc`` without the sort fields the caller may not read, as a SQL expression (None: all
        readable), so that a hidden value sorts as absent and its order cannot be probed.

        A field counts as readable when READ is effective at its path (its value, or for an
        object its readable part, is what the caller sees); otherwise it is removed. Only
        policies that hide something from the caller (``PARTIAL``) are looked at.
        """
        paths = [list(f) for f, _ in sort if f[0] in ("attributes", "features", "policyId", "definition")]
        if not paths:
            return None
        enforcers = await self.cache.enforcers(await self._partial_policies(auth))
        views = {pid: e.view(auth.subjects) for pid, e in enforcers.items() if e is not None}
        expr = "doc"
        for path in paths:
            hidden = [pid for pid, v in views.items() if not v.has_permission("thing", path, READ)]
            if hidden:
                params.append(hidden)
                params.append(path)
                n = len(params)  # deleting the empty path changes nothing
                gone = f"CASE WHEN policy_id = any(${n - 1}::text[]) THEN ${n}::text[] ELSE '{{}}' END"
                expr = f"({expr}) #- ({gone})"
        return None if expr == "doc" else expr

    async def search(
        self,
        auth: AuthContext,
        filter_text: str | None,
        namespaces: list[str] | None,
        options: SearchOptions,
    ) -> Page:
        """One page of readable matching things in the requested order."""
        node = parse_filter(filter_text) if filter_text else None
        params: list[Any] = []
        where = self._where(auth, node, namespaces, params)
        terms = order_terms(options.sort, params)
        masked = await self._sort_doc(auth, options.sort, params)
        source = SOURCE
        if masked is not None:  # sort values the caller may not read sort as absent
            terms = [(_DOC.sub("sdoc", expr), asc) for expr, asc in terms]
            source = f"{SOURCE} CROSS JOIN LATERAL (SELECT {masked} AS sdoc) AS s"
        sort_spec = ",".join(("+" if asc else "-") + "/".join(f) for f, asc in options.sort)
        keys = ", ".join(f"{expr} AS k{i}" for i, (expr, _) in enumerate(terms))
        order = ", ".join(f"{expr} {'ASC' if asc else 'DESC'}" for expr, asc in terms)
        after = _uncursor(options.cursor, sort_spec, _kinds(options.sort)) if options.cursor else None
        found: list[tuple[ThingState, list[Any]]] = []
        skip = options.offset or 0  # limit(offset,count): matches read and passed over
        want = skip + options.size
        limit = min(want + 1, BATCH)  # enough when the caller reads every match; then batches
        while True:
            batch_params = list(params)
            conditions = list(where)
            if after is not None:
                conditions.append(_after(terms, after, batch_params))
            sql = (
                f"SELECT id, revision, created, modified, doc, policy_id, {keys} FROM {source} "
                f"WHERE {' AND '.join(conditions)} ORDER BY {order} LIMIT {limit}"
            )
            rows = await self._query(sql, batch_params)
            views = await self._views(auth, rows)
            for row in rows:
                visible = self._visible(row, views, node)
                if visible is not None:
                    found.append((visible, [row[f"k{i}"] for i in range(len(terms))]))
                    if len(found) > want:
                        return self._page(found[skip:want], sort_spec, options, more=True)
            if len(rows) < limit:
                return self._page(found[skip:], sort_spec, options, more=False)
            after = [rows[-1][f"k{i}"] for i in range(len(terms))]
            limit = BATCH

    @staticmethod
    def _page(
        found: list[tuple[ThingState, list[Any]]], sort_spec: str, options: SearchOptions, more: bool
    ) -> Page:
        states = [s for s, _ in found]
        if options.offset is not None:
            return Page(states, None, options.offset + options.size if more else -1)
        return Page(states, _cursor(sort_spec, found[-1][1]) if more else None)

    async def count(self, auth: AuthContext, filter_text: str | None, namespaces: list[str] | None) -> int:
        """How many things the caller may read match the filter (Ditto's ``/search/things/count``).

        Things whose every part the caller reads are counted in SQL; the others are cut down to
        their readable part and evaluated, as :meth:`search` does.
        """
        node = parse_filter(filter_text) if filter_text else None
        params: list[Any] = []
        where = self._where(auth, node, namespaces, params, scope="full")
        rows = await self._query(f"SELECT count(*) AS n FROM {SOURCE} WHERE {' AND '.join(where)}", params)
        total = int(rows[0]["n"])
        partial = await self._partial_policies(auth)
        if not partial:
            return total
        params = []
        where = self._where(auth, node, namespaces, params, scope=partial)
        after: str | None = None
        while True:
            batch_params = list(params)
            conditions = list(where)
            if after is not None:
                batch_params.append(after)
                conditions.append(f'id COLLATE "C" > ${len(batch_params)}::text')
            sql = (
                f"SELECT id, revision, created, modified, doc, policy_id FROM {SOURCE} "
                f'WHERE {" AND ".join(conditions)} ORDER BY id COLLATE "C" LIMIT {COUNT_BATCH}'
            )
            rows = await self._query(sql, batch_params)
            views = await self._views(auth, rows)
            total += sum(1 for row in rows if self._visible(row, views, node) is not None)
            if len(rows) < COUNT_BATCH:
                return total
            after = rows[-1]["id"]
