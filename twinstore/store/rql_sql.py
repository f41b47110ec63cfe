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

__all__ = ["compile_filter", "compile_order", "order_terms", "parse_filter"]

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


def compile_filter(node: Node, params: list[Any]) -> str:
    """A boolean SQL expression over the columns of ``things``; appends its parameters."""
    match node:
        case And(children):
            return "(" + " AND ".join(compile_filter(c, params) for c in children) + ")"
        case Or(children):
            return "(" + " OR ".join(compile_filter(c, params) for c in children) + ")"
        case Not(child):
            return f"(NOT {compile_filter(child, params)})"
        case Comparison() | In() | Exists():
            field = node.field
            if field[0] in _COLUMNS:
                return _column_leaf(node, params)
            if is_wildcard(field):
                features = "CASE WHEN jsonb_typeof(doc -> 'features') = 'object' THEN doc -> 'features' END"
                inner = _doc_leaf(node, _path("w.value", field[2:], params), params)
                return f"EXISTS (SELECT 1 FROM jsonb_each({features}) AS w WHERE {inner})"
            leaf = _doc_leaf(node, _path("doc", field, params), params)
            if isinstance(node, Comparison) and node.op == "eq":
                prefilter = _containment(field, node.value, params)
                if prefilter:
                    return f"({prefilter} AND {leaf})"
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
