"""JSON documents addressed by Ditto pointers: get, set, remove, RFC 7396 merge, RFC 6902 patch.

Writes are copy-on-write along the path, so earlier states stay valid (replay and caches may
keep them).

>>> doc = {"a": {"b": 1}}
>>> set_at(doc, ["a", "c"], 2)
{'a': {'b': 1, 'c': 2}}
>>> doc
{'a': {'b': 1}}
>>> merge_patch({"a": 1, "b": {"c": 2}}, {"a": None, "b": {"d": 3}})
{'b': {'c': 2, 'd': 3}}
"""

from __future__ import annotations

from typing import Any

import jsonpatch
import jsonpointer

from twinstore.model.errors import PatchInvalidError

__all__ = ["MISSING", "apply_json_patch", "changed_prefix", "get_at", "merge_patch", "remove_at", "set_at"]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def get_at(doc: Any, parts: list[str]) -> Any:
    """The value at ``parts`` or :data:`MISSING`; only objects are traversed (as Ditto)."""
    node = doc
    for part in parts:
        if not isinstance(node, dict):
            return MISSING
        node = node.get(part, MISSING)
        if node is MISSING:
            return MISSING
    return node


def set_at(doc: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with ``value`` at ``parts``; missing or non-object parents become objects."""
    if not parts:
        if not isinstance(value, dict):
            raise PatchInvalidError("The root of a document must be a JSON object.")
        return value
    head, rest = parts[0], parts[1:]
    result = dict(doc)
    if rest:
        child = doc.get(head)
        result[head] = set_at(child if isinstance(child, dict) else {}, rest, value)
    else:
        result[head] = value
    return result


def remove_at(doc: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """A copy of ``doc`` without the value at ``parts`` (unchanged if absent)."""
    if not parts:
        return {}
    head, rest = parts[0], parts[1:]
    if head not in doc:
        return doc
    result = dict(doc)
    if rest:
        child = doc[head]
        if not isinstance(child, dict):
            return doc
        result[head] = remove_at(child, rest)
    else:
        del result[head]
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: apply merge ``patch`` to ``target``; ``None`` in the patch removes a key."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 via jsonpatch; errors become :class:`PatchInvalidError` (400).

    >>> apply_json_patch({"a": [1]}, [{"op": "add", "path": "/a/-", "value": 2}])
    {'a': [1, 2]}
    """
    if not isinstance(operations, list) or not all(isinstance(op, dict) for op in operations):
        raise PatchInvalidError("A JSON patch must be an array of operation objects.")
    try:
        return jsonpatch.JsonPatch(operations).apply(target, in_place=False)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise PatchInvalidError(f"The JSON patch could not be applied: {exc}") from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise PatchInvalidError(f"The JSON patch is malformed: {exc}") from exc


def changed_prefix(before: Any, operations: list[dict[str, Any]]) -> list[str]:
    """The deepest object path that contains every location a JSON patch touches.

    Arrays are values in Ditto (their elements are not addressable), so the prefix stops at
    the first array or missing node.

    >>> changed_prefix({"a": {"b": [1], "c": 1}}, [{"op": "add", "path": "/a/b/-", "value": 2}])
    ['a', 'b']
    >>> changed_prefix({"a": {"b": 1, "c": 1}}, [{"op": "remove", "path": "/a/b"},
    ...                                          {"op": "remove", "path": "/a/c"}])
    ['a']
    """
    paths: list[list[str]] = []
    for op in operations:
        for key in ("path", "from"):
            if key in op:
                paths.append(jsonpointer.JsonPointer(op[key]).parts)
    if not paths:
        return []
    prefix = paths[0]
    for parts in paths[1:]:
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    # The prefix may end at the very location an op writes; keep it only while its parent
    # is an object in the old document (an array element is not addressable in Ditto).
    result: list[str] = []
    node = before
    for part in prefix:
        if not isinstance(node, dict):
            break
        result.append(part)
        node = node.get(part, MISSING)
        if node is MISSING:
            break
    return result
