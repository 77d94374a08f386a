"""The columnar segment encoding: exact round trips, filters that read one device, malformed input, size.

Round trips are checked value by value with ``same``: the same types (an int stays an int, a float a float)
and the same float bits (``-0.0`` is not ``0.0``), which ``==`` on the tuples would not check.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.core import columns
from components.core.columns import Series
from devices.simulator import SensorSeries, live_timestamps

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)
IDS = st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=64)
SHORT_IDS = st.text(alphabet="ab_19z", min_size=1, max_size=3)
RUN = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a: Any, b: Any) -> bool:
    """Equal with the same types everywhere, floats bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@st.composite
def numbers(draw: st.DrawFn, n: int, ints: bool = True) -> list[Any]:
    """n numbers in one of the shapes the encoder tells apart (random, decimals, progressions, runs, mixed)."""
    style = draw(st.sampled_from(["random", "decimals", "progression", "runs", "plateaus", "mixed", "small"]))
    if style == "random":
        return draw(st.lists(INT64 if ints and draw(st.booleans()) else FLOATS, min_size=n, max_size=n))
    if style == "decimals":
        k = draw(st.integers(0, 6))
        return [round(v, k) for v in draw(st.lists(st.floats(-1e9, 1e9), min_size=n, max_size=n))]
    if style == "small":
        return draw(st.lists(st.integers(-300, 300) if ints else st.sampled_from([0.0, -0.0, 1.5, 2.25, 5e-324]),
                             min_size=n, max_size=n))
    if style == "runs":
        value = draw(INT64 if ints and draw(st.booleans()) else FLOATS)
        return [value] * n
    if style == "plateaus":  # runs of equal values, as readings of one event share their received_at
        levels = draw(st.lists(INT64 if ints and draw(st.booleans()) else FLOATS, min_size=1, max_size=4))
        rng = draw(st.randoms(use_true_random=False))
        return [levels[min(len(levels) - 1, i * len(levels) // max(n, 1) + rng.randrange(2))] for i in range(n)]
    start = draw(st.floats(-2e9, 2e9) | st.integers(-(2**40), 2**40))
    step = draw(st.sampled_from([0, 1, 1.0, 0.5, 0.1, 60, 1e-6]))
    rng = draw(st.randoms(use_true_random=False))  # bulk noise: cheaper to draw than n values one by one
    values = [start + i * step + rng.choice([0, 0, 0.001, -0.002, 0.0003]) for i in range(n)]
    if style == "mixed" and ints:
        return [round(v) if rng.random() < 0.5 else float(v) for v in values]
    return values


JSON = st.recursive(st.none() | st.booleans() | INT64 | FLOATS | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=4)


@st.composite
def one_series(draw: st.DrawFn, device: str, sensor: str) -> Series:
    """A series as the compactor hands it over: ts ascending, received_at near ts or anything, optional columns."""
    n = draw(st.integers(0, 24))
    ts = sorted(draw(numbers(n)))
    if draw(st.booleans()):
        rng = draw(st.randoms(use_true_random=False))
        received_at = [float(t) + rng.choice([0.001, 0.0025, 0.003, 0.012]) for t in ts]
    else:
        received_at = [float(v) for v in draw(numbers(n, ints=False))]
    rng = draw(st.randoms(use_true_random=False))  # optional columns: a few drawn values, picked per reading
    seqs = draw(st.lists(st.none() | st.integers(1, 2**63 - 1), min_size=1, max_size=4))
    seq = draw(st.sampled_from([None, list(range(1, n + 1)), [rng.choice(seqs) for _ in range(n)]]))
    dicts = draw(st.lists(st.none() | st.dictionaries(st.text(max_size=4), JSON, max_size=3), min_size=1, max_size=3))
    data = draw(st.sampled_from([None, [rng.choice(dicts) for _ in range(n)]]))
    epochs = draw(st.lists(st.none() | st.text(max_size=6), min_size=1, max_size=3))
    epoch = draw(st.sampled_from([None, [rng.choice(epochs) for _ in range(n)]]))
    return (device, sensor, received_at, ts, draw(numbers(n)), seq, data, epoch)


@st.composite
def segments(draw: st.DrawFn) -> list[Series]:
    """Series of a few devices, sorted by device then sensor type (a pair may repeat: a series cut in two)."""
    out = []
    for device in sorted(draw(st.sets(SHORT_IDS | IDS, max_size=3))):
        for sensor in sorted(draw(st.lists(SHORT_IDS, min_size=1, max_size=2))):
            out.append(draw(one_series(device, sensor)))
    return out


@RUN
@given(segments())
def test_every_segment_round_trips_exactly_with_the_same_types_and_float_bits(series: list[Series]) -> None:
    blob = columns.encode(series)
    assert blob[0] == columns.VERSION
    assert same(columns.decode(blob), series)


@RUN
@given(segments(), st.data())
def test_filters_return_exactly_the_matching_series_in_order(series: list[Series], data: st.DataObject) -> None:
    blob = columns.encode(series)
    assert columns.devices(blob) == list(dict.fromkeys(s[0] for s in series))
    device = data.draw(st.sampled_from([s[0] for s in series]) if series else SHORT_IDS)
    sensor = data.draw(st.sampled_from([s[1] for s in series]) if series else SHORT_IDS)
    assert same(columns.decode(blob, device_id=device), [s for s in series if s[0] == device])
    assert same(columns.decode(blob, sensor_type=sensor), [s for s in series if s[1] == sensor])
    assert same(columns.decode(blob, device, sensor), [s for s in series if s[0] == device and s[1] == sensor])
    assert columns.decode(blob, device_id="no_such_device") == []


def test_special_values_round_trip_exactly() -> None:
    floats = [-0.0, 0.0, 5e-324, -5e-324, 1.7976931348623157e308, -1.7976931348623157e308, 0.1, 1e-300]
    ints = [-(2**63), 2**63 - 1, 0, -1, 2**53 + 1]
    series: list[Series] = [
        ("d", "a", floats, floats, floats, None, None, None),
        ("d", "b", [0.5] * 5, ints, ints, [1, 2**63 - 1, 7, None, 3], [{"k": [1, 2.0, True, None, "x"]}] * 5,
         ["e", None, None, "e", "f"]),
        ("d", "c", [1.0, 2.0, 3.0], [1, 2.5, -0.0], [3, 3.0, -0.0], [5, 6, 7], None, [None, None, None]),
        ("e", "empty", [], [], [], [], [], []),
        ("e", "huge_ints_mixed", [1.0, 2.0], [2**62, 0.5], [2**60, 1.25], None, None, None),
    ]
    assert same(columns.decode(columns.encode(series)), series)


def test_a_realistic_hour_takes_a_fraction_of_a_byte_per_reading() -> None:
    """3,600 readings of one sensor: ts a second apart, values to 2 decimals, received_at a few ms later."""
    ts = [1_700_000_000 + i for i in range(3600)]
    series: list[Series] = [("dev_1", "temperature", [t + 0.003 * (i % 5) for i, t in enumerate(ts)], ts,
                             [round(20 + math.sin(i / 100) * 5, 2) for i in range(3600)], None, None, None)]
    blob = columns.encode(series)
    assert same(columns.decode(blob), series)
    assert len(blob) / 3600 < 0.5  # about 0.17 measured; the target of the design is 4


def test_a_live_hour_of_the_simulator_stays_under_two_bytes_per_reading() -> None:
    """The simulator's random walk to 2 decimals, 10 readings an event sharing received_at, seq and epoch."""
    walk = SensorSeries(7, "dev_2", "humidity")
    ts: list[Any] = []
    received_at: list[float] = []
    for event in range(360):
        now = 1_700_000_000.123456 + 10 * event + 0.0007 * (event % 3)
        ts += list(live_timestamps(now, 10, 1.0))
        received_at += [now + 0.004 + 0.0001 * (event % 7)] * 10
    series: list[Series] = [("dev_2", "humidity", received_at, ts, walk.take(3600), list(range(1, 3601)), None,
                             ["4f1c"] * 3600)]
    blob = columns.encode(series)
    assert same(columns.decode(blob), series)
    assert len(blob) / 3600 < 2.0  # about 1.3 measured: the walk's steps (gauss 1.5 to 2 decimals) dominate


def _small_blob() -> bytes:
    return columns.encode([
        ("d1", "t", [1.5, 2.5, 3.75], [10, 11, 12], [0.25, 1, 2.5], [1, 2, 3], [{"a": 1}, None, {"b": [2]}],
         ["e", "e", None]),
        ("d2", "h", [100.0 + i / 10 for i in range(20)], [100 + i for i in range(20)], list(range(20)), None, None,
         None),
        ("d3", "r", [5.5] * 10 + [6.25] * 10, [1.5 * i for i in range(20)], [2**40 + i % 3 for i in range(20)], None,
         None, None),
    ])


def test_every_truncation_raises_value_error() -> None:
    blob = _small_blob()
    for cut in range(len(blob)):
        with pytest.raises(ValueError):
            columns.decode(blob[:cut])
        with pytest.raises(ValueError):
            columns.devices(blob[:cut]) if cut < 10 else columns.decode(blob[:cut], device_id="d2")


def test_flipped_bytes_raise_value_error_or_decode_to_something() -> None:
    blob = _small_blob()
    for i in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            broken = blob[:i] + bytes([blob[i] ^ mask]) + blob[i + 1:]
            try:
                columns.decode(broken)
                columns.devices(broken)
            except ValueError:
                pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments(), st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=3), st.integers(0))
def test_damaged_segments_raise_value_error_or_decode_to_something(series: list[Series], flips: list[tuple[int, int]],
                                                                    cut: int) -> None:
    blob = bytearray(columns.encode(series))
    for position, mask in flips:
        blob[position % len(blob)] ^= mask
    for damaged in (bytes(blob), bytes(blob[:cut % len(blob)])):
        try:
            columns.decode(damaged)
        except ValueError:
            pass


@RUN
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: bytes([columns.VERSION]) + b))
def test_garbage_raises_value_error_or_decodes_to_something(garbage: bytes) -> None:
    for call in (columns.decode, columns.devices, lambda b: columns.decode(b, "a", "b")):
        try:
            call(garbage)
        except ValueError:
            pass


def test_other_versions_and_non_bytes_raise_value_error() -> None:
    blob = _small_blob()
    placeholder = bytes([1]) + msgpack.packb({"d1": zlib.compress(msgpack.packb([["t", [1.0], [1], [2], None]]))})
    for bad in (bytes([columns.VERSION + 1]) + blob[1:], placeholder, b"", "text", None):
        with pytest.raises(ValueError, match=r"version|bytes"):
            columns.decode(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            columns.devices(bad)  # type: ignore[arg-type]


def _blob_of_one_series(n: int, frames: list[bytes]) -> bytes:
    body = bytearray([1, 1]) + b"t"
    columns._put(body, n)
    for frame in frames:
        columns._put(body, len(frame))
        body += frame
    index = msgpack.packb([["d"], [len(body)]])
    return bytes([columns.VERSION, len(index)]) + index + bytes(body)


def test_declared_sizes_beyond_what_the_bytes_can_hold_are_refused_before_allocating() -> None:
    packed_none = bytes([columns.STORED, columns.K_PACKED]) + msgpack.packb([None])
    with pytest.raises(ValueError, match="declares 1000000000000 readings"):
        columns.decode(_blob_of_one_series(10**12, [packed_none] * 3 + [b""] * 3))
    bomb = bytearray([columns.DEFLATED])
    columns._put(bomb, 10**12)
    bomb += zlib.compress(b"\0" * 1000)[2:-4]
    with pytest.raises(ValueError, match="declares 1000000000000 inflated"):
        columns.decode(_blob_of_one_series(1, [bytes(bomb)] * 3 + [b""] * 3))
    runs = bytes([columns.STORED, columns.K_RUNS]) + msgpack.packb([["e"], [10**15]])
    with pytest.raises(ValueError, match="bad runs"):
        columns.decode(_blob_of_one_series(1, [packed_none] * 3 + [b"", b"", runs]))


def test_devices_reads_the_header_only_and_a_device_query_only_its_block() -> None:
    blob = _small_blob()
    entries, start, _ = columns._index(blob)
    (offset, length), = [(o, n) for d, o, n in entries if d == "d2"]
    broken = blob[:start + offset] + b"\xff" * length + blob[start + offset + length:]  # d2's block is garbage
    assert columns.devices(broken) == ["d1", "d2", "d3"]
    for device in ("d1", "d3"):
        assert same(columns.decode(broken, device_id=device), columns.decode(blob, device_id=device))
    for call in (lambda: columns.decode(broken), lambda: columns.decode(broken, device_id="d2")):
        with pytest.raises(ValueError, match="d2"):
            call()


@pytest.mark.parametrize(("series", "message"), [
    ([("Dev", "t", [1.0], [1], [1], None, None, None)], "device_id 'Dev' does not match"),
    ([("d", "t" * 65, [1.0], [1], [1], None, None, None)], "sensor_type 'ttt"),
    ([("d", "t", [1.0, 2.0], [1], [1], None, None, None)], "column received_at must be a list of 1 readings"),
    ([("d", "t", [1.0], [1], [1], [1, 2], None, None)], "column seq must be a list of 1"),
    ([("d", "t", [1.0], [1], None, None, None, None)], "column value must be a list"),
    ([("a", "t", [1.0], [1], [1], None, None, None), ("b", "t", [1.0], [1], [1], None, None, None),
      ("a", "u", [1.0], [1], [1], None, None, None)], "device_id 'a' comes again"),
    ([("d", "t", [1.0], [1], [2**64], None, None, None)], "msgpack cannot encode"),
])
def test_encoding_refuses_malformed_series_naming_what_is_wrong(series: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        columns.encode(series)
