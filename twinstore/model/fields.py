"""Ditto's ``fields`` selector: ``thingId,attributes/location,features/f/properties(a,b)``.

>>> select({"a": {"b": 1, "c": 2}, "d": 3}, parse_fields("a(b),d"))
{'a': {'b': 1}, 'd': 3}
>>> parse_fields("features/f/properties(x,y/z),_revision")
[['features', 'f', 'properties', 'x'], ['features', 'f', 'properties', 'y', 'z'], ['_revision']]
"""

from __future__ import annotations

from typing import Any

from twinstore.model import patch as jp
from twinstore.model.errors import InvalidInputError

__all__ = ["parse_fields", "select"]


def _split_top(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                break
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise InvalidInputError(
            f"The field selector '{text}' has unbalanced parentheses.",
            error="json.fieldselector.invalid",
            description="Use a comma separated list of JSON pointers, e.g. 'thingId,attributes(a,b)'.",
        )
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_fields(text: str) -> list[list[str]]:
    """Parse a field selector into pointer segment lists."""
    result: list[list[str]] = []
    for item in _split_top(text):
        if "(" in item:
            if not item.endswith(")"):
                raise InvalidInputError(
                    f"The field selector '{text}' is not valid near '{item}'.",
                    error="json.fieldselector.invalid",
                )
            base, inner = item[: item.index("(")], item[item.index("(") + 1 : -1]
            prefix = [p for p in base.split("/") if p]
            result.extend(prefix + sub for sub in parse_fields(inner))
        else:
            result.append([p for p in item.split("/") if p])
    return [parts for parts in result if parts]


def select(value: Any, fields: list[list[str]]) -> Any:
    """Keep only the selected pointers of an object (others are dropped silently, as Ditto)."""
    if not isinstance(value, dict):
        return value
    result: dict[str, Any] = {}
    for parts in fields:
        found = jp.get_at(value, parts)
        if found is not jp.MISSING:
            result = jp.set_at(result, parts, found)
    return result
