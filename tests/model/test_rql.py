"""RQL parsing, in-memory evaluation and option parsing (no database)."""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinstore.model.errors import InvalidInputError, RqlInvalidError
from twinstore.model.fields import parse_fields
from twinstore.model.rql import (
    MAX_DEPTH,
    And,
    Comparison,
    Exists,
    Glob,
    In,
    Not,
    Or,
    QueryLimits,
    SearchOptions,
    configure,
    fields_of,
    limits,
    matches,
    parse_condition,
    parse_filter,
    parse_options,
    sort_key,
)

DOC: dict[str, Any] = {
    "thingId": "org.acme:pump-1",
    "policyId": "org.acme:policy",
    "definition": "org.acme:pump:1.0",
    "attributes": {
        "manufacturer": "ACME",
        "serial": 42,
        "ratio": 0.5,
        "active": True,
        "note": None,
        "tags": ["a", "b", 3],
        "location": {"room": "kitchen", "floor": 2},
        "quote": 'say "hi" \\ bye',
        "unicode": "Grüße 😀",
    },
    "features": {
        "temp": {"properties": {"value": 21.5, "unit": "C"}, "desiredProperties": {"value": 20}},
        "humidity": {"properties": {"value": 40}},
    },
}
META = {
    "_revision": 7,
    "_created": datetime(2024, 1, 1, tzinfo=UTC),
    "_modified": datetime(2024, 6, 1, 12, tzinfo=UTC),
}


def m(text: str, doc: dict[str, Any] = DOC) -> bool:
    return matches(parse_filter(text), doc, META)


@pytest.mark.parametrize(
    "text",
    [
        'eq(attributes/manufacturer,"ACME")',
        "eq(attributes/serial,42)",
        "eq(attributes/serial,42.0)",
        "eq(attributes/serial,4.2e1)",
        "eq(attributes/ratio,0.50)",
        "eq(attributes/active,true)",
        "eq(attributes/note,null)",
        'eq(attributes/tags,"b")',
        "eq(attributes/tags,3)",
        'eq(attributes/location/room,"kitchen")',
        'eq(/attributes/location/room,"kitchen")',
        "ne(attributes/serial,43)",
        'ne(attributes/serial,"42")',
        "gt(attributes/serial,41)",
        "ge(attributes/serial,42)",
        "lt(attributes/ratio,1)",
        "le(attributes/ratio,0.5)",
        "gt(attributes/serial,-1e3)",
        'gt(attributes/manufacturer,"AB")',
        'lt(attributes/manufacturer,"a")',
        'like(thingId,"org.acme:*")',
        'like(attributes/manufacturer,"A?ME")',
        'like(attributes/manufacturer,"*CM*")',
        'ilike(attributes/manufacturer,"acme")',
        'like(attributes/tags,"?")',
        'in(attributes/serial,1,2,42,"x")',
        'in(thingId,"x:y","org.acme:pump-1")',
        "exists(attributes/location)",
        "exists(attributes/note)",
        "exists(features/temp/desiredProperties)",
        "exists(features/*/properties/unit)",
        "gt(features/*/properties/value,30)",
        'eq(features/*/properties/unit,"C")',
        'eq(_namespace,"org.acme")',
        "eq(_revision,7)",
        "gt(_revision,6.5)",
        'gt(_modified,"2024-06-01T11:00:00Z")',
        'eq(_created,"2024-01-01T00:00:00")',
        'lt(_created,"2024-01-01T01:00:00+00:30")',
        "exists(_created)",
        'eq(policyId,"org.acme:policy")',
        'like(definition,"org.acme:pump:*")',
        'eq(attributes/quote,"say \\"hi\\" \\\\ bye")',
        "eq(attributes/quote,'say \"hi\" \\\\ bye')",
        'eq(attributes/unicode,"Grüße 😀")',
        'and(eq(attributes/serial,42),or(eq(thingId,"x:y"),exists(features/temp)))',
        "not(eq(attributes/serial,1))",
        "not(eq(attributes/missing,1))",
        "not(not(exists(thingId)))",
        " and ( eq ( attributes/serial , 42 ) , exists( thingId ) ) ",
    ],
)
def test_matching(text: str) -> None:
    assert m(text), text


@pytest.mark.parametrize(
    "text",
    [
        'eq(attributes/manufacturer,"acme")',
        'eq(attributes/serial,"42")',
        "eq(attributes/active,1)",
        "eq(attributes/serial,true)",
        "eq(attributes/missing,null)",
        "ne(attributes/missing,1)",
        "ne(attributes/serial,42)",
        "ne(attributes/tags,3)",
        "gt(attributes/serial,42)",
        'gt(attributes/serial,"1")',
        'lt(attributes/manufacturer,"1")',
        "lt(attributes/note,1)",
        'like(attributes/serial,"*")',
        'like(attributes/manufacturer,"acme")',
        'like(attributes/manufacturer,"A?E")',
        'ilike(attributes/unicode,"GRÜSSE*")',
        "in(attributes/serial,1,2)",
        "exists(attributes/nothing)",
        "exists(attributes/location/room/x)",
        "exists(attributes/tags/0)",
        "gt(features/*/properties/value,50)",
        "exists(features/*/properties/none)",
        'eq(_namespace,"org")',
        "eq(_revision,8)",
        'lt(_created,"2023-12-31T23:59:59Z")',
        "and(eq(attributes/serial,42),eq(attributes/serial,43))",
        "or(eq(attributes/serial,1),eq(attributes/serial,2))",
        "not(exists(thingId))",
    ],
)
def test_not_matching(text: str) -> None:
    assert not m(text), text


def test_ne_and_not_differ_on_absence() -> None:
    assert not m("ne(attributes/owner,1)")
    assert m("not(eq(attributes/owner,1))")


def test_wildcard_is_some_feature() -> None:
    # ne over a wildcard: some feature whose value exists and differs
    assert m("ne(features/*/properties/value,40)")
    assert not m("ne(features/*/properties/value,40)", {"features": {"h": {"properties": {"value": 40}}}})
    assert not m("exists(features/*)", {"features": {}})
    assert not m("exists(features/*)", {"features": [1]})
    assert m("exists(features/*)", {"features": {"x": None}})


def test_like_escapes_regex_characters() -> None:
    doc = {"attributes": {"a": "a.b(c)[d]+%_"}}
    assert m('like(attributes/a,"a.b(c)[d]+%_")', doc)
    assert not m('like(attributes/a,"aXb*")', doc)
    assert m('like(attributes/a,"*%_")', doc)
    assert m('like(attributes/a,"a?b*")', doc)
    assert m('like(attributes/a,"*")', {"attributes": {"a": "line\nbreak"}})


def test_meta_absent_without_meta() -> None:
    node = parse_filter("exists(_revision)")
    assert not matches(node, DOC)
    assert matches(parse_filter('eq(_namespace,"org.acme")'), DOC)


def test_ast_shapes_and_precedence() -> None:
    node = parse_filter(
        'or(and(eq(a/b,1),ne(attributes/c,"x")),not(exists(features/f)))'.replace("a/b", "attributes/b")
    )
    assert node == Or(
        (
            And(
                (
                    Comparison("eq", ("attributes", "b"), Decimal(1)),
                    Comparison("ne", ("attributes", "c"), "x"),
                )
            ),
            Not(Exists(("features", "f"))),
        )
    )
    assert parse_filter("in(attributes/x,1,'a',null,false)") == In(
        ("attributes", "x"), (Decimal(1), "a", None, False)
    )
    assert parse_filter('eq(_modified,"2024-01-01T00:00:00Z")').value == datetime(2024, 1, 1, tzinfo=UTC)  # type: ignore[union-attr]
    assert parse_filter("eq(attributes/x,-1.5E-3)").value == Decimal("-0.0015")  # type: ignore[union-attr]


def test_fields_of() -> None:
    node = parse_filter('and(eq(attributes/a,1),or(exists(features/*/properties/x),not(like(thingId,"a*"))))')
    assert fields_of(node) == {("attributes", "a"), ("features", "*", "properties", "x"), ("thingId",)}


INVALID = [
    ("eq(attributes/a 1)", 16, "expected ','"),
    ("eq(attributes/a,1", 17, "expected ')'"),
    ("foo(attributes/a,1)", 0, "unknown operator 'foo'"),
    ("eq(attributes/a,abc)", 16, "unknown value"),
    ('eq(attributes/a,"abc)', 16, "unterminated string"),
    ('eq(attributes/a,"a\\nb")', 18, "unknown escape"),
    ("eq(nope,1)", 3, "unknown field"),
    ("eq(thingId/x,1)", 3, "no sub-fields"),
    ("eq(attributes//a,1)", 3, "empty segment"),
    ("eq(attributes/a,1))", 18, "unexpected text"),
    ("and()", 4, "expected an operator"),
    ("not(eq(attributes/a,1),eq(attributes/b,2))", 22, "expected ')'"),
    ("gt(attributes/a,true)", 16, "numbers or strings"),
    ("lt(attributes/a,null)", 16, "numbers or strings"),
    ("like(attributes/a,1)", 18, "string pattern"),
    ("like(_revision,'1')", 15, "string pattern"),
    ("eq(thingId,1)", 11, "'thingId' compares with a string"),
    ("eq(_revision,'1')", 13, "'_revision' compares with a number"),
    ('eq(_created,"yesterday")', 12, "ISO-8601"),
    ("eq(attributes/a,01)", 17, "expected ')'"),
    ("eq(attributes/a,1e99999)", 16, "out of range"),
    ("exists()", 7, "expected a field"),
    ("in(attributes/a)", 15, "expected ','"),
    ("", 0, "expected an operator"),
    ("eq(attributes/a,\x00)", 16, "NUL"),
]


@pytest.mark.parametrize(("text", "position", "message"), INVALID)
def test_invalid_filters_name_the_position(text: str, position: int, message: str) -> None:
    with pytest.raises(RqlInvalidError) as info:
        parse_filter(text)
    assert f"position {position}" in str(info.value)
    assert message in str(info.value)
    assert isinstance(info.value, InvalidInputError)
    assert info.value.to_dict()["status"] == 400
    assert info.value.to_dict()["error"] == "rql.expression.invalid"


def test_depth_and_length_limits() -> None:
    deep = "not(" * MAX_DEPTH + "exists(thingId)" + ")" * MAX_DEPTH
    with pytest.raises(RqlInvalidError, match="nesting deeper"):
        parse_filter(deep)
    ok = "not(" * (MAX_DEPTH - 1) + "exists(thingId)" + ")" * (MAX_DEPTH - 1)
    assert not matches(parse_filter(ok), DOC)  # 31 negations of true
    with pytest.raises(RqlInvalidError, match="longer than"):
        parse_filter("in(attributes/a" + ",1" * 40_000 + ")")


@given(st.text(max_size=40))
def test_parser_never_crashes(text: str) -> None:
    try:
        parse_filter(text)
    except RqlInvalidError as e:
        assert re.search(r"position \d+", str(e))


@given(st.text(alphabet="aeqnotrxis(),/\"'1 .-*?\\", max_size=30))
def test_parser_never_crashes_near_the_grammar(text: str) -> None:
    try:
        node = parse_filter(text)
    except RqlInvalidError:
        return
    matches(node, DOC, META)


# ---- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, SearchOptions()),
        ("", SearchOptions()),
        ("size(10)", SearchOptions(size=10)),
        ("size(200)", SearchOptions(size=200)),
        ("sort(+thingId)", SearchOptions(sort=[(("thingId",), True)])),
        (
            "sort(-attributes/x,+_modified),size(1)",
            SearchOptions(sort=[(("attributes", "x"), False), (("_modified",), True)], size=1),
        ),
        ("cursor(AbC-_12),size(5)", SearchOptions(size=5, cursor="AbC-_12")),
        (" size( 3 ) , sort( thingId ) ", SearchOptions(sort=[(("thingId",), True)], size=3)),
        ("limit( 40 , 20 )", SearchOptions(size=20, offset=40)),
    ],
)
def test_options(text: str | None, expected: SearchOptions) -> None:
    assert parse_options(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limit(0,0)", "count of limit must be a number from 1 to 200"),
        ("limit(10)", "between the offset and count"),
        ("limit(10001,5)", "offset of limit must be a number from 0 to 10000"),
        ("limit(0,10),size(5)", "cannot be combined"),
        ("cursor(abc),limit(0,10)", "cannot be combined"),
        ("size(0)", "from 1 to 200"),
        ("size(201)", "from 1 to 200"),
        ("size(x)", "from 1 to 200"),
        ("sort()", "expected a field"),
        ("sort(+features/*/properties/x)", "wildcard"),
        ("sort(+nope)", "unknown field"),
        ("size(1),size(2)", "given twice"),
        ("bogus(1)", "unknown option"),
        ("size(1) sort(+thingId)", "unexpected text"),
        ("cursor()", "expected a cursor"),
    ],
)
def test_invalid_options(text: str, message: str) -> None:
    with pytest.raises(RqlInvalidError, match=re.escape(message)) as info:
        parse_options(text)
    assert "position" in str(info.value)


def test_sort_key_order() -> None:
    values: list[Any] = [None, -1, 2.5, "B", "a", False, True, [], {}]
    keys = [sort_key(("attributes", "x"), {"attributes": {"x": v}}) for v in values]
    assert sort_key(("attributes", "x"), {}) < keys[0]
    assert keys == sorted(keys)


# ---- like: a matcher without backtracking blow-up (issue 15, item 8) ------------------------

GLOB_ALPHABET = "ab*?.\\+(ü"


def reference_like(pattern: str, text: str) -> bool:
    """What ``like`` means, by the standard library (no brackets in the alphabet: fnmatch's
    ``[...]`` is not part of Ditto's like)."""
    return re.match(fnmatch.translate(pattern), text) is not None


@given(st.text(alphabet=GLOB_ALPHABET, max_size=10), st.text(alphabet="ab.\\+(ü*?", max_size=14))
def test_glob_agrees_with_fnmatch(pattern: str, text: str) -> None:
    assert Glob(pattern).matches(text) == reference_like(pattern, text)
    doc = {"attributes": {"s": text}}
    quoted = pattern.replace("\\", "\\\\").replace('"', '\\"')
    assert matches(parse_filter(f'like(attributes/s,"{quoted}")'), doc) == reference_like(pattern, text)


@given(st.text(alphabet="aAbB*?", max_size=8), st.text(alphabet="aAbBÄä", max_size=12))
def test_ilike_folds_ascii_only(pattern: str, text: str) -> None:
    lower = str.maketrans("AB", "ab")
    expected = reference_like(pattern.translate(lower), text.translate(lower))
    doc = {"attributes": {"s": text}}
    assert matches(parse_filter(f'ilike(attributes/s,"{pattern}")'), doc) == expected


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        ("*a" * 8 + "*b", "a" * 10_000),  # the reported pattern, on 10 KB instead of 50 characters
        ("*a" * 500 + "*b", "a" * 10_000),  # a 1 KB pattern of stars
        ("*" + "a?" * 500 + "b*", "a" * 10_000),  # '?' inside a part: no str.find fast path
        ("*" * 1000 + "b", "a" * 10_000),
        ("?" * 999 + "*b", "a" * 10_000),
        ("*" + "a" * 999 + "b*", "a" * 10_000),
    ],
)
def test_like_worst_cases_are_fast(pattern: str, text: str) -> None:
    node = parse_filter(f'like(attributes/s,"{pattern}")')
    inode = parse_filter(f'ilike(attributes/s,"{pattern.upper()}")')
    doc = {"attributes": {"s": text}}
    # CPU time of this thread: the matcher's own work, not whatever else the machine runs meanwhile
    # (a backtracking matcher takes seconds of it here)
    start = time.thread_time()
    assert not matches(node, doc)
    assert not matches(inode, doc)
    assert time.thread_time() - start < 0.05


# ---- limits (issue 15, item 8 / 11): one parser, one set of limits ---------------------------


@pytest.fixture
def small_limits() -> Iterator[QueryLimits]:
    before = limits()
    new = QueryLimits(max_length=200, max_depth=3, max_terms=6, max_in_values=3, max_sort_fields=2)
    configure(new)
    try:
        yield new
    finally:
        configure(before)


def test_default_limits() -> None:
    sort = "sort(" + ",".join(f"+attributes/a{i}" for i in range(10)) + ")"
    assert len(parse_options(sort).sort) == 10
    with pytest.raises(RqlInvalidError, match="more than 10 sort fields"):
        parse_options(sort[:-1] + ",-thingId)")
    assert len(parse_filter("in(thingId," + ",".join(f'"a:{i}"' for i in range(1000)) + ")").values) == 1000
    with pytest.raises(RqlInvalidError, match="more than 1000 values"):
        parse_filter("in(thingId," + ",".join(f'"a:{i}"' for i in range(1001)) + ")")
    many = "or(" + ",".join(f"in(attributes/x{i},1,2,3)" for i in range(600)) + ")"
    with pytest.raises(RqlInvalidError, match="more than 2000 terms") as info:
        parse_filter(many)
    assert len(info.value.message) < 400  # the expression is quoted, but not all of it
    deep = "and(" * 40 + "exists(thingId)" + ")" * 40
    with pytest.raises(RqlInvalidError, match="nesting deeper than 32"):
        parse_filter(deep)


def test_configured_limits(small_limits: QueryLimits) -> None:
    assert parse_filter("and(eq(thingId,'a:b'),in(attributes/x,1,2,3))")
    with pytest.raises(RqlInvalidError, match="more than 3 values"):
        parse_filter("in(attributes/x,1,2,3,4)")
    with pytest.raises(RqlInvalidError, match="more than 6 terms"):
        parse_filter("or(in(attributes/x,1,2,3),in(attributes/y,1,2,3))")
    with pytest.raises(RqlInvalidError, match="nesting deeper than 3"):
        parse_filter("not(not(not(exists(thingId))))")
    with pytest.raises(RqlInvalidError, match="longer than 200"):
        parse_filter("eq(attributes/x," + "1" * 200 + ")")
    with pytest.raises(RqlInvalidError, match="more than 2 sort fields"):
        parse_options("sort(+thingId,-_revision,+attributes/a)")
    with pytest.raises(InvalidInputError, match="more than 6 terms") as info:
        parse_condition("or(in(attributes/x,1,2,3),in(attributes/y,1,2,3))")
    assert info.value.to_dict()["error"] == "things:condition.invalid"


def test_field_selector_limits() -> None:
    assert len(parse_fields(",".join(f"a{i}" for i in range(100)))) == 100
    for text, message in [
        (",".join(f"a{i}" for i in range(101)), "more than 100 fields"),
        ("a(" + ",".join(f"b{i}" for i in range(101)) + ")", "more than 100 fields"),
        ("a(" * 33 + "b" + ")" * 33, "deeper than 32"),
        ("(" * 5000 + "b" + ")" * 5000, "deeper than 32"),  # was a RecursionError (500)
        ("/".join("x" * 33), "more than 32 segments"),
    ]:
        with pytest.raises(InvalidInputError, match=message) as info:
            parse_fields(text)
        assert info.value.to_dict()["error"] == "json.fieldselector.invalid"
        assert len(info.value.message) < 400
