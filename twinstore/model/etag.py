"""Entity tags and the If-Match / If-None-Match checks, as Ditto does them.

A thing's tag is ``"rev:<revision>"``; a sub-resource's is ``"hash:<digest of its JSON>"``, the
JSON the caller receives: of a resource partly hidden from the caller, the readable part (a
digest of hidden values would let them be guessed offline and confirmed with If-None-Match;
for a fully readable resource it is Ditto's tag).
On sub-resources twinstore also accepts the thing's ``"rev:N"`` tag in If-Match (useful for
"write only if the thing did not change since I read it").

>>> etag_of(None, 3, [])
'"rev:3"'
>>> check(['"rev:3"'], None, current_tag='"rev:3"', thing_tag='"rev:3"', read=False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import orjson

from twinstore.model.errors import (
    HeaderInvalidError,
    PreconditionFailedError,
    PreconditionNotModifiedError,
)
from twinstore.model.patch import MISSING, get_at

__all__ = ["check", "etag_of", "parse_etags", "resource_tag"]


def etag_of(value: Any, revision: int, parts: list[str]) -> str:
    """The ETag of the resource at ``parts`` whose current JSON is ``value``."""
    if not parts:
        return f'"rev:{revision}"'
    digest = hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=8)
    return f'"hash:{digest.hexdigest()}"'


def resource_tag(
    doc: dict[str, Any] | None,
    revision: int,
    parts: list[str],
    visible: Callable[[list[str], Any], Any] | None = None,
) -> str | None:
    """The ETag of the resource at ``parts`` of a thing document; None when it is absent.

    ``visible(parts, value)`` gives the part of the value the caller may read (MISSING: none,
    the resource is absent to them); without it the whole value counts.

    >>> resource_tag({"a": 1}, 4, []), resource_tag({"a": 1}, 4, ["b"])
    ('"rev:4"', None)
    >>> resource_tag({"a": {"b": 1}}, 4, ["a"], lambda parts, value: {}) == etag_of({}, 4, ["a"])
    True
    """
    if doc is None:
        return None
    value = get_at(doc, parts)
    if value is not MISSING and visible is not None and parts:
        value = visible(parts, value)
    return None if value is MISSING else etag_of(value, revision, parts)


def parse_etags(header: str | None) -> list[str] | None:
    """Split an If-Match / If-None-Match header value: ``*`` or a list of quoted tags."""
    if header is None:
        return None
    tags = [tag.strip() for tag in header.split(",") if tag.strip()]
    for tag in tags:
        if tag != "*" and not (len(tag) >= 2 and tag.startswith('"') and tag.endswith('"')):
            if tag.startswith('W/"'):
                continue
            raise HeaderInvalidError(
                f"The value '{header}' of a precondition header is not valid: entity tags must "
                'be quoted (e.g. "rev:1") or "*".'
            )
    return tags


def check(
    if_match: list[str] | None,
    if_none_match: list[str] | None,
    *,
    current_tag: str | None,
    thing_tag: str | None,
    read: bool,
) -> None:
    """Raise 412 (or 304 for reads) when a precondition fails; ``current_tag`` None = absent."""
    if if_match is not None:
        ok = current_tag is not None and (
            "*" in if_match or current_tag in if_match or (thing_tag is not None and thing_tag in if_match)
        )
        if not ok:
            raise PreconditionFailedError(
                f"The comparison of precondition header 'if-match' for the requested Thing "
                f"resource evaluated to false. Header value: '{', '.join(if_match)}', actual "
                f"entity-tag: '{current_tag}'.",
                etag=current_tag,
            )
    if if_none_match is not None and current_tag is not None:
        matched = "*" in if_none_match or current_tag in if_none_match
        if matched:
            if read:
                raise PreconditionNotModifiedError(
                    f"The comparison of precondition header 'if-none-match' for the requested "
                    f"Thing resource evaluated to false. Expected: '{', '.join(if_none_match)}' "
                    f"not to match actual: '{current_tag}'.",
                    etag=current_tag,
                )
            raise PreconditionFailedError(
                f"The comparison of precondition header 'if-none-match' for the requested Thing "
                f"resource evaluated to false. Expected: '{', '.join(if_none_match)}' not to "
                f"match actual: '{current_tag}'.",
                etag=current_tag,
            )
