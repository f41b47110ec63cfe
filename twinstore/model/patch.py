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

import re
from collections.abc import Callable
from typing import Any

import orjson

from twinstore.model.errors import PatchInvalidError, TooLargeError

__all__ = [
    "MISSING",
    "Readable",
    "apply_json_patch",
    "changed_prefix",
    "get_at",
    "json_equal",
    "json_size",
    "merge_patch",
    "parse_json_pointer",
    "remove_at",
    "resized",
    "set_at",
]


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
    # Iterative: the spine copy runs on every write (no slices, no recursion).
    result = dict(doc)
    node = result
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[parts[-1]] = value
    return result


def resized(size: int, before: dict[str, Any], after: dict[str, Any], parts: list[str]) -> int | None:
    """The compact-JSON size of ``after`` from ``size``, that of ``before``, when the two differ
    only in the member at ``parts`` (a write there): computed from that member alone, not the
    whole document. None when it cannot be (the root, or a parent created or removed).

    >>> before = {"a": {"x": 1}}
    >>> after = set_at(before, ["a", "y"], [1, 2])
    >>> resized(len(orjson.dumps(before)), before, after, ["a", "y"]) == len(orjson.dumps(after))
    True
    """
    if not parts:
        return None
    parent_before, parent_after = get_at(before, parts[:-1]), get_at(after, parts[:-1])
    if not isinstance(parent_before, dict) or not isinstance(parent_after, dict):
        return None
    key = parts[-1]
    old, new = parent_before.get(key, MISSING), parent_after.get(key, MISSING)
    if old is MISSING and new is MISSING:
        return size
    if old is not MISSING and new is not MISSING:
        return size - len(orjson.dumps(old)) + len(orjson.dumps(new))
    member = len(orjson.dumps(key)) + 1  # "key": (and a comma when the object has others)
    if new is MISSING:
        return size - len(orjson.dumps(old)) - member - (1 if parent_after else 0)
    return size + len(orjson.dumps(new)) + member + (1 if parent_before else 0)


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


# ---- RFC 6902 JSON patch ----------------------------------------------------------------
#
# Our own applier rather than the jsonpatch library's, for three things it cannot do: ask,
# per operation, whether the caller may read what the operation reads (``from`` of copy/move,
# ``path`` of test), an unreadable location failing exactly as a missing one; bound the work
# and the size while applying (40 copies of a growing object double it 40 times: that is
# gigabytes before a size check after the patch could refuse it); and say what failed without
# values (jsonpatch's messages quote them, ``42 (<class 'int'>) is not equal ...``).
# Values are shared, never copied: a write copies only the containers along its path, so a
# copy costs its path, and the running size is an estimate kept per operation.

Readable = Callable[[list[str]], bool]

_OPERATIONS = ("add", "remove", "replace", "move", "copy", "test")
_INDEX = re.compile(r"0|[1-9][0-9]*")
_ESCAPES = re.compile(r"(?:[^~]|~[01])*")
_SHOWN = 120  # characters of a caller's pointer repeated in an error message


def parse_json_pointer(pointer: Any) -> list[str] | None:
    """RFC 6901: the reference tokens of ``pointer``, or None if it is not a JSON pointer.

    >>> parse_json_pointer("/a~1b/~0c/"), parse_json_pointer(""), parse_json_pointer("a")
    (['a/b', '~c', ''], [], None)
    """
    if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
        return None
    tokens = pointer.split("/")[1:]
    if "~" in pointer:
        if not all(_ESCAPES.fullmatch(token) for token in tokens):
            return None
        tokens = [token.replace("~1", "/").replace("~0", "~") for token in tokens]
    return tokens


def _show(pointer: str) -> str:
    return pointer if len(pointer) <= _SHOWN else pointer[:_SHOWN] + "..."


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # nested deeper than JSON documents may be
        raise PatchInvalidError("A value of the JSON patch is nested too deeply.") from None


def _array_index(token: str, length: int) -> int | None:
    """The array index ``token`` names if it is below ``length``, else None."""
    if len(token) > len(str(length)) or not _INDEX.fullmatch(token):
        return None  # (the length test first: int() of a 5,000-digit string raises)
    index = int(token)
    return index if index < length else None


def _child(node: Any, token: str) -> Any:
    if isinstance(node, dict):
        return node.get(token, MISSING)
    if isinstance(node, list):
        index = _array_index(token, len(node))
        return MISSING if index is None else node[index]
    return MISSING


def _resolve(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens:
        node = _child(node, token)
        if node is MISSING:
            break
    return node


def json_equal(a: Any, b: Any) -> bool:
    """RFC 6902 ``test`` equality: numbers by value, ``true`` is not ``1``, objects unordered.

    >>> json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]}), json_equal(True, 1), json_equal([1], [1, 2])
    (True, False, False)
    """
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, bool) or isinstance(y, bool):
            if x is not y:
                return False
        elif isinstance(x, int | float) and isinstance(y, int | float):
            if x != y:
                return False
        elif isinstance(x, dict):
            if not isinstance(y, dict) or x.keys() != y.keys():
                return False
            stack.extend((v, y[k]) for k, v in x.items())
        elif isinstance(x, list):
            if not isinstance(y, list) or len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif type(x) is not type(y) or x != y:
            return False
    return True


class _Failed(Exception):
    """An operation could not be applied; ``what`` says why (never with values)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _absent(pointer: str, role: str = "") -> _Failed:
    # One wording for missing and unreadable: an error must not tell them apart.
    where = f"the '{role}' location '{_show(pointer)}'" if role else f"'{_show(pointer)}'"
    return _Failed(f"there is no value at {where}, or the requester had insufficient permissions to read it")


class _Applier:
    """One patch's application: the document so far and its estimated size."""

    def __init__(self, doc: Any, readable: Readable | None, budget: int | None) -> None:
        self.doc = doc
        self.readable = readable
        self.budget = budget
        self.size = json_size(doc) if budget is not None else 0

    def read(self, pointer: str, tokens: list[str], role: str = "") -> Any:
        """The value at ``tokens`` that the operation reads: missing and unreadable are alike."""
        value = _resolve(self.doc, tokens)
        if value is MISSING or (self.readable is not None and not self.readable(tokens)):
            raise _absent(pointer, role)
        return value

    def grow(self, delta: int) -> None:
        self.size += delta
        if self.budget is not None and self.size > self.budget:
            raise _TooLarge

    def write(self, pointer: str, tokens: list[str], mode: str, value: Any = MISSING) -> Any:
        """Add, replace or remove at ``tokens`` (copy-on-write); the value removed or replaced."""
        sized = self.budget is not None
        if not tokens:
            if mode == "remove":
                raise _Failed("the whole document cannot be removed")
            if sized:
                self.grow(json_size(value) - self.size)
            replaced, self.doc = self.doc, value
            return replaced
        chain = [self.doc]
        for token in tokens[:-1]:
            node = _child(chain[-1], token)
            if node is MISSING or not isinstance(node, dict | list):
                raise _Failed(f"the parent of '{_show(pointer)}' does not exist or is not an object or array")
            chain.append(node)
        parent, last = chain[-1], tokens[-1]
        old: Any = MISSING
        new: dict[str, Any] | list[Any]
        if isinstance(parent, dict):
            old = parent.get(last, MISSING)
            if old is MISSING and mode != "add":
                raise _absent(pointer)
            new = dict(parent)
            if mode == "remove":
                del new[last]
            else:
                new[last] = value
            if sized:
                member = json_size(last) + 2  # "key": and a comma
                before = 0 if old is MISSING else member + json_size(old)
                after = 0 if mode == "remove" else member + json_size(value)
                self.grow(after - before)
        elif isinstance(parent, list):
            new = list(parent)
            if mode == "add":
                index = len(parent) if last == "-" else _array_index(last, len(parent) + 1)
                if index is None:
                    raise _Failed(f"'{_show(pointer)}' is not an index of the array (0 to its length or '-')")
                new.insert(index, value)
            else:
                found = _array_index(last, len(parent))
                if found is None:
                    raise _absent(pointer)
                old = parent[found]
                if mode == "remove":
                    del new[found]
                else:
                    new[found] = value
            if sized:
                before = 0 if old is MISSING else json_size(old) + 1
                after = 0 if mode == "remove" else json_size(value) + 1
                self.grow(after - before)
        else:
            raise _Failed(f"the parent of '{_show(pointer)}' does not exist or is not an object or array")
        # rebuild the containers above, each a shallow copy
        for depth in range(len(tokens) - 2, -1, -1):
            container = chain[depth]
            token = tokens[depth]
            if isinstance(container, dict):
                copy_d = dict(container)
                copy_d[token] = new
                new = copy_d
            else:
                copy_l = list(container)
                copy_l[int(token)] = new
                new = copy_l
        self.doc = new
        return old


class _TooLarge(Exception):
    pass


def apply_json_patch(
    target: Any,
    operations: Any,
    *,
    readable: Readable | None = None,
    max_ops: int | None = None,
    max_bytes: int | None = None,
) -> Any:
    """RFC 6902: ``target`` with ``operations`` applied (``target`` itself is not changed).

    ``readable(tokens)`` (tokens relative to ``target``) must allow every location an operation
    reads: ``from`` of copy and move, ``path`` of test; an unreadable one fails exactly as a
    missing one. At most ``max_ops`` operations; the result (estimated as JSON, after each
    operation) at most ``max_bytes`` bytes, else :class:`TooLargeError` (413) as soon as it is
    exceeded. Any other failure is :class:`PatchInvalidError` (400) naming the operation's
    index and location, never a value.

    >>> apply_json_patch({"a": [1]}, [{"op": "add", "path": "/a/-", "value": 2}])
    {'a': [1, 2]}
    >>> try:
    ...     apply_json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])
    ... except PatchInvalidError as exc:
    ...     print(exc.message)
    Operation 0 ('test') of the JSON patch failed: the value at '/a' is not equal to the tested value.
    """
    if not isinstance(operations, list):
        raise PatchInvalidError("A JSON patch must be an array of operation objects.")
    if max_ops is not None and len(operations) > max_ops:
        raise TooLargeError(
            f"The JSON patch has {len(operations)} operations; at most {max_ops} are allowed.",
            description="Split the patch into several requests.",
        )
    applier = _Applier(target, readable, max_bytes)
    for index, op in enumerate(operations):
        name = op.get("op") if isinstance(op, dict) else None
        shown = name if isinstance(name, str) and name in _OPERATIONS else "?"
        try:
            if not isinstance(op, dict):
                raise _Failed("an operation must be a JSON object")
            if shown == "?":
                raise _Failed(f"'op' must be one of {', '.join(_OPERATIONS)}")
            _apply_one(applier, op, shown)
        except _Failed as failed:
            raise PatchInvalidError(
                f"Operation {index} ('{shown}') of the JSON patch failed: {failed.what}.",
                description="Check the operation against the resource's current state (RFC 6902).",
            ) from None
        except _TooLarge:
            raise TooLargeError(
                f"Operation {index} ('{shown}') of the JSON patch would make the Thing exceed the "
                f"size limit of {max_bytes if max_bytes is not None else 0} bytes for this resource.",
                description="Make the Thing smaller, or patch less at once.",
            ) from None
    return applier.doc


def _pointer_of(op: dict[str, Any], key: str) -> tuple[str, list[str]]:
    pointer = op.get(key)
    tokens = parse_json_pointer(pointer)
    if tokens is None:
        raise _Failed(f"'{key}' must be a JSON pointer string ('' or starting with '/')")
    assert isinstance(pointer, str)
    return pointer, tokens


def _apply_one(applier: _Applier, op: dict[str, Any], name: str) -> None:
    pointer, tokens = _pointer_of(op, "path")
    if name in ("add", "replace", "test") and "value" not in op:
        raise _Failed("'value' is missing")
    match name:
        case "add":
            applier.write(pointer, tokens, "add", op["value"])
        case "replace":
            applier.write(pointer, tokens, "replace", op["value"])
        case "remove":
            applier.write(pointer, tokens, "remove")
        case "test":
            if not json_equal(applier.read(pointer, tokens), op["value"]):
                raise _Failed(f"the value at '{_show(pointer)}' is not equal to the tested value")
        case "copy" | "move":
            source, from_tokens = _pointer_of(op, "from")
            value = applier.read(source, from_tokens, "from")
            if name == "move":
                if tokens[: len(from_tokens)] == from_tokens and len(tokens) > len(from_tokens):
                    raise _Failed(f"'{_show(source)}' cannot be moved into itself")
                if tokens == from_tokens:
                    return
                applier.write(source, from_tokens, "remove")
            applier.write(pointer, tokens, "add", value)


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
            tokens = parse_json_pointer(op.get(key)) if key in op else None
            if tokens is not None:
                paths.append(tokens)
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
