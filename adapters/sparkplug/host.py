"""Sparkplug B host side: BIRTH/DATA/DEATH certificates of edge nodes and devices to twin rows.

Topics ``spBv1.0/<group>/<type>/<edge node>[/<device>]``. The unified-namespace mapping:

* thing id ``<namespace>:<group>.<edge node>`` for an edge node (N* messages) and
  ``<namespace>:<group>.<edge node>.<device>`` for a device (D* messages);
* a metric name is a ``/``-separated folder path: its first folder is the feature, the rest the
  property (``Motor/Bearing/Temp`` -> ``features/Motor/properties/Bearing/Temp``); a metric
  without folder goes to the feature ``metrics`` (``default_feature``);
* BIRTH sets ``features/connectivity/properties/status`` to ``online`` and writes every
  metric's value; DATA writes the metrics it carries; a node's DEATH (with the ``bdSeq`` of
  its current BIRTH, a stale one is ignored) sets the node and all its devices ``offline``,
  a device's DEATH that device;
* aliases: BIRTH certificates name every metric with its alias (and datatype); DATA may carry
  only the alias. A DATA before any BIRTH, or with an alias its BIRTH did not name, is dropped
  and the node is asked to rebirth (NCMD ``Node Control/Rebirth``), at most every 5 s;
* ``seq`` (0..255 per node over NBIRTH, NDATA, DBIRTH, DDATA, DDEATH) is checked; a gap is
  logged and counted and asks for a rebirth;
* source timestamp = the metric's timestamp, else the payload's; quality = the metric's
  ``Quality`` property;
* a payload with more than ``max_metrics`` metrics is dropped whole, a metric whose value
  cannot be converted (a DateTime beyond the year 9999) alone; both logged and counted in
  ``dropped``. NaN and Infinity floats go on as such: the forwarder drops those rows (JSON
  cannot carry them; ``null`` would delete the property).

>>> host = SparkplugHost("org.acme")
>>> speed = metric("Motor/Speed", DataType.Float, 1.5, alias=1)
>>> birth = payload(0, [metric("bdSeq", DataType.Int64, 3), speed])
>>> for u in host.handle("spBv1.0/g1/NBIRTH/e1", birth, 0).updates:
...     print(u.thing_id, u.path, u.value)
org.acme:g1.e1 /features/connectivity/properties/status online
org.acme:g1.e1 /features/Motor/properties/Speed 1.5
>>> data = payload(1, [metric(None, None, 2.5, alias=1)])
>>> [(u.path, u.value) for u in host.handle("spBv1.0/g1/NDATA/e1", data, 0).updates]
[('/features/Motor/properties/Speed', 2.5)]
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from adapters.limits import MAX_SPARKPLUG_METRICS
from adapters.mapping import property_path
from adapters.sparkplug.codec import DataType, metric, quality_of, value_of
from adapters.sparkplug.sparkplug_b_pb2 import Payload
from twinstore.bus.ingest import Update

__all__ = ["DataType", "Outcome", "SparkplugHost", "metric", "payload"]

log = logging.getLogger("adapters.sparkplug")

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
REBIRTH_INTERVAL = 5.0


def payload(seq: int | None, metrics: list[Payload.Metric], timestamp: int | None = None) -> bytes:
    """An encoded Sparkplug B payload."""
    p = Payload(timestamp=int(time.time() * 1000) if timestamp is None else timestamp)
    if seq is not None:
        p.seq = seq
    p.metrics.extend(metrics)
    return p.SerializeToString()


class MetricInfo(msgspec.Struct, frozen=True):
    name: str
    datatype: int
    alias: int | None


class _Birth:
    """What one BIRTH certificate declared (a node's or a device's)."""

    def __init__(self) -> None:
        self.by_alias: dict[int, MetricInfo] = {}
        self.by_name: dict[str, MetricInfo] = {}

    def learn(self, m: Payload.Metric) -> None:
        info = MetricInfo(m.name, m.datatype, m.alias if m.HasField("alias") else None)
        self.by_name[m.name] = info
        if info.alias is not None:
            self.by_alias[info.alias] = info

    def resolve(self, m: Payload.Metric) -> MetricInfo | None:
        if m.name:
            return self.by_name.get(m.name) or MetricInfo(m.name, m.datatype, None)
        return self.by_alias.get(m.alias) if m.HasField("alias") else None


class _Node:
    def __init__(self, bd_seq: int | None, seq: int) -> None:
        self.bd_seq = bd_seq
        self.seq = seq
        self.birth = _Birth()
        self.devices: dict[str, _Birth] = {}


class Outcome(msgspec.Struct):
    """What one message gives: rows for the twin and MQTT messages to publish (rebirths)."""

    updates: list[Update] = msgspec.field(default_factory=list)
    publish: list[tuple[str, bytes]] = msgspec.field(default_factory=list)


class SparkplugHost:
    """Decodes the Sparkplug B messages of all edge nodes seen (see the module docstring)."""

    def __init__(
        self,
        namespace: str,
        *,
        default_feature: str = "metrics",
        connectivity_feature: str = "connectivity",
        request_rebirth: bool = True,
        max_metrics: int = MAX_SPARKPLUG_METRICS,
    ) -> None:
        self.namespace = namespace
        self.max_metrics = max_metrics
        self.default_feature = default_feature
        self.connectivity_feature = connectivity_feature
        self.request_rebirth = request_rebirth
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._things: dict[str, tuple[str, str, str | None]] = {}
        self._rebirth_asked: dict[tuple[str, str], float] = {}
        self.seq_gaps = 0
        self.dropped = 0

    def thing_id(self, group: str, edge: str, device: str | None = None) -> str:
        name = f"{group}.{edge}" if device is None else f"{group}.{edge}.{device}"
        return f"{self.namespace}:{name}"

    # -- source -> twin ------------------------------------------------------------------------

    def handle(self, topic: str, raw: bytes, now_ms: int) -> Outcome:
        """Rows (and rebirth requests) for one message on ``spBv1.0/...``."""
        out = Outcome()
        levels = topic.split("/")
        if len(levels) not in (4, 5) or levels[0] != NAMESPACE:
            return out
        _, group, kind, edge, *rest = levels
        device = rest[0] if rest else None
        if kind not in ("NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH"):
            return out  # NCMD/DCMD (ours), STATE
        try:
            p = Payload.FromString(raw)
        except Exception:  # protobuf's DecodeError; nothing else can come from bytes
            log.warning("undecodable Sparkplug payload", extra={"topic": topic})
            self.dropped += 1
            return out
        if len(p.metrics) > self.max_metrics:
            # Dropped before any metric is looked at: a rebirth would only send it again.
            self.dropped += 1
            log.warning(
                "Sparkplug payload dropped: too many metrics",
                extra={"topic": topic, "metrics": len(p.metrics), "max_metrics": self.max_metrics},
            )
            return out
        key = (group, edge)
        ts = p.timestamp if p.HasField("timestamp") else now_ms
        if kind == "NBIRTH":
            bd_seq = next((int(m.long_value or m.int_value) for m in p.metrics if m.name == "bdSeq"), None)
            born = self._nodes[key] = _Node(bd_seq, p.seq)
            self._things[self.thing_id(group, edge)] = (group, edge, None)
            self._status(out, self.thing_id(group, edge), "online", ts)
            self._metrics(out, p, born.birth, self.thing_id(group, edge), ts, learn=True)
            return out
        node = self._nodes.get(key)
        if kind == "NDEATH":
            bd_seq = next((int(m.long_value or m.int_value) for m in p.metrics if m.name == "bdSeq"), None)
            if node is not None and None not in (node.bd_seq, bd_seq) and node.bd_seq != bd_seq:
                log.info("stale NDEATH ignored", extra={"topic": topic, "bdSeq": bd_seq})
                return out
            self._status(out, self.thing_id(group, edge), "offline", ts)
            for name in node.devices if node is not None else {}:
                self._status(out, self.thing_id(group, edge, name), "offline", ts)
            self._nodes.pop(key, None)
            return out
        if node is None:
            self._drop(out, group, edge, f"{kind} before NBIRTH")
            return out
        self._check_seq(out, node, p, group, edge, topic)
        if kind == "NDATA":
            self._metrics(out, p, node.birth, self.thing_id(group, edge), ts, group=group, edge=edge)
        elif device is None:
            return out
        elif kind == "DBIRTH":
            birth = node.devices[device] = _Birth()
            self._things[self.thing_id(group, edge, device)] = (group, edge, device)
            self._status(out, self.thing_id(group, edge, device), "online", ts)
            self._metrics(out, p, birth, self.thing_id(group, edge, device), ts, learn=True)
        elif kind == "DDATA":
            known = node.devices.get(device)
            if known is None:
                self._drop(out, group, edge, f"DDATA of {device} before its DBIRTH")
            else:
                thing = self.thing_id(group, edge, device)
                self._metrics(out, p, known, thing, ts, group=group, edge=edge)
        elif kind == "DDEATH":
            node.devices.pop(device, None)
            self._status(out, self.thing_id(group, edge, device), "offline", ts)
        return out

    def _status(self, out: Outcome, thing_id: str, status: str, ts: int) -> None:
        out.updates.append(Update(thing_id, property_path(self.connectivity_feature, "status"), status, ts))

    def _metrics(
        self,
        out: Outcome,
        p: Payload,
        birth: _Birth,
        thing_id: str,
        ts: int,
        *,
        learn: bool = False,
        group: str = "",
        edge: str = "",
    ) -> None:
        for m in p.metrics:
            if learn:
                birth.learn(m)
            info = birth.resolve(m)
            if info is None:
                self._drop(out, group, edge, f"unknown alias {m.alias}")
                continue
            if info.name == "bdSeq" or info.name.startswith("Node Control/"):
                continue
            path = self._path(info.name)
            try:
                value = value_of(m, info.datatype)
            except (ValueError, OverflowError, OSError) as exc:  # a time datetime cannot hold
                self.dropped += 1
                log.warning(
                    "Sparkplug metric dropped: %s",
                    type(exc).__name__,
                    extra={"thing_id": thing_id, "path": path[:300], "datatype": info.datatype},
                )
                continue
            when = m.timestamp if m.HasField("timestamp") else ts
            out.updates.append(Update(thing_id, path, value, when, quality_of(m)))

    def _path(self, name: str) -> str:
        folder, _, rest = name.partition("/")
        if not rest:
            return property_path(self.default_feature, folder)
        return property_path(folder, rest)

    def _check_seq(self, out: Outcome, node: _Node, p: Payload, group: str, edge: str, topic: str) -> None:
        if not p.HasField("seq"):
            return
        expected = (node.seq + 1) % 256
        node.seq = p.seq
        if p.seq != expected:
            self.seq_gaps += 1
            log.warning("Sparkplug seq gap", extra={"topic": topic, "expected": expected, "seq": p.seq})
            self._ask_rebirth(out, group, edge)

    def _drop(self, out: Outcome, group: str, edge: str, why: str) -> None:
        self.dropped += 1
        log.warning("Sparkplug message dropped: %s", why, extra={"group": group, "edge_node": edge})
        self._ask_rebirth(out, group, edge)

    def _ask_rebirth(self, out: Outcome, group: str, edge: str) -> None:
        if not self.request_rebirth:
            return
        now = time.monotonic()
        if now - self._rebirth_asked.get((group, edge), -REBIRTH_INTERVAL) < REBIRTH_INTERVAL:
            return
        self._rebirth_asked[(group, edge)] = now
        body = payload(None, [metric(REBIRTH, DataType.Boolean, True)])
        out.publish.append((f"{NAMESPACE}/{group}/NCMD/{edge}", body))

    # -- twin -> source ------------------------------------------------------------------------

    def command(self, thing_id: str, feature: str, path: str, value: Any) -> tuple[str, bytes] | None:
        """NCMD/DCMD asking an edge node or device to set the metric behind
        ``features/<feature>/desiredProperties<path>``; None for things not born here."""
        where = self._things.get(thing_id)
        if where is None:
            return None
        group, edge, device = where
        prop = "/".join(t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:])
        name = prop if feature == self.default_feature else f"{feature}/{prop}"
        node = self._nodes.get((group, edge))
        birth = None if node is None else (node.birth if device is None else node.devices.get(device))
        info = None if birth is None else birth.by_name.get(name)
        m = metric(name, info.datatype if info else None, value, alias=info.alias if info else None)
        if device is None:
            return f"{NAMESPACE}/{group}/NCMD/{edge}", payload(None, [m])
        return f"{NAMESPACE}/{group}/DCMD/{edge}/{device}", payload(None, [m])
