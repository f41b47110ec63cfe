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
from twinstore.model.rql import QueryLimits, limits

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
        shown = text if len(text) <= 200 else text[:200] + "..."
        raise _invalid(f"The field selector '{shown}' has unbalanced parentheses.")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(message, error="json.fieldselector.invalid", description=_DESCRIPTION)


_DESCRIPTION = "Use a comma separated list of JSON pointers, e.g. 'thingId,attributes(a,b)'."


def parse_fields(text: str) -> list[list[str]]:
    """Parse a field selector into pointer segment lists (at most ``fields_max_count``
    pointers of at most ``fields_max_depth`` segments, parentheses nested as deep at most)."""
    bounds = limits()
    result = _parse(text, text, bounds, 0)
    if len(result) > bounds.max_fields:
        raise _invalid(f"The field selector selects more than {bounds.max_fields} fields.")
    return result


def _parse(text: str, whole: str, bounds: QueryLimits, depth: int) -> list[list[str]]:
    if depth > bounds.max_field_depth:
        raise _invalid(f"The field selector nests parentheses deeper than {bounds.max_field_depth}.")
    result: list[list[str]] = []
    for item in _split_top(text):
        if "(" in item:
            if not item.endswith(")"):
                shown = whole if len(whole) <= 200 else whole[:200] + "..."
                raise InvalidInputError(
                    f"The field selector '{shown}' is not valid near '{item[:100]}'.",
                    error="json.fieldselector.invalid",
                )
            base, inner = item[: item.index("(")], item[item.index("(") + 1 : -1]
            prefix = [p for p in base.split("/") if p]
            result.extend(prefix + sub for sub in _parse(inner, whole, bounds, depth + 1))
        else:
            result.append([p for p in item.split("/") if p])
        if len(result) > bounds.max_fields:  # before a huge selector is expanded further
            raise _invalid(f"The field selector selects more than {bounds.max_fields} fields.")
    for parts in result:
        if len(parts) > bounds.max_field_depth:
            raise _invalid(f"A field of the selector has more than {bounds.max_field_depth} segments.")
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
