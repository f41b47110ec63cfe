"""Ditto's RQL: one parser and AST for search (compiled to SQL), conditions and event filters.

>>> node = parse_filter('and(eq(attributes/maker,"ACME"),gt(features/*/properties/t,20))')
>>> doc = {"attributes": {"maker": "ACME"}, "features": {"a": {"properties": {"t": 21.5}}}}
>>> matches(node, doc)
True
>>> matches(parse_filter("ne(attributes/owner,'x')"), doc)
False
>>> parse_options("size(10),sort(+thingId,-attributes/x)")
SearchOptions(sort=[(('thingId',), True), (('attributes', 'x'), False)], size=10, cursor=None, offset=None)

The contract (``twinstore.store.rql_sql`` compiles the same AST to SQL with exactly these
semantics, and a property test holds both to it):

* **Fields** — ``thingId``, ``policyId``, ``definition``, ``_namespace`` (``thingId`` before
  the first ``:``), ``_revision`` (number), ``_created`` / ``_modified`` (timestamps), and
  ``attributes[/...]``, ``features[/...]``. A leading ``/`` is optional; segments are taken
  literally. ``features/*/...`` matches when the condition holds for at least one feature
  (``ne`` and ``exists`` included: "some feature where ...").
* **Paths** walk objects only (as :func:`twinstore.model.patch.get_at`): a segment never
  indexes an array.
* **Absent or another type** — a comparison on an absent path, or on a value whose JSON type
  differs from the literal's, is false. No conversion ever (``"1"`` is not ``1``).
* **ne** — as Ditto documents it: only things that *have* the field, i.e.
  ``ne(f, v) == exists(f) and not eq(f, v)``; ``not(eq(f, v))`` also matches when f is absent.
* **Arrays** — a comparison on a path holding an array matches when any (top-level) element
  matches; ``exists`` is true for any value, ``null`` included.
* **Types** — numbers compare numerically and exactly (``1 == 1.0``; floats by their shortest
  decimal form, as stored), strings by code point (``COLLATE "C"``), booleans and ``null``
  only with ``eq`` / ``ne`` / ``in`` (``gt(x,true)`` is a 400). ``like`` / ``ilike`` take a
  string pattern (``*`` any sequence, ``?`` one character) and match strings only; ``ilike``
  folds ASCII letters only (as ``ILIKE`` under ``COLLATE "C"``). ``in`` is any ``eq``.
* ``thingId`` / ``_namespace`` take string literals, ``_revision`` numbers, ``_created`` /
  ``_modified`` ISO-8601 strings (compared as instants; without an offset they are UTC).
* **Sort order** (:func:`sort_key`, ``compile_order``): ascending puts absent first, then
  ``null``, numbers, strings (code point), booleans (false < true), arrays, objects (arrays
  and objects tie among themselves); descending is the exact reverse, absent last; the thing
  id (code point, ascending) breaks ties.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeAlias

import msgspec

from twinstore.model.errors import InvalidInputError, RqlInvalidError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "And",
    "Comparison",
    "Exists",
    "Field",
    "Glob",
    "In",
    "Node",
    "Not",
    "Or",
    "QueryLimits",
    "SearchOptions",
    "Value",
    "configure",
    "fields_of",
    "glob",
    "limits",
    "matches",
    "parse_condition",
    "parse_filter",
    "parse_options",
    "sort_key",
]

MAX_DEPTH = 32
MAX_LENGTH = 65_536
DEFAULT_SIZE = 25
MAX_SIZE = 200
MAX_OFFSET = 10_000  # limit(offset,count) reads and skips `offset` matches: cursors go further

Field: TypeAlias = tuple[str, ...]
#: A literal: numbers are exact decimals; on ``_created`` / ``_modified`` strings become datetimes.
Value: TypeAlias = str | Decimal | bool | datetime | None
Op: TypeAlias = Literal["eq", "ne", "gt", "ge", "lt", "le", "like", "ilike"]


class Comparison(msgspec.Struct, frozen=True, tag=True):
    op: Op
    field: Field
    value: Value


class In(msgspec.Struct, frozen=True, tag=True):
    field: Field
    values: tuple[Value, ...]


class Exists(msgspec.Struct, frozen=True, tag=True):
    field: Field


class And(msgspec.Struct, frozen=True, tag=True):
    children: tuple[Node, ...]


class Or(msgspec.Struct, frozen=True, tag=True):
    children: tuple[Node, ...]


class Not(msgspec.Struct, frozen=True, tag=True):
    child: Node


Node: TypeAlias = Comparison | In | Exists | And | Or | Not


class QueryLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one RQL expression or ``fields`` selector may cost (the ``rql_*`` / ``fields_*``
    settings). Search, conditions (HTTP header, WebSocket and NATS envelopes) and event filters
    (WebSocket, SSE) parse with the same limits, so none of them is a way around another.

    ``max_terms`` counts every operator and every value of an ``in`` (what the SQL grows with).
    """

    max_length: int = MAX_LENGTH
    max_depth: int = MAX_DEPTH
    max_terms: int = 2_000
    max_in_values: int = 1_000
    max_sort_fields: int = 10
    max_fields: int = 100
    max_field_depth: int = 32


_limits = QueryLimits()


def configure(new: QueryLimits) -> None:
    """Set the process's limits (the runtime does, from its settings). One process serves one
    configuration, and the parsers run in places that see no settings (protocol envelopes)."""
    global _limits
    _limits = new


def limits() -> QueryLimits:
    """The limits in force (see :func:`configure`)."""
    return _limits


class SearchOptions(msgspec.Struct, frozen=True):
    sort: list[tuple[Field, bool]] = msgspec.field(default_factory=list)
    size: int = DEFAULT_SIZE
    cursor: str | None = None
    offset: int | None = None  # Ditto's deprecated limit(offset,count): size is the count


# ---- fields -------------------------------------------------------------------------------

#: Single-segment fields and the literal type they take (None: any JSON literal).
SCALAR_FIELDS: dict[str, type | None] = {
    "thingId": str,
    "policyId": None,
    "definition": None,
    "_namespace": str,
    "_revision": Decimal,
    "_created": datetime,
    "_modified": datetime,
}
TREE_FIELDS = ("attributes", "features")
TIME_FIELDS = ("_created", "_modified")
COLUMN_FIELDS = ("thingId", "_namespace", "_revision", "_created", "_modified")


def is_wildcard(field: Field) -> bool:
    return len(field) >= 2 and field[0] == "features" and field[1] == "*"


# ---- parser -------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z]+")
_FIELD = re.compile(r"[^\s,()]+")
_WS = re.compile(r"\s*")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\"}
_COMPARISONS = ("eq", "ne", "gt", "ge", "lt", "le", "like", "ilike")
_ECHO = 200  # characters of the expression an error message quotes


class _Parser:
    def __init__(self, text: str, what: str = "RQL", bounds: QueryLimits | None = None) -> None:
        self.text = text
        self.pos = 0
        self.what = what
        self.limits = bounds or _limits
        self.terms = 0

    def fail(self, message: str, pos: int | None = None) -> RqlInvalidError:
        at = self.pos if pos is None else pos
        text = self.text if len(self.text) <= _ECHO else self.text[:_ECHO] + "..."
        return RqlInvalidError(f"Invalid {self.what} at position {at}: {message} in '{text}'.")

    def term(self, start: int) -> None:
        self.terms += 1
        if self.terms > self.limits.max_terms:
            raise self.fail(f"more than {self.limits.max_terms} terms (operators and in-values)", start)

    def ws(self) -> None:
        m = _WS.match(self.text, self.pos)
        self.pos = m.end() if m else self.pos

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, context: str) -> None:
        self.ws()
        if self.peek() != char:
            found = f"'{self.peek()}'" if self.peek() else "the end"
            raise self.fail(f"expected '{char}' {context}, found {found}")
        self.pos += 1

    def accept(self, char: str) -> bool:
        self.ws()
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def name(self) -> tuple[str, int]:
        self.ws()
        start = self.pos
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.fail("expected an operator such as eq, and, exists")
        self.pos = m.end()
        return m.group(), start

    def query(self, depth: int) -> Node:
        name, start = self.name()
        if depth > self.limits.max_depth:
            raise self.fail(f"nesting deeper than {self.limits.max_depth}", start)
        self.term(start)
        self.expect("(", f"after '{name}'")
        node: Node
        if name in ("and", "or"):
            children = [self.query(depth + 1)]
            while self.accept(","):
                children.append(self.query(depth + 1))
            node = And(tuple(children)) if name == "and" else Or(tuple(children))
        elif name == "not":
            node = Not(self.query(depth + 1))
        elif name == "exists":
            node = Exists(self.field())
        elif name == "in":
            field = self.field()
            self.expect(",", "after the field")
            self.term(self.pos)
            values = [self.value(field, "eq")]
            while self.accept(","):
                if len(values) >= self.limits.max_in_values:
                    raise self.fail(f"more than {self.limits.max_in_values} values in 'in'")
                self.term(self.pos)
                values.append(self.value(field, "eq"))
            node = In(field, tuple(values))
        elif name in _COMPARISONS:
            field = self.field()
            self.expect(",", "after the field")
            node = Comparison(name, field, self.value(field, name))  # type: ignore[arg-type]
        else:
            raise self.fail(f"unknown operator '{name}'", start)
        self.expect(")", f"to close '{name}'")
        return node

    def field(self, *, wildcard: bool = True) -> Field:
        self.ws()
        start = self.pos
        m = _FIELD.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a field such as attributes/location")
        self.pos = m.end()
        raw = m.group()
        parts = tuple(raw[1:].split("/") if raw.startswith("/") else raw.split("/"))
        if "" in parts:
            raise self.fail(f"empty segment in the field '{raw}'", start)
        root = parts[0]
        if root in SCALAR_FIELDS:
            if len(parts) > 1:
                raise self.fail(f"'{root}' has no sub-fields", start)
        elif root not in TREE_FIELDS:
            hint = "use thingId, policyId, attributes/..., features/..."
            raise self.fail(f"unknown field '{raw}' ({hint})", start)
        if is_wildcard(parts) and not wildcard:
            raise self.fail("a wildcard cannot be used here", start)
        return parts

    def value(self, field: Field, op: str) -> Value:
        self.ws()
        start = self.pos
        ch = self.peek()
        value: Value
        if ch in ('"', "'"):
            value = self.string(ch)
        elif m := _NUMBER.match(self.text, self.pos):
            self.pos = m.end()
            value = Decimal(m.group())
            if not -400 <= value.adjusted() <= 400:
                raise self.fail("number out of range", start)
        elif m := _NAME.match(self.text, self.pos):
            word = m.group()
            if word not in ("true", "false", "null"):
                raise self.fail(f"unknown value '{word}' (strings need quotes)", start)
            self.pos = m.end()
            value = {"true": True, "false": False, "null": None}[word]
        else:
            raise self.fail("expected a value: a quoted string, a number, true, false or null")
        return self.check(field, op, value, start)

    def string(self, quote: str) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            ch = self.peek()
            if not ch:
                raise self.fail("unterminated string", start)
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\":
                esc = self.peek()
                if esc not in _ESCAPES:
                    raise self.fail("unknown escape (use \\\\, \\\" or \\')", self.pos - 1)
                self.pos += 1
                out.append(_ESCAPES[esc])
            else:
                out.append(ch)

    def check(self, field: Field, op: str, value: Value, start: int) -> Value:
        ordering = op in ("gt", "ge", "lt", "le")
        not_text = field[0] in ("_revision", *TIME_FIELDS)
        if op in ("like", "ilike") and (not isinstance(value, str) or not_text):
            raise self.fail(f"'{op}' needs a string field and a string pattern", start)
        if ordering and (value is None or isinstance(value, bool)):
            raise self.fail(f"'{op}' compares numbers or strings only", start)
        wanted = SCALAR_FIELDS.get(field[0])
        if wanted is datetime:
            try:
                parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
            except ValueError:
                parsed = None
            if parsed is None:
                raise self.fail(f"'{field[0]}' compares with ISO-8601 timestamps", start)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        if wanted is not None and not (isinstance(value, wanted) and not isinstance(value, bool)):
            kind = "a string" if wanted is str else "a number"
            raise self.fail(f"'{field[0]}' compares with {kind}", start)
        return value

    def end(self) -> None:
        self.ws()
        if self.pos != len(self.text):
            raise self.fail("unexpected text after the end")


def _parser(text: str, what: str) -> _Parser:
    bounds = _limits
    if len(text) > bounds.max_length:
        raise RqlInvalidError(f"Invalid {what}: longer than {bounds.max_length} characters.")
    for pos, ch in enumerate(text):  # PostgreSQL text holds neither NUL nor lone surrogates
        if ch == "\x00" or "\ud800" <= ch <= "\udfff":
            raise RqlInvalidError(f"Invalid {what} at position {pos}: a NUL or lone surrogate character.")
    return _Parser(text, what, bounds)


def parse_filter(text: str) -> Node:
    """Parse an RQL filter; :class:`RqlInvalidError` names the position of the first error.

    >>> parse_filter("exists(/attributes/a)")
    Exists(field=('attributes', 'a'))
    >>> try:
    ...     parse_filter("eq(attributes/a 1)")
    ... except RqlInvalidError as e:
    ...     print(e)
    Invalid RQL at position 16: expected ',' after the field, found '1' in 'eq(attributes/a 1)'.
    """
    p = _parser(text, "RQL")
    node = p.query(1)
    p.end()
    return node


def parse_condition(text: str | None) -> Node | None:
    """Ditto's ``condition`` header parsed; 400 ``things:condition.invalid`` when it is not RQL."""
    if text is None:
        return None
    try:
        return parse_filter(text)
    except RqlInvalidError as exc:
        raise InvalidInputError(
            exc.message,
            error="things:condition.invalid",
            description="Check the RQL syntax of the condition (see https://www.eclipse.dev/ditto/basic-rql.html).",
        ) from None


def parse_options(text: str | None) -> SearchOptions:
    """Parse Ditto's ``option`` parameter: ``sort(+f,-g)``, ``size(n)``, ``cursor(c)`` (and the
    deprecated ``limit(offset,count)``).

    >>> parse_options("sort(-attributes/a),limit(50,10)")
    SearchOptions(sort=[(('attributes', 'a'), False)], size=10, cursor=None, offset=50)
    """
    if not text or not text.strip():
        return SearchOptions()
    p = _parser(text, "option")
    seen: dict[str, Any] = {}
    while True:
        name, start = p.name()
        if name in seen:
            raise p.fail(f"'{name}' given twice", start)
        p.expect("(", f"after '{name}'")
        if name == "sort":
            items = [_sort_item(p)]
            while p.accept(","):
                if len(items) >= p.limits.max_sort_fields:
                    raise p.fail(f"more than {p.limits.max_sort_fields} sort fields")
                items.append(_sort_item(p))
            seen[name] = items
        elif name == "size":
            seen[name] = _number(p, 1, MAX_SIZE, "size")
        elif name == "cursor":
            p.ws()
            m = re.compile(r"[^\s,()]+").match(p.text, p.pos)
            if not m:
                raise p.fail("expected a cursor")
            p.pos = m.end()
            seen[name] = m.group()
        elif name == "limit":  # deprecated by Ditto, still accepted (its JS client's withLimit)
            offset = _number(p, 0, MAX_OFFSET, "the offset of limit")
            p.expect(",", "between the offset and count of limit")
            seen[name] = (offset, _number(p, 1, MAX_SIZE, "the count of limit"))
        else:
            raise p.fail(f"unknown option '{name}' (use sort, size, cursor)", start)
        p.expect(")", f"to close '{name}'")
        if not p.accept(","):
            break
    p.end()
    if "limit" in seen:
        if "size" in seen or "cursor" in seen:
            raise p.fail("limit(offset,count) cannot be combined with size or cursor", 0)
        offset, count = seen["limit"]
        return SearchOptions(seen.get("sort", []), count, None, offset)
    return SearchOptions(seen.get("sort", []), seen.get("size", DEFAULT_SIZE), seen.get("cursor"))


def _number(p: _Parser, low: int, high: int, what: str) -> int:
    p.ws()
    m = re.compile(r"[0-9]+").match(p.text, p.pos)
    if not m or not low <= int(m.group()) <= high:
        raise p.fail(f"{what} must be a number from {low} to {high}")
    p.pos = m.end()
    p.ws()
    return int(m.group())


def _sort_item(p: _Parser) -> tuple[Field, bool]:
    p.ws()
    ascending = p.peek() != "-"
    if p.peek() in "+-" and p.peek():
        p.pos += 1
    return p.field(wildcard=False), ascending


# ---- evaluation ---------------------------------------------------------------------------


class _Absent:
    __slots__ = ()


ABSENT: Any = _Absent()


def _walk(value: Any, parts: Field) -> Any:
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return ABSENT
        value = value[part]
    return value


def _values(field: Field, doc: Mapping[str, Any], meta: Mapping[str, Any]) -> Iterator[Any]:
    """The value(s) a field reads: one, or one per feature for a wildcard (ABSENT if none)."""
    root = field[0]
    if root in COLUMN_FIELDS:
        if root == "_namespace" and root not in meta:
            thing_id = doc.get("thingId")
            yield thing_id.split(":", 1)[0] if isinstance(thing_id, str) else ABSENT
        elif root == "thingId":
            yield doc.get("thingId", ABSENT)
        else:
            found = meta.get(root)
            yield ABSENT if found is None else found
    elif is_wildcard(field):
        features = doc.get("features")
        if isinstance(features, dict):
            for feature in features.values():
                yield _walk(feature, field[2:])
    else:
        yield _walk(doc, field)


def number(value: Any) -> Decimal | None:
    """A JSON number as the exact decimal PostgreSQL stores (floats by their shortest form)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, Decimal):
        return value
    return None


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Glob:
    """A ``like`` pattern (``*`` any sequence, ``?`` one character, everything else literal)
    matched without backtracking blow-up.

    The pattern is cut at its stars: the part before the first star must match at the start,
    the part after the last one at the end, and every part in between is placed at its leftmost
    occurrence after the previous one. Leftmost placement is never worse than any other (what
    follows has at least as much text left), so nothing is ever retried: a match costs one
    scan per part, O(len(text) * len(pattern)) at worst and usually linear (``str.find``). A
    regular expression ``.*a.*a.*b`` instead backtracks through every placement of every part.

    >>> g = Glob("*a?c*d")
    >>> g.matches("xxabcyd"), g.matches("abd"), Glob("").matches(""), Glob("a*").matches("b")
    (True, False, True, False)
    """

    __slots__ = ("exact", "head", "middle", "tail")

    def __init__(self, pattern: str) -> None:
        parts = pattern.split("*")
        self.exact = len(parts) == 1
        self.head = _Part(parts[0])
        self.tail = _Part(parts[-1])
        self.middle = tuple(_Part(p) for p in parts[1:-1] if p)

    def matches(self, text: str) -> bool:
        n = len(text)
        if self.exact:
            return n == self.head.size and self.head.at(text, 0)
        head, tail = self.head, self.tail
        if head.size + tail.size > n or not head.at(text, 0) or not tail.at(text, n - tail.size):
            return False
        pos, end = head.size, n - tail.size
        for part in self.middle:
            found = part.find(text, pos, end)
            if found < 0:
                return False
            pos = found + part.size
        return True


class _Part:
    """A star-free piece of a pattern: literal characters and ``?``."""

    __slots__ = ("literal", "regex", "size")

    def __init__(self, piece: str) -> None:
        self.size = len(piece)
        self.literal = piece if "?" not in piece else None
        # Without quantifiers a regular expression cannot backtrack: it compares at most
        # len(piece) characters at each start position (in C).
        body = "".join("." if c == "?" else re.escape(c) for c in piece)
        self.regex = None if self.literal is not None else re.compile(body, re.DOTALL)

    def at(self, text: str, pos: int) -> bool:
        if self.literal is not None:
            return text.startswith(self.literal, pos)
        assert self.regex is not None
        return self.regex.match(text, pos) is not None

    def find(self, text: str, start: int, end: int) -> int:
        if self.literal is not None:
            return text.find(self.literal, start, end)
        assert self.regex is not None
        m = self.regex.search(text, start, end)
        return -1 if m is None else m.start()


@functools.lru_cache(maxsize=512)
def glob(pattern: str, fold: bool = False) -> Glob:
    """The compiled ``like`` (``fold``: ``ilike``, ASCII letters folded) pattern, cached."""
    return Glob(pattern.translate(_ASCII_LOWER) if fold else pattern)


def _scalar(op: str, value: Any, literal: Value) -> bool:
    if op in ("like", "ilike"):
        if not isinstance(value, str) or not isinstance(literal, str):
            return False
        fold = op == "ilike"
        return glob(literal, fold).matches(value.translate(_ASCII_LOWER) if fold else value)
    if literal is None:
        return value is None
    if isinstance(literal, bool):
        return isinstance(value, bool) and value == literal
    if isinstance(literal, Decimal):
        n = number(value)
        return n is not None and _ORDER[op](n, literal)
    if isinstance(literal, datetime):
        return isinstance(value, datetime) and _ORDER[op](value, literal)
    return isinstance(value, str) and _ORDER[op](value, literal)


def _compare(op: str, value: Any, literal: Value) -> bool:
    """eq/gt/.../like on one value: absent is false, an array matches through any element."""
    if value is ABSENT:
        return False
    if isinstance(value, list):
        return any(_scalar(op, v, literal) for v in value)
    return _scalar(op, value, literal)


def _leaf(node: Comparison | In | Exists, value: Any) -> bool:
    match node:
        case Exists():
            return value is not ABSENT
        case In(_, literals):
            return any(_compare("eq", value, lit) for lit in literals)
        case Comparison("ne", _, literal):
            return value is not ABSENT and not _compare("eq", value, literal)
        case Comparison(op, _, literal):
            return _compare(op, value, literal)
    raise AssertionError(node)  # pragma: no cover


def matches(node: Node, doc: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> bool:
    """Does a thing match? ``meta`` holds ``_revision``, ``_created``, ``_modified`` (and
    optionally ``_namespace``); without it those fields are absent."""
    meta = meta or {}
    match node:
        case And(children):
            return all(matches(c, doc, meta) for c in children)
        case Or(children):
            return any(matches(c, doc, meta) for c in children)
        case Not(child):
            return not matches(child, doc, meta)
        case Comparison() | In() | Exists():
            return any(_leaf(node, v) for v in _values(node.field, doc, meta))
    raise AssertionError(node)  # pragma: no cover


def fields_of(node: Node) -> set[Field]:
    """Every field a filter reads.

    >>> sorted(fields_of(parse_filter("or(exists(thingId),not(in(attributes/a,1,2)))")))
    [('attributes', 'a'), ('thingId',)]
    """
    match node:
        case And(children) | Or(children):
            return set().union(*(fields_of(c) for c in children))
        case Not(child):
            return fields_of(child)
        case Comparison() | In() | Exists():
            return {node.field}
    raise AssertionError(node)  # pragma: no cover


_RANKS = {type(None): 1, bool: 4, str: 3, list: 5, dict: 6}


def sort_key(field: Field, doc: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
    """The ascending sort key of a field's value (see the module docstring for the order)."""
    value = next(_values(field, doc, meta or {}), ABSENT)
    if value is ABSENT:
        return (0,)
    if isinstance(value, datetime):
        return (2, value)
    n = number(value)
    if n is not None:
        return (2, n)
    rank = _RANKS.get(type(value), 6)
    return (rank, value) if rank in (3, 4) else (rank,)
