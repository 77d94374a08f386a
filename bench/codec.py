"""Segment column codecs: bytes per reading and encode/decode µs per reading, per data shape and encoding.

No stack is started: this times :mod:`components.core.columns` and its alternatives in-process. Each shape
is one series of 3,600 readings (an hour at one reading a second) of ts, received_at and value:

* ``live``: the device simulator as ``devices/fleet.py`` runs it (a random walk rounded to 2 decimals,
  ``ts`` from ``live_timestamps``: µs-rounded ``time.time()`` on a 1 s schedule with jitter), received_at
  1-6 ms later; ``live, 10 an event``: the same with 10 readings an event, which share one received_at;
* ``sine int ts``: ints ts a second apart, ``round(20 + sin(i / 100) * 5, 2)``, received_at ts + 3 ms * k;
* ``time.time() jitter``: unrounded float ts on a 1 s grid with up to 2 ms of jitter, received_at 1-6 ms
  later, values to 1 decimal;
* ``random floats``: the same stamps, ``random.uniform(0, 100)`` values (53 random bits: the floor);
* ``int counter``: ints ts, int values growing by 0-5, received_at ts + 2 ms + jitter.

Encodings, applied to each of the three columns alone: ``msgpack+zlib`` (the row-wise baseline),
``shuffle+zlib`` and ``shuffle+lzma`` (the float64/int64 bytes transposed), ``xor+shuffle+zlib``
(Gorilla-style, XOR with the previous value's bits), then the module's own numeric payload with one forced
transform (``none``/``delta``/``dod``/``line``: decimal-scaled ints when exact, else the ints or the
float bits; minus their minimum, byte planes, a deflate block per plane), and ``adaptive``, what
``columns.encode`` chooses (it may also store received_at relative to ts), timed as a whole segment.
One line per (shape, encoding); the adaptive line names what was chosen per column.
"""

from __future__ import annotations

import lzma
import math
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from bench.entry import Options, run_main
from bench.results import emit, note
from components.core import columns
from devices.simulator import SensorSeries, live_timestamps

N = 3600
T0 = 1_700_000_000.123456
COLUMN_NAMES = ("ts", "received_at", "value")
COLUMNS = {"codec": ["bytes_per_reading", "ts_bytes_per_reading", "received_at_bytes_per_reading",
                     "value_bytes_per_reading", "encode_us_per_reading", "decode_us_per_reading", "decode_ms"]}
Shape = tuple[list[float], list[Any], list[Any]]
"""(received_at, ts, value) of one series."""
Codec = tuple[Callable[[list[Any]], bytes], Callable[[bytes, int], list[Any]]]
"""Encode one column, decode it (given its length)."""
_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_TRANSFORMS = {"none": columns.T_NONE, "delta": columns.T_DELTA, "dod": columns.T_DOD, "line": columns.T_LINE}


# ---- the shapes


def live_shape(rng: random.Random, batch: int) -> Shape:
    """The simulator's walk, µs-rounded stamps ``batch`` to an event sent on a 1 s schedule with a few ms of
    jitter (as devices/fleet.py does), one received_at per event 1-6 ms after it is sent (unrounded)."""
    walk = SensorSeries(1, "dev_1", "temperature")
    ts: list[Any] = []
    received_at: list[float] = []
    for event in range(N // batch):
        now = T0 + (event + 1) * batch + rng.uniform(0.0, 0.004)
        ts += list(live_timestamps(now, batch, 1.0))
        received_at += [now + rng.uniform(0.001, 0.006)] * batch
    return received_at, ts, walk.take(N)


def sine_shape(rng: random.Random) -> Shape:
    """The unit test's hour: int ts, a sine to 2 decimals, received_at 0-12 ms after ts."""
    ts = [1_700_000_000 + i for i in range(N)]
    return [t + 0.003 * rng.randrange(5) for t in ts], ts, [round(20 + math.sin(i / 100) * 5, 2) for i in range(N)]


def jitter_stamps(rng: random.Random) -> tuple[list[float], list[Any]]:
    """Unrounded float ts on a 1 s grid with up to 2 ms of jitter, received_at 1-6 ms later."""
    ts = [T0 + i + rng.uniform(0.0, 0.002) for i in range(N)]
    return [t + rng.uniform(0.001, 0.006) for t in ts], ts


def jitter_shape(rng: random.Random) -> Shape:
    """time.time()-like stamps, values to 1 decimal."""
    received_at, ts = jitter_stamps(rng)
    value = 21.0
    values = []
    for _ in range(N):
        value += rng.gauss(0.0, 0.05)
        values.append(round(value, 1))
    return received_at, ts, values


def random_shape(rng: random.Random) -> Shape:
    """time.time()-like stamps, uniformly random float values."""
    received_at, ts = jitter_stamps(rng)
    return received_at, ts, [rng.uniform(0.0, 100.0) for _ in range(N)]


def counter_shape(rng: random.Random) -> Shape:
    """Int ts and an int counter."""
    ts = [1_700_000_000 + i for i in range(N)]
    counts = np.cumsum([rng.randrange(6) for _ in range(N)]).tolist()
    return [t + 0.002 + rng.uniform(0.0, 0.001) for t in ts], ts, counts


SHAPES: dict[str, Callable[[random.Random], Shape]] = {
    "live": lambda rng: live_shape(rng, 1), "live, 10 an event": lambda rng: live_shape(rng, 10),
    "sine int ts": sine_shape, "time.time() jitter": jitter_shape,
    "random floats": random_shape, "int counter": counter_shape}


# ---- the alternatives


def _as_int64(col: list[Any]) -> tuple[np.ndarray, bool]:
    """The column's int64 (ints) or float64 bits (floats), and whether it was ints."""
    is_int = all(type(v) is int for v in col)
    return (np.array(col, dtype=np.int64) if is_int else np.array(col, dtype=np.float64).view(np.int64)), is_int


def _from_int64(x: np.ndarray, is_int: bool) -> list[Any]:
    out: list[Any] = (x if is_int else x.view(np.float64)).tolist()
    return out


def _shuffled(x: np.ndarray) -> bytes:
    return x.astype("<i8").view(np.uint8).reshape(-1, 8).T.tobytes()


def _unshuffled(raw: bytes, n: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).reshape(8, n).T.copy().view("<i8").reshape(n).astype(np.int64)


def _packed_codec() -> Codec:
    return (lambda col: zlib.compress(msgpack.packb(col), 9),
            lambda blob, n: list(msgpack.unpackb(zlib.decompress(blob))))


def _shuffle_codec(compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes], xor: bool) -> Codec:
    """A type byte, then the (XORed) int64 bytes transposed, compressed."""

    def encode(col: list[Any]) -> bytes:
        x, is_int = _as_int64(col)
        if xor:
            x = np.concatenate([x[:1], x[1:] ^ x[:-1]])
        return bytes([is_int]) + compress(_shuffled(x))

    def decode(blob: bytes, n: int) -> list[Any]:
        x = _unshuffled(decompress(blob[1:]), n)
        return _from_int64(np.bitwise_xor.accumulate(x) if xor else x, bool(blob[0]))

    return encode, decode


def _forced_codec(transform: int) -> Codec:
    """The module's numeric payload with one transform (its representation choice, no ts reference)."""

    def encode(col: list[Any]) -> bytes:
        rep = columns._reps(col)[0]
        return columns._frame(columns._number_parts(rep, rep.x, transform, False), 9)

    def decode(blob: bytes, n: int) -> list[Any]:
        return columns._column(columns._inflate(blob), n, None, False)[0]

    return encode, decode


def codecs() -> dict[str, Codec]:
    """Every per-column alternative, by name."""
    out = {"msgpack+zlib": _packed_codec(),
           "shuffle+zlib": _shuffle_codec(lambda b: zlib.compress(b, 9), zlib.decompress, xor=False),
           "shuffle+lzma": _shuffle_codec(lambda b: lzma.compress(b, lzma.FORMAT_RAW, filters=_LZMA),
                                          lambda b: lzma.decompress(b, lzma.FORMAT_RAW, filters=_LZMA), xor=False),
           "xor+shuffle+zlib": _shuffle_codec(lambda b: zlib.compress(b, 9), zlib.decompress, xor=True)}
    out.update({f"{name}+planes+zlib": _forced_codec(t) for name, t in _TRANSFORMS.items()})
    return out


# ---- measuring


def _best_s(call: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def label(frame: bytes) -> str:
    """What a column frame of ``columns.encode`` holds, e.g. ``decimal 2, delta, 1 byte``."""
    payload = columns._inflate(frame)
    if payload[0] != columns.K_NUMBER:
        return {columns.K_PACKED: "msgpack", columns.K_RUNS: "runs"}.get(payload[0], "?")
    _, rep, decimals, flags, transform, width = payload[: columns._HEAD]
    name = {columns.R_INT: "ints", columns.R_DECIMAL: f"decimal {decimals}", columns.R_BITS: "float bits"}[rep]
    name += " minus ts" if flags & columns.F_MINUS_TS else ""
    name += " + int bitmap" if flags & columns.F_MIXED else ""
    name += " in runs" if flags & columns.F_RUNS else ""
    step = {v: k for k, v in _TRANSFORMS.items()}.get(transform, "xor")
    return f"{name}, {step}, {width} byte{'s' if width > 1 else ''}{', deflated' if frame[0] else ', stored'}"


def measure_codec(shape: Shape, codec: Codec, repeats: int) -> dict[str, Any]:
    """Sizes per column and the encode/decode time of the three columns with one codec."""
    encode, decode = codec
    cols = dict(zip(("received_at", "ts", "value"), shape, strict=True))
    blobs = {name: encode(cols[name]) for name in COLUMN_NAMES}
    for name in COLUMN_NAMES:
        if decode(blobs[name], N) != cols[name]:
            raise AssertionError(f"the codec does not round-trip column {name}")
    enc_s = _best_s(lambda: [encode(cols[name]) for name in COLUMN_NAMES], repeats)
    dec_s = _best_s(lambda: [decode(blobs[name], N) for name in COLUMN_NAMES], repeats)
    return {"bytes": sum(map(len, blobs.values())), **{f"{k}_bytes_per_reading": len(b) / N for k, b in blobs.items()},
            "encode_s": enc_s, "decode_s": dec_s}


def measure_adaptive(shape: Shape, repeats: int) -> dict[str, Any]:
    """``columns.encode``/``decode`` of the series as a one-series segment, with what it chose per column."""
    received_at, ts, value = shape
    series: list[columns.Series] = [("dev_1", "temperature", received_at, ts, value, None, None, None)]
    blob = columns.encode(series)
    if columns.decode(blob) != series:
        raise AssertionError("columns does not round-trip the shape")
    stamps = columns._stamps(ts)
    frames = {"ts": columns._column_frame(ts, None, True),
              "received_at": columns._column_frame(received_at, stamps, False),
              "value": columns._column_frame(value, None, False)}
    return {"bytes": len(blob), **{f"{k}_bytes_per_reading": len(f) / N for k, f in frames.items()},
            "chosen": {k: label(f) for k, f in frames.items()},
            "encode_s": _best_s(lambda: columns.encode(series), repeats),
            "decode_s": _best_s(lambda: columns.decode(blob), repeats * 4)}


def run(opts: Options) -> list[dict[str, Any]]:
    """Every shape under every encoding; one line each."""
    repeats = 2 if opts.quick else 5
    lines = []
    all_codecs = codecs()
    for shape_name, make in SHAPES.items():
        shape = make(random.Random(f"codec:{shape_name}"))
        note(f"codec: {shape_name}")
        measured = {name: measure_codec(shape, codec, repeats) for name, codec in all_codecs.items()}
        measured["adaptive"] = measure_adaptive(shape, repeats)
        for name, m in measured.items():
            line = {"bench": "codec", "case": f"{shape_name}: {name}", "shape": shape_name, "encoding": name,
                    "readings": N, "bytes": m["bytes"], "bytes_per_reading": m["bytes"] / N,
                    **{k: v for k, v in m.items() if k.endswith("_per_reading") or k == "chosen"},
                    "encode_us_per_reading": m["encode_s"] * 1e6 / N, "decode_us_per_reading": m["decode_s"] * 1e6 / N,
                    "decode_ms": m["decode_s"] * 1e3}
            lines.append(emit(line))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.codec [--quick]``."""
    return run_main("codec", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
