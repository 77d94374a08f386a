"""The reading model of the wire contract and its validation, in bulk and cheap per reading.

A reading arrives as a JSON-like object on ``iot.sensor.<device_id>.<sensor_type>``. One event carries
one reading or a list of them, all of the topic's device and sensor type, so validation works per event
and returns columns (ts, value, seq, data) rather than one object per reading.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

ID_PATTERN = re.compile(r"[0-9a-z_]{1,64}\Z")
FIELDS = frozenset({"device_id", "sensor_type", "value", "ts", "seq", "data"})
DATA_MAX_BYTES = 8192
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_DATA_MAX_DEPTH = 32

# Reasons a reading is rejected; each names the rule it breaks (they are also the keys of the
# "rejected" counters of iot.get_stats).
NOT_AN_OBJECT = "not_an_object"
UNKNOWN_FIELD = "unknown_field"
BAD_TOPIC = "bad_topic"
DEVICE_ID_MISMATCH = "device_id_mismatch"
SENSOR_TYPE_MISMATCH = "sensor_type_mismatch"
VALUE_MISSING = "value_missing"
VALUE_NOT_NUMBER = "value_not_number"
VALUE_NOT_FINITE = "value_not_finite"
TS_MISSING = "ts_missing"
TS_NOT_NUMBER = "ts_not_number"
TS_NOT_FINITE = "ts_not_finite"
SEQ_NOT_INTEGER = "seq_not_integer"
SEQ_OUT_OF_RANGE = "seq_out_of_range"
DATA_NOT_OBJECT = "data_not_object"
DATA_NOT_JSON = "data_not_json"
DATA_TOO_LARGE = "data_too_large"
EMPTY_EVENT = "empty_event"
BAD_EPOCH = "bad_epoch"

REASONS = {
    NOT_AN_OBJECT: "a reading must be an object (or the event a list of objects)",
    UNKNOWN_FIELD: "fields are device_id, sensor_type, value, ts, seq, data; anything else is refused",
    BAD_TOPIC: "topic must be iot.sensor.<device_id>.<sensor_type> with ids matching ^[0-9a-z_]{1,64}$",
    DEVICE_ID_MISMATCH: "device_id, when present, must equal the topic's <device_id>",
    SENSOR_TYPE_MISMATCH: "sensor_type, when present, must equal the topic's <sensor_type>",
    VALUE_MISSING: "value is required",
    VALUE_NOT_NUMBER: "value must be a number",
    VALUE_NOT_FINITE: "value must be finite (no NaN, no infinity) and within 64-bit range",
    TS_MISSING: "ts is required",
    TS_NOT_NUMBER: "ts must be a number (epoch seconds)",
    TS_NOT_FINITE: "ts must be finite",
    SEQ_NOT_INTEGER: "seq must be an integer",
    SEQ_OUT_OF_RANGE: "seq must be between 1 and 2**63-1",
    DATA_NOT_OBJECT: "data must be an object",
    DATA_NOT_JSON: "data must be plain JSON (string keys, finite numbers, no binary)",
    DATA_TOO_LARGE: f"data must be at most {DATA_MAX_BYTES} bytes encoded as JSON",
    EMPTY_EVENT: "an event must carry at least one reading",
    BAD_EPOCH: "the event's epoch keyword, when present, must match ^[0-9a-z_]{1,64}$",
}


@dataclass(slots=True)
class Columns:
    """The accepted readings of one event, as parallel lists (``seqs``/``datas`` hold None where absent)."""

    ts: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    seqs: list[int | None] = field(default_factory=list)
    datas: list[dict[str, Any] | None] = field(default_factory=list)
    data_bytes: int = 0

    def __len__(self) -> int:
        return len(self.ts)


def valid_id(value: object) -> bool:
    """True when ``value`` is a valid device id or sensor type."""
    return isinstance(value, str) and ID_PATTERN.match(value) is not None


def _number_problem(value: object, missing: str, not_number: str, not_finite: str) -> str | None:
    kind = type(value)
    if kind is float:
        return None if math.isfinite(value) else not_finite  # type: ignore[arg-type]
    if kind is int:
        return None if _INT_MIN <= value <= _INT_MAX else not_finite  # type: ignore[operator]
    if value is None:
        return missing
    return not_number


def _plain_json(value: object, depth: int = 0) -> bool:
    if depth > _DATA_MAX_DEPTH:
        return False
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return _INT_MIN <= value <= _INT_MAX  # type: ignore[operator]
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind is dict:
        return all(type(k) is str and _plain_json(v, depth + 1) for k, v in value.items())  # type: ignore[attr-defined]
    if kind is list:
        return all(_plain_json(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    return False


def _data_size(data: object) -> tuple[str | None, int]:
    """Check freeform data; return (reason or None, encoded size)."""
    if type(data) is not dict:
        return DATA_NOT_OBJECT, 0
    if not _plain_json(data):
        return DATA_NOT_JSON, 0
    size = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > DATA_MAX_BYTES:
        return DATA_TOO_LARGE, size
    return None, size


def check_reading(reading: object, device_id: str, sensor_type: str) -> str | None:
    """The reason ``reading`` breaks the contract on topic ``device_id``/``sensor_type``, or None if valid."""
    if type(reading) is not dict:
        return NOT_AN_OBJECT
    if not reading.keys() <= FIELDS:
        return UNKNOWN_FIELD
    get = reading.get
    problem = _number_problem(get("value"), VALUE_MISSING, VALUE_NOT_NUMBER, VALUE_NOT_FINITE)
    if problem:
        return problem
    problem = _number_problem(get("ts"), TS_MISSING, TS_NOT_NUMBER, TS_NOT_FINITE)
    if problem:
        return problem
    # An optional field given as null counts as absent (JSON clients often send it so).
    claimed = get("device_id")
    if claimed is not None and claimed != device_id:
        return DEVICE_ID_MISMATCH
    claimed = get("sensor_type")
    if claimed is not None and claimed != sensor_type:
        return SENSOR_TYPE_MISMATCH
    seq = get("seq")
    if seq is not None:
        if type(seq) is not int:
            return SEQ_NOT_INTEGER
        if not 1 <= seq <= _INT_MAX:
            return SEQ_OUT_OF_RANGE
    data = get("data")
    if data is not None:
        return _data_size(data)[0]
    return None


_PLAIN_FIELDS = frozenset({"value", "ts", "seq"})
_FLOATS, _INTS = frozenset({float}), frozenset({int})
_NO_SEQ = frozenset({type(None)})


def _plain_numbers(column: list[Any]) -> bool:
    """True when the items are all finite floats or all 64-bit ints (checked in bulk, no Python loop per item)."""
    types = frozenset(map(type, column))
    if types == _INTS:
        return _INT_MIN <= min(column) and max(column) <= _INT_MAX
    # a NaN or an infinity makes the sum one (so may a huge sum of finite floats: those take the slow path)
    return types == _FLOATS and math.isfinite(sum(column))


def _plain_event(readings: list[Any]) -> Columns | None:
    """The columns of an event whose readings are all plain ``{"value", "ts"[, "seq"]}``, or None.

    Devices send such events nearly always; checking them column by column costs a fraction of checking
    each reading. Anything else (None) goes through the per-reading checks, which name each problem.
    """
    try:
        if not set().union(*readings) <= _PLAIN_FIELDS:
            return None
        ts = [r["ts"] for r in readings]
        values = [r["value"] for r in readings]
    except (TypeError, KeyError):
        return None
    try:
        seqs = [r["seq"] for r in readings]
    except KeyError:
        seqs = [r.get("seq") for r in readings]
    if not (_plain_numbers(ts) and _plain_numbers(values)):
        return None
    seq_types = frozenset(map(type, seqs))
    if seq_types != _NO_SEQ and (seq_types != _INTS or min(seqs) < 1 or max(seqs) > _INT_MAX):
        return None
    return Columns(ts, values, seqs, [None] * len(readings))


def validate_event(device_id: str, sensor_type: str, payload: object) -> tuple[Columns, list[tuple[int, str]]]:
    """Validate one event's payload (a reading or a list of readings) published on the given topic.

    Returns the accepted readings as columns and the rejected ones as (index in the event, reason).
    A rejected reading never affects the others of the event.
    """
    readings = payload if type(payload) is list else [payload]
    if len(readings) > 1:
        fast = _plain_event(readings)
        if fast is not None:
            return fast, []
    cols = Columns()
    rejected: list[tuple[int, str]] = []
    if not readings:
        rejected.append((0, EMPTY_EVENT))
        return cols, rejected
    ts_append, value_append = cols.ts.append, cols.values.append
    seq_append, data_append = cols.seqs.append, cols.datas.append
    for index, r in enumerate(readings):
        # Fast path: the common reading is {"value": float, "ts": float[, "seq": int]}.
        if type(r) is dict and r.keys() <= FIELDS:
            value = r.get("value")
            ts = r.get("ts")
            if (type(value) is float and math.isfinite(value) and type(ts) is float and math.isfinite(ts)
                    and "device_id" not in r and "sensor_type" not in r and "data" not in r):
                seq = r.get("seq")
                if seq is None:
                    ts_append(ts)
                    value_append(value)
                    seq_append(None)
                    data_append(None)
                    continue
                if type(seq) is int and 1 <= seq <= _INT_MAX:
                    ts_append(ts)
                    value_append(value)
                    seq_append(seq)
                    data_append(None)
                    continue
        reason = check_reading(r, device_id, sensor_type)
        if reason is not None:
            rejected.append((index, reason))
            continue
        ts_append(r["ts"])
        value_append(r["value"])
        seq_append(r.get("seq"))
        data = r.get("data")
        data_append(data)
        if data is not None:
            cols.data_bytes += _data_size(data)[1]
    return cols, rejected


def reading_dict(device_id: str, sensor_type: str, ts: float, value: float, seq: int | None,
                 data: dict[str, Any] | None, received_at: float) -> dict[str, Any]:
    """A stored reading as queries return it."""
    out: dict[str, Any] = {"device_id": device_id, "sensor_type": sensor_type, "value": value, "ts": ts}
    if seq is not None:
        out["seq"] = seq
    if data is not None:
        out["data"] = data
    out["received_at"] = received_at
    return out
