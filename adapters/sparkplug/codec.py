"""Sparkplug B metric values to JSON and back (payloads: :mod:`.sparkplug_b_pb2`).

>>> m = metric("Motor/Speed", DataType.Int16, -3)
>>> m.int_value, value_of(m)
(4294967293, -3)
>>> value_of(metric("t", DataType.Float, 0.1))
0.1
"""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from adapters.sparkplug.sparkplug_b_pb2 import Payload

__all__ = ["DataType", "datatype_of", "metric", "quality_of", "value_of"]


class DataType(IntEnum):
    """Sparkplug B data types (the ``DataType`` enum of the schema)."""

    Unknown = 0
    Int8 = 1
    Int16 = 2
    Int32 = 3
    Int64 = 4
    UInt8 = 5
    UInt16 = 6
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14
    UUID = 15
    DataSet = 16
    Bytes = 17
    File = 18
    Template = 19
    PropertySet = 20
    PropertySetList = 21
    Int8Array = 22
    Int16Array = 23
    Int32Array = 24
    Int64Array = 25
    UInt8Array = 26
    UInt16Array = 27
    UInt32Array = 28
    UInt64Array = 29
    FloatArray = 30
    DoubleArray = 31
    BooleanArray = 32
    StringArray = 33
    DateTimeArray = 34


_SIGNED_32 = {DataType.Int8, DataType.Int16, DataType.Int32}
_INT_32 = _SIGNED_32 | {DataType.UInt8, DataType.UInt16, DataType.UInt32}
_INT_64 = {DataType.Int64, DataType.UInt64, DataType.DateTime}
_ARRAYS = {
    DataType.Int8Array: "b",
    DataType.Int16Array: "h",
    DataType.Int32Array: "i",
    DataType.Int64Array: "q",
    DataType.UInt8Array: "B",
    DataType.UInt16Array: "H",
    DataType.UInt32Array: "I",
    DataType.UInt64Array: "Q",
    DataType.FloatArray: "f",
    DataType.DoubleArray: "d",
    DataType.DateTimeArray: "q",
}
# Ignition's quality codes in a metric's "Quality" property.
_QUALITY = {192: "Good", 0: "Bad", 500: "Stale"}


def datatype_of(code: int | None) -> DataType:
    """The DataType of a schema code (Unknown for codes this schema does not know)."""
    try:
        return DataType(code or 0)
    except ValueError:
        return DataType.Unknown


def _float32(value: float) -> float:
    """The shortest decimal that is the same float32 (0.1f reads as 0.1, not 0.10000000149)."""
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
            return candidate
    return value


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _array(datatype: DataType, raw: bytes) -> list[Any]:
    if datatype == DataType.BooleanArray:
        count = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
        bits = raw[4:]
        return [bool(bits[i // 8] >> (7 - i % 8) & 1) for i in range(min(count, len(bits) * 8))]
    if datatype == DataType.StringArray:
        return [s.decode("utf-8", errors="replace") for s in raw.split(b"\0")[:-1]]
    code = _ARRAYS[datatype]
    values = [
        v for (v,) in struct.iter_unpack("<" + code, raw[: len(raw) - len(raw) % struct.calcsize(code)])
    ]
    if datatype == DataType.DateTimeArray:
        return [_iso(v) for v in values]
    if datatype == DataType.FloatArray:
        return [_float32(v) for v in values]
    return values


def _scalar(kind: str, raw: Any, datatype: DataType) -> Any:
    if kind in ("int_value", "long_value"):
        value = int(raw)
        if datatype in _SIGNED_32 and value >= 1 << 31:
            value -= 1 << 32
        elif datatype == DataType.Int64 and value >= 1 << 63:
            value -= 1 << 64
        return _iso(value) if datatype == DataType.DateTime else value
    if kind == "float_value":
        return _float32(float(raw))
    return raw


def value_of(m: Payload.Metric, datatype: int | None = None) -> Any:
    """The JSON value of a metric (``datatype`` from its BIRTH when the metric has none)."""
    if m.is_null:
        return None
    dt = datatype_of(m.datatype or datatype)
    kind = m.WhichOneof("value")
    if kind is None:
        return None
    if kind == "bytes_value":
        if dt in _ARRAYS or dt in (DataType.BooleanArray, DataType.StringArray):
            return _array(dt, m.bytes_value)
        return base64.b64encode(m.bytes_value).decode()
    if kind == "dataset_value":
        ds = m.dataset_value
        return {
            "columns": list(ds.columns),
            "types": [datatype_of(t).name for t in ds.types],
            "rows": [
                [
                    _scalar(e.WhichOneof("value") or "", _element(e), datatype_of(t))
                    for e, t in zip(row.elements, ds.types, strict=False)
                ]
                for row in ds.rows
            ],
        }
    if kind == "template_value":
        return {t.name: value_of(t) for t in m.template_value.metrics}
    if kind == "extension_value":
        return None
    return _scalar(kind, getattr(m, kind), dt)


def _element(e: Payload.DataSet.DataSetValue) -> Any:
    kind = e.WhichOneof("value")
    return getattr(e, kind) if kind and kind != "extension_value" else None


def quality_of(m: Payload.Metric) -> str | None:
    """The metric's ``Quality`` property (Ignition's codes: 192 Good, 0 Bad, 500 Stale)."""
    props = m.properties
    for key, value in zip(props.keys, props.values, strict=False):
        if key.lower() == "quality":
            kind = value.WhichOneof("value")
            raw = getattr(value, kind) if kind and kind != "extension_value" else None
            if isinstance(raw, int) and not isinstance(raw, bool):
                return _QUALITY.get(raw, str(raw))
            return None if raw is None else str(raw)
    return None


def _infer(value: Any) -> DataType:
    if isinstance(value, bool):
        return DataType.Boolean
    if isinstance(value, int):
        return DataType.Int64
    if isinstance(value, float):
        return DataType.Double
    return DataType.String


def metric(
    name: str | None,
    datatype: int | None,
    value: Any,
    *,
    alias: int | None = None,
    timestamp: int | None = None,
) -> Payload.Metric:
    """A metric carrying ``value`` as ``datatype`` (inferred from the value when None/Unknown)."""
    m = Payload.Metric()
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    if timestamp is not None:
        m.timestamp = timestamp
    dt = DataType(datatype) if datatype else _infer(value)
    m.datatype = int(dt)
    if value is None:
        m.is_null = True
    elif dt in _INT_32:
        m.int_value = int(value) & 0xFFFFFFFF
    elif dt in _INT_64:
        m.long_value = int(value) & 0xFFFFFFFFFFFFFFFF
    elif dt == DataType.Float:
        m.float_value = float(value)
    elif dt == DataType.Double:
        m.double_value = float(value)
    elif dt == DataType.Boolean:
        m.boolean_value = bool(value)
    elif dt in (DataType.String, DataType.Text, DataType.UUID):
        m.string_value = value if isinstance(value, str) else str(value)
    elif dt in (DataType.Bytes, DataType.File):
        m.bytes_value = base64.b64decode(value) if isinstance(value, str) else bytes(value)
    else:
        raise ValueError(f"cannot send a value of Sparkplug type {dt.name}")
    return m
