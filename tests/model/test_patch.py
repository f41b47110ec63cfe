"""RFC 7396 merge patch and RFC 6902 JSON patch, as the model applies them."""

from __future__ import annotations

from typing import Any

import jsonpatch
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twinstore.model import patch as jp
from twinstore.model.errors import PatchInvalidError

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
