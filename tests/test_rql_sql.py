"""RQL compiled to SQL selects exactly the things ``matches`` accepts, on real PostgreSQL.

Each example writes its things into a temporary copy of ``things`` (dropped at commit, so the
pooled connection keeps no state) and compares the ids the WHERE fragment selects with the ids
for which the in-memory evaluation is true; the same for ORDER BY against ``sort_key``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from twinstore.model.rql import (
    And,
    Comparison,
    Exists,
    Field,
    In,
    Node,
    Not,
    Or,
    fields_of,
    matches,
    parse_filter,
    sort_key,
)
from twinstore.runtime import Runtime
from twinstore.store.rql_sql import (
    compile_filter,
    compile_order,
    index_statements,
    indexable,
    statistics_statements,
)
from twinstore.store.schema import ensure_search_indexes

CREATE = "CREATE TEMP TABLE things_t (LIKE things) ON COMMIT DROP"
INSERT = """
INSERT INTO things_t (id, revision, created, modified, policy_id, doc, hash, partition)
VALUES ($1, $2, $3, $4, $5, $6, '', 0)
"""

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TIMES = [T0 + timedelta(seconds=s) for s in (0, 1, 60)] + [T0 + timedelta(microseconds=1)]
KEYS = ["a", "b", "0", "-1", "é"]
STRINGS = ["", "a", "A", "b", "ab", "aB", "Ab", "ä", "Ä", "😀", "a%_\\", "10", "a*?", "Z", "ns.a"]
NUMBERS = [0, 1, -1, 2, 0.5, -1.5, 1.0, 2.0, 1e16, 9007199254740993, 1e-7, 3]

chars = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    st.sampled_from(STRINGS),
    st.text(chars, max_size=3),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=8,
)
objects = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4)
feature = st.one_of(
    st.fixed_dictionaries({}, optional={"properties": objects | json_values, "definition": json_values}),
    json_values,
)
features = st.dictionaries(st.sampled_from(["f", "g", "h"]), feature, max_size=3)


@st.composite
def things(draw: st.DrawFn) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(doc, meta) pairs with unique thing ids."""
    n = draw(st.integers(0, 6))
    result = []
    for i in range(n):
        ns = draw(st.sampled_from(["ns.a", "ns.b", "Ns", "ns"]))
        doc: dict[str, Any] = {"thingId": f"{ns}:{i}"}
        optional = {
            "policyId": st.sampled_from(["ns.a:p", "ns.b:p", "a"]) | json_values,
            "definition": st.sampled_from(["a:b:1", "ab"]) | json_values,
            "attributes": objects | json_values,
            "features": features | json_values,
        }
        for key, strategy in optional.items():
            if draw(st.booleans()):
                doc[key] = draw(strategy)
        meta = {
            "_revision": draw(st.integers(1, 4)),
            "_created": draw(st.none() | st.sampled_from(TIMES)),
            "_modified": draw(st.sampled_from(TIMES)),
        }
        result.append((doc, meta))
    return result


DOC_FIELDS: list[Field] = [
    ("policyId",),
    ("definition",),
    ("attributes",),
    ("attributes", "a"),
    ("attributes", "a", "b"),
    ("attributes", "0"),
    ("attributes", "a", "0"),
    ("attributes", "b", "-1"),
    ("attributes", "é"),
    ("features",),
    ("features", "f"),
    ("features", "f", "properties", "a"),
    ("features", "g", "properties", "b", "a"),
    ("features", "f", "definition"),
    ("features", "*"),
    ("features", "*", "properties"),
    ("features", "*", "properties", "a"),
    ("features", "*", "properties", "0"),
]
doc_literals = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(NUMBERS).map(lambda n: Decimal(repr(n))),
    st.sampled_from(["0.50", "1e16", "-0", "1.000000000000000000001"]).map(Decimal),
    st.sampled_from(STRINGS),
)
ordered_literals = st.sampled_from(NUMBERS).map(lambda n: Decimal(repr(n))) | st.sampled_from(STRINGS)
patterns = st.sampled_from(["*", "a*", "?", "*a*", "A?", "%", "_", "*\\", "a%_\\", "?*?", "*B", ""])


def leaf(field: Field) -> st.SearchStrategy[Node]:
    root = field[0]
    if root in ("_created", "_modified"):
        lit: st.SearchStrategy[Any] = st.sampled_from(TIMES)
        ordered, like = lit, False
    elif root == "_revision":
        lit = ordered = st.integers(0, 5).map(Decimal)
        like = False
    elif root in ("thingId", "_namespace"):
        lit = ordered = st.sampled_from(["ns.a:0", "ns.b:1", "ns.a", "Ns", "ns", "ns.b", "a"])
        like = True
    else:
        lit, ordered, like = doc_literals, ordered_literals, True
    options: list[st.SearchStrategy[Node]] = [
        st.builds(Exists, st.just(field)),
        st.builds(Comparison, st.sampled_from(["eq", "ne"]), st.just(field), lit),
        st.builds(Comparison, st.sampled_from(["gt", "ge", "lt", "le"]), st.just(field), ordered),
        st.builds(In, st.just(field), st.lists(lit, min_size=1, max_size=3).map(tuple)),
    ]
    if like:
        options.append(st.builds(Comparison, st.sampled_from(["like", "ilike"]), st.just(field), patterns))
    return st.one_of(options)


COLUMN_FIELDS: list[Field] = [("thingId",), ("_namespace",), ("_revision",), ("_created",), ("_modified",)]
leaves = st.sampled_from(DOC_FIELDS + COLUMN_FIELDS).flatmap(leaf)
filters = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda c: And(tuple(c))),
        st.lists(inner, min_size=1, max_size=3).map(lambda c: Or(tuple(c))),
        inner.map(Not),
    ),
    max_leaves=5,
)


INDEXED = frozenset(f for f in DOC_FIELDS if indexable(f))


async def select_ids(
    runtime: Runtime,
    rows: list[tuple[dict[str, Any], dict[str, Any]]],
    where: str,
    params: list[Any],
    order: str,
) -> list[str]:
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con, con.transaction():
        await con.execute(CREATE)
        await con.executemany(
            INSERT,
            [
                (
                    doc["thingId"],
                    meta["_revision"],
                    meta["_created"],
                    meta["_modified"],
                    doc["policyId"] if isinstance(doc.get("policyId"), str) else None,
                    doc,
                )
                for doc, meta in rows
            ],
        )
        records = await con.fetch(f"SELECT id FROM things_t WHERE {where} ORDER BY {order}", *params)
    return [r["id"] for r in records]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=things(), node=filters)
async def test_sql_selects_what_matches_accepts(runtime: Runtime, rows: Any, node: Node) -> None:
    expected = sorted((doc["thingId"] for doc, meta in rows if matches(node, doc, meta)), key=str)
    # plain, and with every path indexed (ranges compile to the search indexes' expressions)
    for indexed in (frozenset(), INDEXED):
        params: list[Any] = []
        where = compile_filter(node, params, indexed)
        got = await select_ids(runtime, rows, where, params, 'id COLLATE "C"')
        assert got == expected, where
    event("selected: " + ("none" if not got else "all" if len(got) == len(rows) else "some"))


SORT_FIELDS: list[Field] = [f for f in DOC_FIELDS if "*" not in f] + COLUMN_FIELDS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=things(), sort=st.lists(st.tuples(st.sampled_from(SORT_FIELDS), st.booleans()), max_size=3))
async def test_order_by_agrees_with_sort_key(runtime: Runtime, rows: Any, sort: Any) -> None:
    params: list[Any] = []
    got = await select_ids(runtime, rows, "true", params, compile_order(sort, params))
    ordered = sorted(rows, key=lambda r: r[0]["thingId"])
    for field, ascending in reversed(sort):  # stable sorts, last key first

        def key(row: tuple[dict[str, Any], dict[str, Any]], field: Field = field) -> tuple[Any, ...]:
            return sort_key(field, row[0], row[1])

        ordered.sort(key=key, reverse=not ascending)
    assert got == [doc["thingId"] for doc, _ in ordered]


MIXED: list[dict[str, Any]] = [
    {"thingId": "t:absent"},
    {"thingId": "t:null", "attributes": {"x": None}},
    {"thingId": "t:num-small", "attributes": {"x": -2.5}},
    {"thingId": "t:num-big", "attributes": {"x": 10}},
    {"thingId": "t:str-B", "attributes": {"x": "B"}},
    {"thingId": "t:str-a", "attributes": {"x": "a"}},
    {"thingId": "t:false", "attributes": {"x": False}},
    {"thingId": "t:true", "attributes": {"x": True}},
    {"thingId": "t:array", "attributes": {"x": [1]}},
    {"thingId": "t:object", "attributes": {"x": {}}},
]
META: dict[str, Any] = {"_revision": 1, "_created": T0, "_modified": T0}


async def test_mixed_type_sort_order(runtime: Runtime) -> None:
    rows = [(doc, META) for doc in reversed(MIXED)]
    params: list[Any] = []
    up = await select_ids(runtime, rows, "true", params, compile_order([(("attributes", "x"), True)], params))
    assert up == [d["thingId"] for d in MIXED]
    params = []
    down = await select_ids(
        runtime, rows, "true", params, compile_order([(("attributes", "x"), False)], params)
    )
    assert down == [d["thingId"] for d in reversed(MIXED)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('eq(attributes/x,"a")', ["t:str-a"]),
        (
            "ne(attributes/x,10)",
            ["t:array", "t:false", "t:null", "t:num-small", "t:object", "t:str-B", "t:str-a", "t:true"],
        ),
        (
            "not(eq(attributes/x,10))",
            [
                "t:absent",
                "t:array",
                "t:false",
                "t:null",
                "t:num-small",
                "t:object",
                "t:str-B",
                "t:str-a",
                "t:true",
            ],
        ),
        ("eq(attributes/x,1)", ["t:array"]),
        ("eq(attributes/x,null)", ["t:null"]),
        ("exists(attributes/x)", sorted(d["thingId"] for d in MIXED[1:])),
        ("gt(attributes/x,-3)", ["t:array", "t:num-big", "t:num-small"]),
        ('lt(attributes/x,"a")', ["t:str-B"]),
        ('ilike(attributes/x,"b")', ["t:str-B"]),
        ('in(attributes/x,true,10,"B")', ["t:num-big", "t:str-B", "t:true"]),
        ('like(thingId,"t:str-?")', ["t:str-B", "t:str-a"]),
        ('eq(_namespace,"t")', sorted(d["thingId"] for d in MIXED)),
    ],
)
async def test_examples(runtime: Runtime, text: str, expected: list[str]) -> None:
    node = parse_filter(text)
    rows = [(doc, META) for doc in MIXED]
    params: list[Any] = []
    got = await select_ids(runtime, rows, compile_filter(node, params), params, 'id COLLATE "C"')
    assert got == expected
    assert got == sorted(d["thingId"] for d in MIXED if matches(node, d, META))
    assert fields_of(node)


@pytest.mark.parametrize("text", ['eq(attributes/a/b,"x")', 'in(attributes/a/b,"x",2,null)'])
async def test_eq_and_in_on_a_plain_path_use_the_gin_index(runtime: Runtime, text: str) -> None:
    params: list[Any] = []
    where = compile_filter(parse_filter(text), params)
    assert "doc @> $" in where
    assert runtime.pool is not None
    async with runtime.pool.acquire() as con, con.transaction():
        await con.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            r[0] for r in await con.fetch(f"EXPLAIN SELECT id FROM things WHERE {where}", *params)
        )
    assert "things_doc" in plan and "Seq Scan" not in plan, plan


async def test_ranges_on_configured_paths_use_the_search_indexes(runtime: Runtime) -> None:
    """``search_indexes``: created and dropped to match the configuration; a range on such a
    path (numbers, strings, through arrays too) is answered from them, not by a scan."""
    assert runtime.pool is not None
    floor, name = ("attributes", "floor"), ("features", "env", "properties", "name")
    async with runtime.pool.acquire() as con:
        created = await ensure_search_indexes(con, [floor, name])
        expected = [*index_statements(floor), *index_statements(name)]
        expected += [*statistics_statements(floor), *statistics_statements(name)]
        assert sorted(created) == sorted(expected)
        assert await ensure_search_indexes(con, [floor, name]) == []  # idempotent
        for text in ("gt(attributes/floor,40)", 'le(features/env/properties/name,"m")'):
            params: list[Any] = []
            where = compile_filter(parse_filter(text), params, frozenset([floor, name]))
            async with con.transaction():
                await con.execute("SET LOCAL enable_seqscan = off")
                plan = "\n".join(
                    r[0] for r in await con.fetch(f"EXPLAIN SELECT id FROM things WHERE {where}", *params)
                )
            assert "BitmapOr" in plan and "things_sx_" in plan and "Seq Scan" not in plan, plan
            # under not(...) the two-valued form is kept (NULL must not leak through NOT)
            negated = compile_filter(parse_filter(f"not({text})"), [], frozenset([floor, name]))
            assert "BitmapOr" not in negated and "CASE WHEN jsonb_typeof" in negated
        assert await ensure_search_indexes(con, [floor]) == []
        left = await con.fetch("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'things_sx_%'")
        assert sorted(r[0] for r in left) == sorted(index_statements(floor))
        await ensure_search_indexes(con, [])
        assert not await con.fetch("SELECT 1 FROM pg_indexes WHERE indexname LIKE 'things_sx_%'")
        assert not await con.fetch("SELECT 1 FROM pg_statistic_ext WHERE stxname LIKE 'things_sx_%'")
