"""MQTT topic mappings: topic patterns with placeholders to thing id, feature and property.

A mapping (one entry of ``mappings:`` in the adapter configuration)::

    topic: plant/{namespace}/{thing}/{feature}/{property}   # {x}: one level, {x+}: the rest
    thing: "{namespace}:{thing}"       # template (the default shown); or a fixed id
    feature: "{feature}"               # template (default) or fixed
    property: "{property}"             # template (default); '/' in it nests (a/b -> /a/b)
    value: /value                      # JSON pointer into the payload; absent: the whole payload
    timestamp: /ts                     # source timestamp: ms or s since the epoch, or ISO-8601
    quality: /quality
    fields: {temperature: /temp}       # instead of property/value: several properties per message
    command_topic: plant/{namespace}/{thing}/{feature}/{property}/set
    command_value: /value              # desired value sent as {"value": v}; absent: v as JSON

A payload that is not JSON is taken as a UTF-8 string (no pointer applies to it); one that is
neither raises ``UnicodeDecodeError`` (the adapter drops and counts it). JSON nested deeper than
msgspec's recursion allows raises ``RecursionError`` (dropped likewise).

>>> m = TopicMapping.from_config({"topic": "plant/{namespace}/{thing}/{feature}/{property}",
...     "value": "/v", "timestamp": "/ts",
...     "command_topic": "plant/{namespace}/{thing}/{feature}/{property}/set"})
>>> m.subscription
'plant/+/+/+/+'
>>> [row] = m.updates("plant/org.acme/pump-1/temp/value", b'{"v": 21.5, "ts": 1700000000}')
>>> row.thing_id, row.path, row.value, row.ts
('org.acme:pump-1', '/features/temp/properties/value', 21.5, 1700000000000)
>>> m.command("org.acme:pump-1", "valve", "/open", True)
('plant/org.acme/pump-1/valve/open/set', b'true')
"""

from __future__ import annotations

import math
import re
import string
from datetime import datetime
from typing import Any

import msgspec

from adapters.base import ConfigError
from twinstore.bus.ingest import Update

__all__ = ["TopicMapping", "pick", "property_path", "timestamp_ms"]

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(\+?)\}$")
_MISSING = object()
_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def property_path(feature: str, prop: str) -> str:
    """``/features/<feature>/properties/<prop>``; ``/`` in ``prop`` nests."""
    tokens = [t for t in prop.split("/") if t]
    return f"/features/{_escape(feature)}/properties/" + "/".join(_escape(t) for t in tokens)


def pick(document: Any, pointer: str) -> Any:
    """The value at JSON pointer ``pointer`` (``_MISSING`` sentinel if absent)."""
    value = document
    for raw in pointer.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict):
            if token not in value:
                return _MISSING
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return _MISSING
    return value


# Years 1..9999 in ms since the epoch: what the service accepts as a source timestamp.
_MIN_MS, _MAX_MS = -62_135_596_800_000, 253_402_300_799_999


def timestamp_ms(value: Any) -> int | None:
    """A source timestamp as ms since the epoch: numbers below 1e11 are seconds, strings ISO;
    None for anything else, a time outside the years 1..9999 included.

    >>> timestamp_ms(1700000000), timestamp_ms("2024-01-02T03:04:05Z"), timestamp_ms(1e300)
    (1700000000000, 1704164645000, None)
    """
    if isinstance(value, bool) or value is None or value is _MISSING:
        return None
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        ms = int(value * 1000) if abs(value) < 1e11 else int(value)
    elif isinstance(value, str):
        try:
            ms = int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
        except (ValueError, OverflowError, OSError):
            return None
    else:
        return None
    return ms if _MIN_MS <= ms <= _MAX_MS else None


def _fields_of(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _template_regex(template: str) -> re.Pattern[str]:
    """A regex that recovers the placeholders of ``template`` from a formatted string."""
    pattern = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P<{name}>.+?)"
    return re.compile(pattern + r"\Z")


class TopicMapping:
    """One compiled mapping (see the module docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.topic = str(config["topic"])
        self.thing = str(config.get("thing", "{namespace}:{thing}"))
        self.feature = str(config.get("feature", "{feature}"))
        self.property = str(config.get("property", "{property}"))
        self.value = config.get("value")
        self.timestamp = config.get("timestamp")
        self.quality = config.get("quality")
        self.fields: dict[str, str] = {str(k): str(v) for k, v in (config.get("fields") or {}).items()}
        self.command_topic = config.get("command_topic")
        self.command_value = config.get("command_value")
        levels = self.topic.split("/")
        parts: list[str] = []
        subscription: list[str] = []
        self.names: set[str] = set()
        for i, level in enumerate(levels):
            match = _PLACEHOLDER.match(level)
            if match is None:
                if "{" in level or "}" in level:
                    raise ConfigError(f"topic {self.topic!r}: a placeholder must be a whole level")
                parts.append({"+": "[^/]+", "#": ".*"}.get(level, re.escape(level)))
                subscription.append(level)
                continue
            name, rest = match.groups()
            if rest and i != len(levels) - 1:
                raise ConfigError(f"topic {self.topic!r}: {{{name}+}} must be the last level")
            self.names.add(name)
            parts.append(f"(?P<{name}>.+)" if rest else f"(?P<{name}>[^/]+)")
            subscription.append("#" if rest else "+")
        self.subscription = "/".join(subscription)
        self._regex = re.compile("/".join(parts) + r"\Z")
        used = set(_fields_of(self.thing) + _fields_of(self.feature))
        if not self.fields:
            used |= set(_fields_of(self.property))
        if missing := used - self.names:
            raise ConfigError(f"topic {self.topic!r}: no placeholder for {sorted(missing)}")
        pointers = {k: config.get(k) for k in ("value", "timestamp", "quality", "command_value")}
        pointers |= {f"fields.{name}": pointer for name, pointer in self.fields.items()}
        for key, pointer in pointers.items():
            if pointer is not None and not str(pointer).startswith("/"):
                raise ConfigError(f"topic {self.topic!r}: {key} must be a JSON pointer (/a/b)")
        command_names = set(_fields_of(str(self.command_topic or "")))
        if missing := command_names - self.names - {"property"}:
            raise ConfigError(f"command_topic {self.command_topic!r}: unknown placeholders {missing}")
        self._thing_regex = _template_regex(self.thing)
        self._feature_regex = _template_regex(self.feature)
        self._property_regex = _template_regex(self.property)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TopicMapping:
        if not isinstance(config, dict) or "topic" not in config:
            raise ConfigError(f"mapping {config!r}: needs at least 'topic'")
        return cls(config)

    def match(self, topic: str) -> dict[str, str] | None:
        found = self._regex.match(topic)
        return found.groupdict() if found else None

    # -- source -> twin ------------------------------------------------------------------------

    def updates(self, topic: str, payload: bytes, variables: dict[str, str] | None = None) -> list[Update]:
        """The rows one message gives (empty if the topic does not match or a field is absent)."""
        variables = variables if variables is not None else self.match(topic)
        if variables is None:
            return []
        try:
            document: Any = _decode_json(payload)
        except msgspec.DecodeError:
            # strict: replacement characters would change the device's value without a trace
            document = payload.decode("utf-8")
        thing_id = self.thing.format_map(variables)
        feature = self.feature.format_map(variables)
        ts = timestamp_ms(pick(document, self.timestamp)) if self.timestamp else None
        quality = pick(document, self.quality) if self.quality else None
        quality = None if quality is _MISSING or quality is None else str(quality)
        if self.fields:
            rows = []
            for prop, pointer in self.fields.items():
                value = pick(document, pointer)
                if value is not _MISSING:
                    rows.append(Update(thing_id, property_path(feature, prop), value, ts, quality))
            return rows
        value = pick(document, self.value) if self.value else document
        if value is _MISSING:
            return []
        prop = self.property.format_map(variables)
        return [Update(thing_id, property_path(feature, prop), value, ts, quality)]

    # -- twin -> source ------------------------------------------------------------------------

    def command(self, thing_id: str, feature: str, path: str, value: Any) -> tuple[str, bytes] | None:
        """The (topic, payload) that asks the device to take ``value`` at
        ``features/<feature>/desiredProperties<path>``; None if this mapping does not cover it."""
        if self.command_topic is None:
            return None
        variables: dict[str, str] = {}
        for template, regex, text in (
            (self.thing, self._thing_regex, thing_id),
            (self.feature, self._feature_regex, feature),
        ):
            found = regex.match(text)
            if found is None:
                return None
            for name, got in found.groupdict().items():
                if variables.setdefault(name, got) != got:
                    return None
            if not _fields_of(template) and template != text:
                return None
        prop = "/".join(t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:])
        if self.fields:
            if prop not in self.fields:
                return None
            variables["property"] = prop
        else:
            found = self._property_regex.match(prop)
            if found is None:
                return None
            for name, got in found.groupdict().items():
                if variables.setdefault(name, got) != got:
                    return None
            if "/" in prop and not any(
                _PLACEHOLDER.match(level) and level.endswith("+}") for level in self.topic.split("/")
            ):
                return None  # a nested property cannot be named by single topic levels
        try:
            topic = str(self.command_topic).format_map(variables)
        except KeyError:
            return None
        payload = value
        for raw in reversed(str(self.command_value or "").split("/")[1:]):
            payload = {raw.replace("~1", "/").replace("~0", "~"): payload}
        return topic, _encode_json(payload)
