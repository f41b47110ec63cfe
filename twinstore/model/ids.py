"""Thing ids and resource paths (Ditto's rules).

A thing id is ``namespace:name``: the namespace is a dot-separated list of Java-like
identifiers (or empty), the name has no control characters and no ``/``; at most 256
characters in all.

>>> validate_thing_id("org.acme:pump-1")
'org.acme:pump-1'
>>> split_thing_id("org.acme:pump-1")
('org.acme', 'pump-1')
"""

from __future__ import annotations

import re
from functools import lru_cache

from twinstore.model.errors import InvalidInputError, PolicyIdInvalidError, ThingIdInvalidError

__all__ = [
    "NAMESPACE_RE",
    "join_pointer",
    "parse_pointer",
    "split_thing_id",
    "validate_key",
    "validate_namespace",
    "validate_policy_id",
    "validate_thing_id",
]

NAMESPACE_RE = re.compile(r"^(|[a-zA-Z]\w*(\.[a-zA-Z]\w*)*)$")
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f-\x9f/]+$")
_KEY_RE = re.compile(r"^[^\x00-\x1f\x7f-\x9f/]+$")
MAX_ID_LENGTH = 256


def validate_thing_id(thing_id: str) -> str:
    """Return ``thing_id`` if it is valid, else raise :class:`ThingIdInvalidError`."""
    namespace, sep, name = thing_id.partition(":")
    if (
        not sep
        or len(thing_id) > MAX_ID_LENGTH
        or not NAMESPACE_RE.match(namespace)
        or not _NAME_RE.match(name)
    ):
        raise ThingIdInvalidError(f"Thing ID '{thing_id}' is not valid!")
    return thing_id


def validate_policy_id(policy_id: str) -> str:
    """A policy id follows the thing id rules; else :class:`PolicyIdInvalidError` (400).

    >>> validate_policy_id("org.acme:pumps")
    'org.acme:pumps'
    """
    try:
        return validate_thing_id(policy_id)
    except ThingIdInvalidError:
        raise PolicyIdInvalidError(f"Policy ID '{policy_id}' is not valid!") from None


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if valid (``org.acme``), else raise ThingIdInvalidError."""
    if not NAMESPACE_RE.match(namespace):
        raise ThingIdInvalidError(f"Namespace '{namespace}' is not valid!")
    return namespace


def split_thing_id(thing_id: str) -> tuple[str, str]:
    """``"ns:name"`` -> ``("ns", "name")``."""
    namespace, _, name = thing_id.partition(":")
    return namespace, name


def validate_key(key: str) -> str:
    """A JSON key usable as a pointer segment in Ditto (no ``/``, no control chars)."""
    if not _KEY_RE.match(key):
        raise InvalidInputError(
            f"The JSON key '{key}' is not valid: it must not be empty and must not contain "
            "slashes or control characters.",
            error="json.key.invalid",
        )
    return key


def parse_pointer(pointer: str) -> list[str]:
    """Split a Ditto JSON pointer into segments; empty segments (``//``) are ignored.

    >>> parse_pointer("/features/f/properties/a")
    ['features', 'f', 'properties', 'a']
    >>> parse_pointer("/")
    []
    """
    return list(_split(pointer))


@lru_cache(maxsize=16_384)
def _split(pointer: str) -> tuple[str, ...]:
    # Writes repeat the same few paths; callers get their own list of the cached tuple.
    return tuple(part for part in pointer.split("/") if part)


def join_pointer(parts: list[str]) -> str:
    """Inverse of :func:`parse_pointer` (``[]`` -> ``"/"``)."""
    return "/" + "/".join(parts)
