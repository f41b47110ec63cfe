"""RFC 7396 merge patch and RFC 6902 JSON patch, as the model applies them."""

from __future__ import annotations

from typing import Any

import jsonpatch
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinstore.model import patch as jp
from twinstore.model.errors import PatchInvalidError, TooLargeError

# RFC 7396, Appendix A: (target, patch, result)
APPENDIX_A: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), APPENDIX_A)
def test_rfc7396_appendix_a(target: Any, patch: Any, result: Any) -> None:
    assert jp.merge_patch(target, patch) == result


keys = st.text(alphabet="abcxyz", min_size=1, max_size=3)
scalars = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=12,
)
objects = st.dictionaries(keys, json_values, max_size=4)


@given(objects)
def test_merge_with_empty_patch_is_identity(doc: dict[str, Any]) -> None:
    assert jp.merge_patch(doc, {}) == doc


@given(objects, objects)
def test_merge_does_not_mutate_inputs(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    before_doc, before_patch = repr(doc), repr(patch)
    jp.merge_patch(doc, patch)
    assert (repr(doc), repr(patch)) == (before_doc, before_patch)


def _operations(doc: dict[str, Any]) -> st.SearchStrategy[list[dict[str, Any]]]:
    paths = ["/" + k for k in doc] or ["/a"]
    add = st.builds(lambda k, v: {"op": "add", "path": "/" + k, "value": v}, keys, json_values)
    replace = st.builds(
        lambda p, v: {"op": "replace", "path": p, "value": v}, st.sampled_from(paths), json_values
    )
    remove = st.builds(lambda p: {"op": "remove", "path": p}, st.sampled_from(paths))
    return st.lists(add | replace | remove, min_size=1, max_size=4)


@given(st.data())
def test_json_patch_agrees_with_jsonpatch(data: st.DataObject) -> None:
    doc = data.draw(objects)
    ops = data.draw(_operations(doc))
    try:
        expected = jsonpatch.JsonPatch(ops).apply(doc, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        with pytest.raises(PatchInvalidError):
            jp.apply_json_patch(doc, ops)
        return
    assert jp.apply_json_patch(doc, ops) == expected


def test_json_patch_array_append_and_remove() -> None:
    doc = {"a": [1, 2]}
    doc = jp.apply_json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}])
    assert doc == {"a": [1, 2, 3]}
    assert jp.apply_json_patch(doc, [{"op": "remove", "path": "/a/0"}]) == {"a": [2, 3]}


def test_json_patch_malformed_is_invalid_input() -> None:
    with pytest.raises(PatchInvalidError):
        jp.apply_json_patch({}, {"op": "add"})
    with pytest.raises(PatchInvalidError):
        jp.apply_json_patch({}, [{"op": "nope", "path": "/a"}])
    with pytest.raises(PatchInvalidError):
        jp.apply_json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])


@given(objects, st.lists(keys, min_size=1, max_size=3), json_values)
def test_set_then_get(doc: dict[str, Any], parts: list[str], value: Any) -> None:
    after = jp.set_at(doc, parts, value)
    assert jp.get_at(after, parts) == value
    assert jp.get_at(jp.remove_at(after, parts), parts) is jp.MISSING


@given(objects, st.lists(keys | st.just("é\"/"), min_size=1, max_size=3), json_values | st.just({}))
def test_resized_is_the_size_of_the_written_document(
    doc: dict[str, Any], parts: list[str], value: Any
) -> None:
    """The journal's size check from the changed member only (jp.resized) must equal an
    encoding of the whole document: set, merge (None removes) and remove at any path, with
    keys that need escaping, into empty and non-empty parents; None when it cannot tell."""
    size = len(orjson.dumps(doc))
    merged = jp.merge_patch(jp.get_at(doc, parts), value)
    for after in (
        jp.set_at(doc, parts, value),
        jp.remove_at(doc, parts),
        jp.remove_at(doc, parts) if merged is None else jp.set_at(doc, parts, merged),
    ):
        got = jp.resized(size, doc, after, parts)
        parent = jp.get_at(doc, parts[:-1])
        if isinstance(parent, dict) and isinstance(jp.get_at(after, parts[:-1]), dict):
            assert got == len(orjson.dumps(after))
        else:
            assert got is None


# ---- our RFC 6902 applier (issue 15: reads checked, size bounded, no values in errors) ------

# RFC 6902 Appendix A (the examples with a defined result): (document, patch, result or None = error)
APPENDIX_A_6902: list[tuple[Any, list[dict[str, Any]], Any]] = [
    ({"foo": "bar"}, [{"op": "add", "path": "/baz", "value": "qux"}], {"baz": "qux", "foo": "bar"}),
    (
        {"foo": ["bar", "baz"]},
        [{"op": "add", "path": "/foo/1", "value": "qux"}],
        {"foo": ["bar", "qux", "baz"]},
    ),
    ({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
    ({"foo": ["bar", "qux", "baz"]}, [{"op": "remove", "path": "/foo/1"}], {"foo": ["bar", "baz"]}),
    (
        {"baz": "qux", "foo": "bar"},
        [{"op": "replace", "path": "/baz", "value": "boo"}],
        {"baz": "boo", "foo": "bar"},
    ),
    (
        {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
        [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
        {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}},
    ),
    (
        {"foo": ["all", "grass", "cows", "eat"]},
        [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
        {"foo": ["all", "cows", "eat", "grass"]},
    ),
    (
        {"baz": "qux", "foo": ["a", 2, "c"]},
        [{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}],
        {"baz": "qux", "foo": ["a", 2, "c"]},
    ),
    ({"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}], None),
    (
        {"foo": "bar"},
        [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
        {"foo": "bar", "child": {"grandchild": {}}},
    ),
    (
        {"foo": "bar"},
        [{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}],
        {"foo": "bar", "baz": "qux"},
    ),
    ({"foo": "bar"}, [{"op": "add", "path": "/baz/bat", "value": "qux"}], None),
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}], {"/": 9, "~1": 10}),
    ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": "10"}], None),
    (
        {"foo": ["bar"]},
        [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
        {"foo": ["bar", ["abc", "def"]]},
    ),
]


@pytest.mark.parametrize(("doc", "ops", "result"), APPENDIX_A_6902)
def test_rfc6902_appendix_a(doc: Any, ops: list[dict[str, Any]], result: Any) -> None:
    if result is None:
        with pytest.raises(PatchInvalidError):
            jp.apply_json_patch(doc, ops)
    else:
        assert jp.apply_json_patch(doc, ops) == result


# jsonpatch compares with Python's == (True == 1): leave booleans out of the comparison with it
plain_scalars = st.none() | st.integers(-1000, 1000) | st.text(max_size=5)
plain_values = st.recursive(
    plain_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=12,
)


def _pointers(doc: Any, prefix: str = "") -> list[str]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _pointers(v, f"{prefix}/{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _pointers(v, f"{prefix}/{i}")
    return out


def _any_operations(doc: Any) -> st.SearchStrategy[list[dict[str, Any]]]:
    existing = _pointers(doc)
    pointer = st.sampled_from(existing) | st.builds(lambda p, k: f"{p}/{k}", st.sampled_from(existing), keys)
    op = st.one_of(
        st.builds(lambda p, v: {"op": "add", "path": p, "value": v}, pointer, plain_values),
        st.builds(lambda p, v: {"op": "replace", "path": p, "value": v}, pointer, plain_values),
        st.builds(lambda p: {"op": "remove", "path": p}, pointer),
        st.builds(lambda f, p: {"op": "copy", "from": f, "path": p}, pointer, pointer),
        st.builds(lambda f, p: {"op": "move", "from": f, "path": p}, pointer, pointer),
        st.builds(lambda p, v: {"op": "test", "path": p, "value": v}, pointer, plain_values),
    )
    return st.lists(op, min_size=1, max_size=5)


plain_objects = st.dictionaries(keys, plain_values, max_size=4)


@given(st.data())
def test_every_operation_agrees_with_jsonpatch(data: st.DataObject) -> None:
    doc = data.draw(plain_objects)
    ops = data.draw(_any_operations(doc))
    before = repr(doc)
    try:
        expected = jsonpatch.JsonPatch(ops).apply(doc, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
        with pytest.raises(PatchInvalidError):
            jp.apply_json_patch(doc, ops)
        return
    got = jp.apply_json_patch(doc, ops, max_bytes=10**9)
    assert got == expected
    assert repr(doc) == before  # the input is never changed


MARKER = 987_654


@given(st.data())
def test_unreadable_reads_fail_as_missing_ones_and_errors_hold_no_values(data: st.DataObject) -> None:
    """For a hidden location, the outcome is that of the same patch on the document without it."""
    doc = data.draw(st.dictionaries(keys, plain_values, min_size=1, max_size=4))
    hidden_key = data.draw(st.sampled_from(sorted(doc)))
    doc = {**doc, hidden_key: {"v": MARKER}}
    without = {k: v for k, v in doc.items() if k != hidden_key}
    ops = data.draw(_any_operations(doc))
    # only reads of hidden_key are judged here: writes there need WRITE (thing_guard)
    if any(op["path"].split("/")[1:2] == [hidden_key] for op in ops if op["op"] != "test"):
        return

    def readable(tokens: list[str]) -> bool:
        return tokens[:1] != [hidden_key] and tokens != []

    def outcome(target: Any, predicate: Any) -> Any:
        try:
            result = jp.apply_json_patch(target, ops, readable=predicate)
        except PatchInvalidError as exc:
            assert str(MARKER) not in exc.message + exc.instance_description
            assert "<class" not in exc.message
            return ("error", exc.message)
        return (
            "ok",
            {k: v for k, v in result.items() if k != hidden_key} if isinstance(result, dict) else result,
        )

    seen = outcome(doc, readable)
    assert seen == outcome(without, lambda tokens: tokens != [])
    assert str(MARKER) not in repr(seen)


def test_messages_name_the_operation_and_location_only() -> None:
    doc = {"a": {"secret": 31337}, "b": [1]}
    cases = [
        ([{"op": "test", "path": "/a/secret", "value": 1}], "Operation 0 ('test')", "/a/secret"),
        (
            [{"op": "add", "path": "/b/1", "value": 2}, {"op": "remove", "path": "/x"}],
            "Operation 1 ('remove')",
            "/x",
        ),
        ([{"op": "copy", "from": "/nope", "path": "/c"}], "Operation 0 ('copy')", "/nope"),
        ([{"op": "replace", "path": "/b/7", "value": 31337}], "Operation 0 ('replace')", "/b/7"),
        ([{"op": "add", "path": "/b/01", "value": 0}], "Operation 0 ('add')", "/b/01"),
        ([{"op": "add", "path": "/b/" + "9" * 5000, "value": 0}], "Operation 0 ('add')", "/b/999"),
        ([{"op": "add", "path": "a", "value": 0}], "Operation 0 ('add')", "'path' must be a JSON pointer"),
        (
            [{"op": "add", "path": "/a/~2", "value": 0}],
            "Operation 0 ('add')",
            "'path' must be a JSON pointer",
        ),
        ([{"op": "add", "path": "/z"}], "Operation 0 ('add')", "'value' is missing"),
        ([{"op": "jump", "path": "/z"}], "Operation 0 ('?')", "'op' must be one of"),
        ([{"op": ["x"], "path": "/z"}], "Operation 0 ('?')", "'op' must be one of"),
        ([5], "Operation 0 ('?')", "JSON object"),
        ([{"op": "move", "from": "/a", "path": "/a/b"}], "Operation 0 ('move')", "into itself"),
        ([{"op": "remove", "path": ""}], "Operation 0 ('remove')", "whole document"),
    ]
    for ops, which, where in cases:
        with pytest.raises(PatchInvalidError) as caught:
            jp.apply_json_patch(doc, ops)
        message = caught.value.message
        assert message.startswith(which) and where in message, message
        assert "31337" not in message and "<class" not in message and len(message) < 400, message
    with pytest.raises(PatchInvalidError):
        jp.apply_json_patch(doc, {"op": "add"})


def test_copies_share_values_and_growth_is_refused_at_the_op_that_crosses_the_limit() -> None:
    import time

    doc = {"pad": "p" * 1000}
    ops = [{"op": "copy", "from": "", "path": f"/c{n}"} for n in range(40)]
    started = time.thread_time()  # CPU time of this thread: the patch's own work
    with pytest.raises(TooLargeError) as caught:
        jp.apply_json_patch(doc, ops, max_bytes=100_000)
    assert time.thread_time() - started < 0.5
    assert caught.value.message.startswith("Operation 6 ('copy')"), caught.value.message
    # without a bound the work is still per path, not per byte (values are shared)
    grown = jp.apply_json_patch(doc, ops[:20])
    assert grown["c19"]["c18"]["pad"] is doc["pad"]


def test_too_many_operations() -> None:
    ops = [{"op": "add", "path": f"/a{n}", "value": n} for n in range(11)]
    with pytest.raises(TooLargeError):
        jp.apply_json_patch({}, ops, max_ops=10)
    assert len(jp.apply_json_patch({}, ops[:10], max_ops=10)) == 10


@given(st.data())
def test_the_size_estimate_bounds_the_result(data: st.DataObject) -> None:
    doc = data.draw(plain_objects)
    ops = data.draw(_any_operations(doc))
    budget = len(orjson.dumps(doc)) + data.draw(st.integers(0, 300))  # (what is stored fits)
    try:
        result = jp.apply_json_patch(doc, ops, max_bytes=budget)
    except (PatchInvalidError, TooLargeError):
        return
    # the estimate counts a separator per member: it never undercounts by more than one per op
    assert len(orjson.dumps(result)) <= budget + len(ops)


def test_json_equal() -> None:
    assert jp.json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert not jp.json_equal(True, 1) and not jp.json_equal(0, False) and not jp.json_equal(None, False)
    assert not jp.json_equal({"a": 1}, {"a": 1, "b": 2}) and not jp.json_equal([1], (1,))
    assert not jp.json_equal("1", 1)
