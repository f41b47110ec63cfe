"""RQL (``twinstore.model.rql``) compiled to SQL over the ``things`` table, same semantics.

The WHERE fragment reads the columns ``id``, ``revision``, ``created``, ``modified`` and
``doc``; every user value travels as a ``$n`` parameter (appended to ``params``), never as
SQL text. Each leaf is two-valued (``IS TRUE`` / ``CASE ... ELSE false``), so ``not`` of an
absent field is true exactly as in :func:`twinstore.model.rql.matches`.

>>> params: list[object] = []
>>> compile_filter(parse_filter('eq(thingId,"a:b")'), params), params
('(id = $1::text)', ['a:b'])
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from decimal import Decimal
from typing import Any

from twinstore.model.rql import (
    And,
    Comparison,
    Exists,
    Field,
    In,
    Node,
    Not,
    Or,
    Value,
    is_wildcard,
    parse_filter,
)

__all__ = [
    "compile_filter",
    "compile_order",
    "index_statements",
    "order_terms",
    "parse_filter",
    "statistics_statements",
]

_SQL_OPS = {"eq": "=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
# `#>` indexes arrays with integer-looking segments (even negative ones); paths walk objects only,
# so such a segment is read only when its parent is an object.
_INDEX_LIKE = re.compile(r"[+-]?[0-9]+")


def _param(params: list[Any], value: Any, cast: str) -> str:
    params.append(value)
    return f"${len(params)}::{cast}"


def _path(base: str, parts: Field, params: list[Any]) -> str:
    """The jsonb at ``parts`` below ``base`` (SQL NULL when absent), walking objects only."""
    if not parts:
        return base
    guards = [
        f"jsonb_typeof({base} #> {_param(params, list(parts[:i]), 'text[]')}) = 'object'"
        if i
        else f"jsonb_typeof({base}) = 'object'"
        for i, part in enumerate(parts)
        if _INDEX_LIKE.fullmatch(part)
    ]
    value = f"({base} #> {_param(params, list(parts), 'text[]')})"
    return f"(CASE WHEN {' AND '.join(guards)} THEN {value} END)" if guards else value


def _like(op: str, text: str, literal: Value, params: list[Any]) -> str:
    """``*`` / ``?`` patterns as LIKE patterns (``%``, ``_`` and ``\\`` escaped); ILIKE under
    ``COLLATE "C"`` folds ASCII letters only, as :func:`twinstore.model.rql.matches` does."""
    assert isinstance(literal, str)
    pattern = literal.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = pattern.replace("*", "%").replace("?", "_")
    kw = "ILIKE" if op == "ilike" else "LIKE"
    return f'{text} COLLATE "C" {kw} {_param(params, pattern, "text")}'


def _scalar(op: str, x: str, literal: Value, params: list[Any]) -> str:
    """``op`` on one jsonb value ``x`` (not unwrapped): false on absence or another type."""
    if literal is None:
        return f"(jsonb_typeof({x}) = 'null') IS TRUE"
    if op in ("like", "ilike"):
        kind, cond = "string", _like(op, f"({x} #>> '{{}}')", literal, params)
    elif isinstance(literal, bool):
        kind, cond = "boolean", f"({x})::boolean = {_param(params, literal, 'boolean')}"
    elif isinstance(literal, Decimal):
        kind, cond = "number", f"({x})::numeric {_SQL_OPS[op]} {_param(params, literal, 'numeric')}"
    else:
        text = f"({x} #>> '{{}}') COLLATE \"C\""
        kind, cond = "string", f"{text} {_SQL_OPS[op]} {_param(params, literal, 'text')}"
    # CASE, not AND: the cast must only run on a value of the right type
    return f"CASE WHEN jsonb_typeof({x}) = '{kind}' THEN {cond} ELSE false END"


def _any(op: str, v: str, literal: Value, params: list[Any]) -> str:
    """``op`` on the jsonb ``v``, through any element when it is an array."""
    return (
        f"CASE WHEN jsonb_typeof({v}) = 'array' THEN EXISTS (SELECT 1 FROM jsonb_array_elements({v}) "
        f"AS e(x) WHERE {_scalar(op, 'e.x', literal, params)}) ELSE {_scalar(op, v, literal, params)} END"
    )


# ---- configured search indexes (``search_indexes``): ranges on chosen paths -----------------
#
# GIN (migration 5) answers equality; a range needs a B-tree on the value. For each configured
# path there is one expression index on its numbers, one on its strings (code point order) and a
# partial index on the things where the path holds an array (compared element-wise, which no
# B-tree answers). A range on such a path compiles to "number (or string) op value, OR it is an
# array and an element matches" -- a BitmapOr of two indexes. The expressions below are the
# only spelling of those values: the planner matches them to the indexes textually, so the path
# is a constant here (from configuration, never from a request).


def path_constant(parts: Field) -> str:
    """``parts`` as a SQL ``text[]`` constant.

    >>> print(path_constant(("attributes", 'we"ird')))
    '{"attributes","we\\"ird"}'::text[]
    """
    items = ",".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
    return "'{" + items.replace("'", "''") + "}'::text[]"


def _number_at(path: str) -> str:
    return f"(CASE WHEN jsonb_typeof(doc #> {path}) = 'number' THEN (doc #> {path})::numeric END)"


def _text_at(path: str) -> str:
    return f"((CASE WHEN jsonb_typeof(doc #> {path}) = 'string' THEN doc #>> {path} END) COLLATE \"C\")"


def _array_at(path: str) -> str:
    return f"jsonb_typeof(doc #> {path}) = 'array'"


def indexable(parts: Field) -> bool:
    """Whether a path can have a search index (walks objects only: no index-like segments)."""
    return (
        bool(parts)
        and parts[0] in ("attributes", "features")
        and not any(_INDEX_LIKE.fullmatch(p) or p == "*" for p in parts)
    )


def index_statements(parts: Field) -> dict[str, str]:
    """The indexes of a configured search path: ``{name: CREATE INDEX CONCURRENTLY ...}``."""
    assert indexable(parts), parts
    path = path_constant(parts)
    stem = "things_sx_" + hashlib.sha1("/".join(parts).encode()).hexdigest()[:16]
    return {
        f"{stem}_n": f"CREATE INDEX CONCURRENTLY {stem}_n ON things (({_number_at(path)}))",
        f"{stem}_s": f"CREATE INDEX CONCURRENTLY {stem}_s ON things (({_text_at(path)}))",
        f"{stem}_a": f"CREATE INDEX CONCURRENTLY {stem}_a ON things (id) WHERE {_array_at(path)}",
    }


def statistics_statements(parts: Field) -> dict[str, str]:
    """Statistics on the JSON type at a configured search path, so that the planner knows how
    rare arrays are there (without them it guesses 0.5 %, and may walk the table in id order
    for a range that matches a handful of things)."""
    path = path_constant(parts)
    stem = "things_sx_" + hashlib.sha1("/".join(parts).encode()).hexdigest()[:16]
    return {f"{stem}_t": f"CREATE STATISTICS {stem}_t ON (jsonb_typeof(doc #> {path})) FROM things"}


def _range_key(node: Node, indexed: frozenset[Field]) -> tuple[Field, bool] | None:
    """(path, is-number) when ``node`` is a range an index of ``indexed`` answers, else None."""
    if (
        isinstance(node, Comparison)
        and node.op in ("gt", "ge", "lt", "le")
        and node.field in indexed
        and isinstance(node.value, Decimal | str)
    ):
        return node.field, isinstance(node.value, Decimal)
    return None


def _indexed_ranges(nodes: list[Comparison], params: list[Any]) -> str:
    """The conjunction of ``nodes`` (ranges on one configured path, all numbers or all strings)
    in the indexes' terms: one index range scan (``ge(x,1)`` and ``lt(x,5)`` together), or the
    path holds an array whose elements satisfy each condition (any element, per condition).

    Only where NULL counts as false (outside any ``not``): the scalar comparison is NULL, not
    false, on another type.
    """
    path = path_constant(nodes[0].field)
    value = _number_at(path) if isinstance(nodes[0].value, Decimal) else _text_at(path)
    cast = "numeric" if isinstance(nodes[0].value, Decimal) else "text"
    scalar = " AND ".join(f"{value} {_SQL_OPS[n.op]} {_param(params, n.value, cast)}" for n in nodes)
    elements = " AND ".join(_any(n.op, _path("doc", n.field, params), n.value, params) for n in nodes)
    return f"(({scalar}) OR ({_array_at(path)} AND {elements}))"


def _containment(parts: Field, literal: Value, params: list[Any]) -> str | None:
    """A GIN-indexable condition implied by ``eq(parts, literal)`` (None when there is none)."""
    if any(_INDEX_LIKE.fullmatch(p) for p in parts):
        return None
    scalar: Any = str(literal) if isinstance(literal, Decimal) else literal
    literal_json = json.dumps(scalar) if not isinstance(literal, Decimal) else scalar

    def nest(inner: str) -> str:
        for part in reversed(parts):
            inner = f"{{{json.dumps(part)}:{inner}}}"
        return inner

    a = _param(params, nest(literal_json), "text::jsonb")
    b = _param(params, nest(f"[{literal_json}]"), "text::jsonb")
    return f"(doc @> {a} OR doc @> {b})"


def _doc_leaf(node: Comparison | In | Exists, v: str, params: list[Any]) -> str:
    match node:
        case Exists():
            return f"({v} IS NOT NULL)"
        case In(_, literals):
            return "(" + " OR ".join(_any("eq", v, lit, params) for lit in literals) + ")"
        case Comparison("ne", _, literal):
            return f"({v} IS NOT NULL AND NOT ({_any('eq', v, literal, params)}))"
        case Comparison(op, _, literal):
            return f"({_any(op, v, literal, params)})"
    raise AssertionError(node)  # pragma: no cover


_COLUMNS = {
    "thingId": "id",
    "_namespace": "split_part(id, ':', 1)",
    "_revision": "revision",
    "_created": "created",
    "_modified": "modified",
}


def _column_leaf(node: Comparison | In | Exists, params: list[Any]) -> str:
    root = node.field[0]
    col = _COLUMNS[root]
    if isinstance(node, Exists):
        return f"({col} IS NOT NULL)"

    def eq_or(op: str, literal: Value) -> str:
        if op in ("like", "ilike"):
            return f"({_like(op, col, literal, params)}) IS TRUE"
        if isinstance(literal, datetime):
            return f"({col} {_SQL_OPS[op]} {_param(params, literal, 'timestamptz')}) IS TRUE"
        if isinstance(literal, Decimal):
            return f"({col}::numeric {_SQL_OPS[op]} {_param(params, literal, 'numeric')}) IS TRUE"
        if op == "eq":  # equality needs no collation: the indexes on id / namespace apply
            return f"({col} = {_param(params, literal, 'text')})"
        return f'({col} COLLATE "C" {_SQL_OPS[op]} {_param(params, literal, "text")})'

    match node:
        case In(_, literals):
            return "(" + " OR ".join(eq_or("eq", lit) for lit in literals) + ")"
        case Comparison("ne", _, literal):
            return f"({col} IS NOT NULL AND NOT {eq_or('eq', literal)})"
        case Comparison(op, _, literal):
            return eq_or(op, literal)
    raise AssertionError(node)  # pragma: no cover


def compile_filter(
    node: Node, params: list[Any], indexed: frozenset[Field] = frozenset(), positive: bool = True
) -> str:
    """A boolean SQL expression over the columns of ``things``; appends its parameters.

    Ranges on ``indexed`` paths (see :func:`index_statements`) use those indexes where they
    are not under a ``not`` (``positive``).
    """
    match node:
        case And(children) if positive and indexed:
            ranges: dict[tuple[Field, bool], list[Comparison]] = {}
            parts: list[str | tuple[Field, bool]] = []
            for c in children:
                key = _range_key(c, indexed)
                if key is None:
                    parts.append(compile_filter(c, params, indexed, positive))
                    continue
                if key not in ranges:
                    parts.append(key)
                ranges.setdefault(key, []).append(c)  # type: ignore[arg-type]
            return (
                "("
                + " AND ".join(p if isinstance(p, str) else _indexed_ranges(ranges[p], params) for p in parts)
                + ")"
            )
        case And(children):
            return "(" + " AND ".join(compile_filter(c, params, indexed, positive) for c in children) + ")"
        case Or(children):
            return "(" + " OR ".join(compile_filter(c, params, indexed, positive) for c in children) + ")"
        case Not(child):
            return f"(NOT {compile_filter(child, params, indexed, not positive)})"
        case Comparison() | In() | Exists():
            field = node.field
            if field[0] in _COLUMNS:
                return _column_leaf(node, params)
            if positive and _range_key(node, indexed) is not None:
                assert isinstance(node, Comparison)
                return _indexed_ranges([node], params)
            if is_wildcard(field):
                features = "CASE WHEN jsonb_typeof(doc -> 'features') = 'object' THEN doc -> 'features' END"
                inner = _doc_leaf(node, _path("w.value", field[2:], params), params)
                return f"EXISTS (SELECT 1 FROM jsonb_each({features}) AS w WHERE {inner})"
            leaf = _doc_leaf(node, _path("doc", field, params), params)
            literals = [node.value] if isinstance(node, Comparison) and node.op == "eq" else []
            if isinstance(node, In):
                literals = list(node.values)
            prefilters = [_containment(field, literal, params) for literal in literals]
            if prefilters and all(prefilters):
                return f"(({' OR '.join(p for p in prefilters if p)}) AND {leaf})"
            return leaf
    raise AssertionError(node)  # pragma: no cover


def order_terms(sort: list[tuple[Field, bool]], params: list[Any]) -> list[tuple[str, bool]]:
    """The ORDER BY terms for ``sort`` as (expression, ascending), ending with ``id`` ascending.

    Ascending: absent < null < numbers < strings (code point) < booleans < arrays, objects;
    descending is the exact reverse (see :func:`twinstore.model.rql.sort_key`). Search pages by
    keyset over these terms (where PostgreSQL puts NULL last ascending, first descending).
    """
    terms: list[tuple[str, bool]] = []
    for field, ascending in sort:
        root = field[0]
        if root in ("thingId", "_namespace"):
            terms.append((f'{_COLUMNS[root]} COLLATE "C"', ascending))
        elif root == "_revision":
            terms.append(("revision", ascending))
        elif root in ("_created", "_modified"):  # absent first ascending, last descending
            terms.append((f"coalesce({_COLUMNS[root]}, '-infinity'::timestamptz)", ascending))
        else:
            v = _path("doc", field, params)
            t = f"jsonb_typeof({v})"
            terms += [
                (
                    f"CASE WHEN {v} IS NULL THEN 0 WHEN {t} = 'null' THEN 1 WHEN {t} = 'number' THEN 2 "
                    f"WHEN {t} = 'string' THEN 3 WHEN {t} = 'boolean' THEN 4 WHEN {t} = 'array' THEN 5 "
                    "ELSE 6 END",
                    ascending,
                ),
                (f"CASE WHEN {t} = 'number' THEN ({v})::numeric END", ascending),
                (f"CASE WHEN {t} = 'string' THEN ({v} #>> '{{}}') COLLATE \"C\" END", ascending),
                (f"CASE WHEN {t} = 'boolean' THEN ({v})::boolean END", ascending),
            ]
    terms.append(('id COLLATE "C"', True))
    return terms


def compile_order(sort: list[tuple[Field, bool]], params: list[Any]) -> str:
    """An ORDER BY list for ``sort`` (field, ascending), ending with ``id`` as the tiebreaker."""
    return ", ".join(f"{expr} {'ASC' if asc else 'DESC'}" for expr, asc in order_terms(sort, params))
