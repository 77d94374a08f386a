"""The columnar encoding of a segment: the compacted readings of one window of one device group, as bytes.

A segment holds series (one per device and sensor type, sorted by ``ts``). The caller seals the bytes
(AES-GCM); this module only turns series into bytes and back, exactly: ints stay ints, floats keep their
bits (``-0.0`` too), None columns stay None.

Layout (integers are unsigned LEB128 varints unless said otherwise)::

    blob    = version:u8  index_len  index  block*ndev    (index: msgpack [[device_id...], [block_len...]])
    block   = nseries  series*nseries                     (one device; decoded without touching the others)
    series  = type_len sensor_type n  frame(ts) frame(received_at) frame(value) frame(seq) frame(data) frame(epoch)
    frame   = len bytes                                   (len 0: a None column)
    bytes   = 0:u8 payload | 1:u8 raw_len deflate(payload) (raw deflate, whichever is shorter)

A payload starts with its kind. ``K_PACKED``: msgpack of the list (columns of anything: dicts, seqs with
None, mixed types). ``K_RUNS``: msgpack of ``[values, run lengths]`` (str/None columns, e.g. the spool
epoch, one value for thousands of readings). ``K_NUMBER``: an int or float column as one int64 array, the
*representation* ``rep``: the ints themselves; floats scaled by the smallest ``10**k`` (k <= 6) under which
every value round-trips bit-exactly (``round(v * 10**k) / 10**k == v``: readings rounded to 1-2 decimals,
``ts`` rounded to µs); else the float's IEEE bits (the time.time() stamps of an hour share their exponent,
so their bits grow linearly with time). Columns mixing ints and floats (a JSON client writes ``21.0`` as
``21``) are floats plus a bitmap of the ints. Then, in order:

* ``received_at`` may subtract ``ts`` in the same representation (a latency instead of a time);
* a column other than ts may keep one value per run of equal neighbours, plus the run lengths (readings
  of one event share their received_at);
* a ``transform``: none, delta, delta of delta, XOR with the previous value, or minus a line ``i * step``
  (least squares: stamps on a schedule with jitter). The leading values it keeps (anchors) are stored
  whole, the rest minus their minimum in ``width`` bytes, as byte planes (all low bytes, then all second
  bytes...: the "shuffle"). Each plane is a deflate block of its own, with its own Huffman table.

The encoder tries every applicable combination and keeps the shortest frame; the payload names what it
chose, so decoding is one inflate and a few vectorised numpy steps per column. The columns' own figures
come from ``python -m bench.codec``.

Decoding is bounded: every declared length is checked against the bytes present, an inflated payload may
be at most ``_RATIO`` times its deflated size (deflate cannot exceed ~1032), and a series's reading count
is bounded by its block's size (its ts column, never in runs, takes at least a byte per reading inflated).
Any malformed input raises ValueError, and nothing else.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

VERSION = 2
Series = tuple[str, str, list[float], list[Any], list[Any], list[Any] | None, list[Any] | None, list[Any] | None]
"""(device_id, sensor_type, received_at[], ts[], value[], seq[] | None, data[] | None, epoch[] | None)."""

_ID = re.compile(rb"[0-9a-z_]{1,64}")
_IDS = re.compile(r"[0-9a-z_]{1,64}(?:,[0-9a-z_]{1,64})*")
"""Device ids joined by commas (one C-speed check for a thousand ids)."""
_RATIO, _SLACK = 1100, 64
"""An inflated payload is at most _RATIO * deflated + _SLACK bytes (deflate cannot exceed ~1032:1; the encoder
stores a payload rather than break the rule), and so a series of a block holds at most about that many readings
per byte of the block: its ts column takes at least a byte per reading inflated."""
STORED, DEFLATED = 0, 1
K_PACKED, K_RUNS, K_NUMBER = 0, 1, 2
R_INT, R_DECIMAL, R_BITS = 0, 1, 2
F_MIXED, F_MINUS_TS, F_RUNS = 1, 2, 4
T_NONE, T_DELTA, T_DOD, T_XOR, T_LINE = 0, 1, 2, 3, 4
_ANCHORS = {T_NONE: 0, T_DELTA: 1, T_DOD: 2, T_XOR: 1, T_LINE: 0}
_MAX_DECIMALS = 6
_MAX_READINGS = 2**31
"""Readings of one series at most (a window of an hour at 500,000 a second)."""
_EXACT = 2**53
"""Floats represent every int of at most this magnitude exactly."""
_REF_LIMIT = 2.0**62
_QUICK = 6
"""The deflate level at which candidate encodings are compared."""
_HEAD = 6
"""kind, rep, decimals, flags, transform, width."""
_COLUMNS = ("ts", "received_at", "value", "seq", "data", "epoch")
"""Frame order in a series (ts first: received_at may be stored relative to it)."""
_TUPLE_INDEX = (3, 2, 4, 5, 6, 7)
"""Where each frame's column sits in a Series."""


# ---- encoding


def encode(series: list[Series]) -> bytes:
    """Encode series sorted by device, sensor type and ts (each device's series must be contiguous)."""
    blocks: list[tuple[bytes, list[bytes]]] = []
    for s in series:
        if not isinstance(s, tuple | list) or len(s) != 8:
            raise ValueError(f"a series is an 8-tuple (device_id, sensor_type, received_at, ts, value, seq, data, "
                             f"epoch), not {type(s).__name__} of length {len(s) if hasattr(s, '__len__') else '?'}")
        device = _id_bytes("device_id", s[0])
        if not blocks or blocks[-1][0] != device:
            if any(d == device for d, _ in blocks):
                raise ValueError(f"device_id {s[0]!r} comes again after other devices: series must be sorted by device")
            blocks.append((device, []))
        blocks[-1][1].append(_series_bytes(s))
    bodies = []
    for _, parts in blocks:
        body = bytearray()
        _put(body, len(parts))
        bodies.append(bytes(body) + b"".join(parts))
    index = msgpack.packb([[device.decode("ascii") for device, _ in blocks], [len(b) for b in bodies]])
    out = bytearray([VERSION])
    _put(out, len(index))
    return bytes(out) + index + b"".join(bodies)


def _id_bytes(key: str, value: object) -> bytes:
    raw = value.encode("ascii", "replace") if isinstance(value, str) else b""
    if not isinstance(value, str) or not _ID.fullmatch(raw):
        raise ValueError(f"{key} {value!r} does not match ^[0-9a-z_]{{1,64}}$")
    return raw


def _series_bytes(s: Sequence[Any]) -> bytes:
    sensor = _id_bytes("sensor_type", s[1])
    n = len(s[3]) if isinstance(s[3], Sequence) else -1
    out = bytearray()
    _put(out, len(sensor))
    out += sensor
    if n > _MAX_READINGS:
        raise ValueError(f"series {s[0]}/{s[1]} has {n} readings, at most {_MAX_READINGS} fit a segment")
    _put(out, max(n, 0))
    stamps: np.ndarray | None = None
    for name, index in zip(_COLUMNS, _TUPLE_INDEX, strict=True):
        col = s[index]
        if col is None and name in ("seq", "data", "epoch"):
            _put(out, 0)
            continue
        if not isinstance(col, Sequence) or isinstance(col, str | bytes) or len(col) != n:
            raise ValueError(f"series {s[0]}/{s[1]}: column {name} must be a list of {n} readings (like ts), "
                             f"not {type(col).__name__}{f' of {len(col)}' if isinstance(col, Sequence) else ''}")
        frame = _column_frame(list(col), stamps if name == "received_at" else None,
                              name == "ts")
        if name == "ts":
            stamps = _stamps(col)
        _put(out, len(frame))
        out += frame
    return bytes(out)


def _stamps(ts: Sequence[Any]) -> np.ndarray | None:
    """ts as float64 (what received_at may be stored relative to), or None when ts is not numeric."""
    try:
        return np.array(ts, dtype=np.float64) if all(type(v) is int or type(v) is float for v in ts) else None
    except OverflowError:
        return None


def _column_frame(col: list[Any], ts: np.ndarray | None, dense: bool) -> bytes:
    """The shortest frame of a column; ``ts`` when it may be stored relative to ts; ``dense``: never in runs.

    Candidates are compared deflated quickly, one block per part; the winner is deflated at the highest
    level, in one block and in a block per part, and the shorter kept.
    """
    candidates: list[list[bytes]] = []
    reps = _reps(col)
    if reps:
        refs: list[np.ndarray | None] = [None] if ts is None else [None, ts]
        for rep in reps:
            for ref in refs:
                diff = rep.x if ref is None else _minus_ref(rep, ref)
                if diff is not None:
                    candidates += _number_candidates(rep, diff, ref is not None, dense)
    else:
        try:
            candidates.append([bytes([K_PACKED]), msgpack.packb(col)])
        except (TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"a column holds a value msgpack cannot encode: {err}") from None
        if not dense and col and all(v is None or type(v) is str for v in col):
            runs = [(v, len(list(g))) for v, g in itertools.groupby(col)]
            candidates.append([bytes([K_RUNS]), msgpack.packb([[v for v, _ in runs], [k for _, k in runs]])])
    best = candidates[0] if len(candidates) == 1 else min(candidates, key=lambda c: len(_frame(c, _QUICK)))
    return min((_frame(best, 9, split) for split in (False, True)), key=len)


def _number_candidates(rep: _Rep, x: np.ndarray, minus_ts: bool, dense: bool) -> list[list[bytes]]:
    """Every transform of x, and of its runs (equal neighbours collapsed) when they are few enough."""
    out = [_number_parts(rep, x, t, minus_ts) for t in _transforms(rep, len(x))]
    starts = np.flatnonzero(np.concatenate([[True], x[1:] != x[:-1]]))
    if not dense and 2 * len(starts) <= len(x):
        lengths = np.diff(np.append(starts, len(x)))
        runs = x[starts]
        out += [_number_parts(rep, runs, t, minus_ts, lengths) for t in _transforms(rep, len(runs))]
    return out


@dataclass(frozen=True)
class _Rep:
    """A numeric column as int64: ``rep`` (R_INT, R_DECIMAL with ``decimals``, R_BITS) and the ints' bitmap."""

    rep: int
    decimals: int
    x: np.ndarray
    mask: bytes | None


def _reps(col: list[Any]) -> list[_Rep]:
    """The int64 representations of a numeric column (empty: not numeric, or not exactly representable)."""
    types = set(map(type, col))
    if not col or not types <= {int, float}:
        return []
    if types == {int}:
        try:
            return [_Rep(R_INT, 0, np.array(col, dtype=np.int64), None)]
        except OverflowError:
            return []
    values = np.array(col, dtype=np.float64)
    mask = None
    if int in types:
        is_int = np.fromiter((type(v) is int for v in col), dtype=bool, count=len(col))
        ints = [v for v in col if type(v) is int]
        if any(abs(v) > _EXACT for v in ints):
            return []
        mask = np.packbits(is_int, bitorder="little").tobytes()
    with np.errstate(all="ignore"):
        for k in range(_MAX_DECIMALS + 1):
            scale = 10.0**k
            scaled = np.rint(values * scale)
            if not np.all(np.abs(scaled) <= _EXACT):
                break
            ints64 = scaled.astype(np.int64)
            if np.array_equal((ints64.astype(np.float64) / scale).view(np.int64), values.view(np.int64)):
                return [_Rep(R_DECIMAL, k, ints64, mask)]  # the same values as the bits, in fewer of them
    return [_Rep(R_BITS, 0, values.view(np.int64), mask)]


def _ref(ts: np.ndarray, rep: int, decimals: int) -> np.ndarray | None:
    """ts (a numeric array) in the representation ``rep`` (anything encoder and decoder agree on), or None."""
    with np.errstate(all="ignore"):
        stamps = ts.astype(np.float64)  # ints round to nearest as float() does: the same array as the encoder's
        if rep == R_BITS:
            return stamps.view(np.int64)
        scaled = np.rint(stamps * 10.0**decimals)
        if not np.all(np.abs(scaled) < _REF_LIMIT):
            return None
        return scaled.astype(np.int64)


def _minus_ref(rep: _Rep, ts: np.ndarray) -> np.ndarray | None:
    ref = _ref(ts, rep.rep, rep.decimals)
    return None if ref is None else rep.x - ref


def _transforms(rep: _Rep, n: int) -> list[int]:
    out = [T_NONE, T_DELTA, T_DOD, T_LINE] if n > 2 else [T_NONE, T_DELTA]
    return [*out, T_XOR] if rep.rep == R_BITS and n > 1 else out


def _line_step(x: np.ndarray) -> int:
    """The integer slope of a least-squares line through x (0 when it does not fit in an int64)."""
    n = len(x)
    i = np.arange(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        y = (x - x[0]).astype(np.float64)
        slope = float(np.dot(i - i.mean(), y - y.mean()) / np.dot(i - i.mean(), i - i.mean()))
    return round(slope) if abs(slope) < 2.0**62 else 0


def _forward(x: np.ndarray, transform: int) -> tuple[np.ndarray, list[int]]:
    """The transformed array (anchors first) and the transform's parameters."""
    if transform == T_DELTA:
        return np.concatenate([x[:1], np.diff(x)]), []
    if transform == T_DOD:
        d = np.diff(x)
        return np.concatenate([x[:1], d[:1], np.diff(d)]), []
    if transform == T_XOR:
        return np.concatenate([x[:1], x[1:] ^ x[:-1]]), []
    if transform == T_LINE:
        step = _line_step(x)
        return x - np.arange(len(x), dtype=np.int64) * np.int64(step), [step]
    return x, []


def _number_parts(rep: _Rep, x: np.ndarray, transform: int, minus_ts: bool,
                  lengths: np.ndarray | None = None) -> list[bytes]:
    """A numeric payload as parts: head (kind, representation, flags, transform, width, bitmap), the run
    lengths (when x holds runs: count, base, width, planes), the transform's words, the byte planes."""
    z, params = _forward(x, transform)
    anchors = min(_ANCHORS[transform], len(z))
    base, width, planes = _planes(z[anchors:])
    flags = ((F_MIXED if rep.mask is not None else 0) | (F_MINUS_TS if minus_ts else 0)
             | (F_RUNS if lengths is not None else 0))
    parts = [bytes([K_NUMBER, rep.rep, rep.decimals, flags, transform, width]) + (rep.mask or b"")]
    if lengths is not None:
        run_base, run_width, run_planes = _planes(lengths)
        parts[0] += np.array([len(lengths), run_base], dtype="<i8").tobytes() + bytes([run_width])
        parts += run_planes
    words = [*params, *z[:anchors].tolist(), *([base] if anchors < len(z) else [])]
    return [*parts, np.array(words, dtype="<i8").tobytes(), *planes]


def _planes(z: np.ndarray) -> tuple[int, int, list[bytes]]:
    """z minus its minimum (the base) in as few bytes as hold the largest, one plane per byte (low first)."""
    if not len(z):
        return 0, 1, []
    base = int(z.min())
    u = (z - np.int64(base)).view(np.uint64)
    width = max(1, (int(u.max()).bit_length() + 7) // 8)
    table = u.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width]
    return base, width, [table[:, j].tobytes() for j in range(width)]


def _frame(parts: list[bytes], level: int, split: bool = True) -> bytes:
    """The parts deflated (in one block, or a block per part when ``split``), or stored if that is shorter."""
    payload = b"".join(parts)
    packer = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    if split:
        body = b"".join(packer.compress(p) + packer.flush(zlib.Z_BLOCK) for p in parts) + packer.flush()
    else:
        body = packer.compress(payload) + packer.flush()
    head = bytearray([DEFLATED])
    _put(head, len(payload))
    if len(head) + len(body) < 1 + len(payload) and len(payload) <= _RATIO * len(body) + _SLACK:
        return bytes(head) + body
    return bytes([STORED]) + payload


def _put(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


# ---- decoding


class _Reader:
    """A cursor over bytes; every read checks that the bytes are there."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, start, len(data) if end is None else end

    def uint(self, what: str) -> int:
        value = shift = 0
        while True:
            if self.pos >= self.end or shift > 63:
                raise ValueError(f"truncated or oversized {what}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise ValueError(f"{what} declares {n} bytes, {self.end - self.pos} are left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def ident(self, what: str) -> str:
        raw = self.take(self.uint(f"{what} length"), what)
        if not _ID.fullmatch(raw):
            raise ValueError(f"{what} {raw[:80]!r} does not match ^[0-9a-z_]{{1,64}}$")
        return raw.decode("ascii")


def _index(blob: bytes) -> tuple[list[tuple[str, int, int]], int, bytes]:
    """The header: (device id, block offset, block length) per device, the offset of the first block, the blob."""
    try:
        return _read_index(blob)
    except ValueError:
        raise
    except Exception as err:  # the contract: malformed input raises ValueError, whatever failed
        raise ValueError(f"bad segment header: {type(err).__name__}: {err}") from None


def _read_index(blob: bytes) -> tuple[list[tuple[str, int, int]], int, bytes]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ValueError(f"a segment encoding is bytes, not {type(blob).__name__}")
    blob = bytes(blob)
    if not blob or blob[0] != VERSION:
        raise ValueError(f"not a segment encoding of version {VERSION} (first byte {blob[:1].hex() or 'missing'})")
    reader = _Reader(blob, 1)
    index = reader.take(reader.uint("index length"), "index")
    ids, lengths = msgpack.unpackb(index, raw=False, ext_hook=_no_ext)
    if not (isinstance(ids, list) and isinstance(lengths, list) and len(ids) == len(lengths)):
        raise ValueError("the segment index is not [device ids, block lengths]")
    joined = ",".join(ids)  # a comma inside an id would make more separators than ids
    if ids and (not _IDS.fullmatch(joined) or joined.count(",") != len(ids) - 1):
        raise ValueError("a device id of the segment index does not match ^[0-9a-z_]{1,64}$")
    if len(set(ids)) != len(ids) or not all(type(n) is int and n >= 0 for n in lengths):
        raise ValueError("the segment index repeats a device id or has a bad block length")
    offsets = [0, *itertools.accumulate(lengths)]
    if offsets[-1] != len(blob) - reader.pos:
        raise ValueError(f"blocks declare {offsets[-1]} bytes, {len(blob) - reader.pos} follow the header")
    return list(zip(ids, offsets, lengths, strict=False)), reader.pos, blob


def devices(blob: bytes) -> list[str]:
    """The device ids of an encoding, in order (reads the header only)."""
    return [device for device, _, _ in _index(blob)[0]]


def decode(blob: bytes, device_id: str | None = None, sensor_type: str | None = None) -> list[Series]:
    """The series of an encoding (of one device / sensor type when given), in encoding order.

    Only the blocks of the devices asked for are read, and of those only the series of ``sensor_type``.
    """
    out: list[Series] = []
    entries, start, data = _index(blob)
    for device, offset, length in entries:
        if device_id is None or device == device_id:
            try:
                out += _block(device, data, start + offset, start + offset + length, sensor_type)
            except Exception as err:  # the contract: malformed input raises ValueError, whatever failed
                detail = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
                raise ValueError(f"bad block of device {device!r} in a segment: {detail}") from None
    return out


def _block(device: str, data: bytes, start: int, end: int, sensor_type: str | None) -> list[Series]:
    reader = _Reader(data, start, end)
    count = reader.uint("series count")
    if count > end - start:
        raise ValueError(f"block of device {device!r} declares {count} series in {end - start} bytes")
    out: list[Series] = []
    for _ in range(count):
        sensor = reader.ident("sensor type")
        n = reader.uint("reading count")
        if n > min(_RATIO * (end - start) + _SLACK + 2, _MAX_READINGS):
            raise ValueError(f"series {device}/{sensor} declares {n} readings in a block of {end - start} bytes")
        frames = [reader.take(reader.uint("frame length"), "frame") for _ in _COLUMNS]
        if sensor_type is None or sensor == sensor_type:
            out.append(_series(device, sensor, n, frames))
    if reader.pos != end:
        raise ValueError(f"block of device {device!r} has {end - reader.pos} bytes after its last series")
    return out


def _series(device: str, sensor: str, n: int, frames: list[bytes]) -> Series:
    cols: list[list[Any] | None] = []
    stamps: np.ndarray | None = None
    for name, frame in zip(_COLUMNS, frames, strict=True):
        if not frame:
            if name in ("ts", "received_at", "value"):
                raise ValueError(f"series {device}/{sensor}: column {name} is missing")
            cols.append(None)
            continue
        col, array = _column(_inflate(frame), n, stamps, name != "ts")
        if name == "ts":
            stamps = array if array is not None else _stamps(col)
        cols.append(col)
    ts, received_at, value, seq, data, epoch = cols
    assert ts is not None and received_at is not None and value is not None
    return (device, sensor, received_at, ts, value, seq, data, epoch)


def _inflate(frame: bytes) -> bytes:
    if frame[0] == STORED:
        return frame[1:]
    if frame[0] != DEFLATED:
        raise ValueError(f"unknown frame codec {frame[0]}")
    reader = _Reader(frame, 1)
    size = reader.uint("payload size")
    body = frame[reader.pos:]
    if size > _RATIO * len(body) + _SLACK:
        raise ValueError(f"frame of {len(body)} bytes declares {size} inflated")
    inflater = zlib.decompressobj(-15)
    payload = inflater.decompress(body, size)
    if len(payload) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise ValueError(f"frame does not inflate to the {size} bytes it declares")
    return payload


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} in a column")


def _column(payload: bytes, n: int, ts: np.ndarray | None, runs_allowed: bool) -> tuple[list[Any], np.ndarray | None]:
    """A column of ``n`` readings, and the same as a numpy array when it was numeric."""
    if not payload:
        raise ValueError("empty column payload")
    kind = payload[0]
    if kind == K_NUMBER:
        return _numbers(payload, n, ts, runs_allowed)
    if kind not in (K_PACKED, K_RUNS) or (kind == K_RUNS and not runs_allowed):
        raise ValueError(f"column kind {kind} is not valid here")
    value = msgpack.unpackb(payload[1:], raw=False, ext_hook=_no_ext)
    if kind == K_PACKED:
        if not isinstance(value, list) or len(value) != n:
            raise ValueError(f"column of {n} readings holds {type(value).__name__}")
        return value, None
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list) and isinstance(value[1], list)
            and len(value[0]) == len(value[1]) and all(v is None or type(v) is str for v in value[0])
            and all(type(k) is int and k > 0 for k in value[1]) and sum(value[1]) == n):
        raise ValueError(f"bad runs for a column of {n} readings")
    return list(itertools.chain.from_iterable(itertools.repeat(v, k) for v, k in zip(*value, strict=True))), None


def _numbers(payload: bytes, n: int, ts: np.ndarray | None, runs_allowed: bool) -> tuple[list[Any], np.ndarray]:
    """A K_NUMBER column: its values, and the int64 or float64 array they came from."""
    if len(payload) < _HEAD or n == 0:
        raise ValueError("truncated numeric column")
    _, rep, decimals, flags, transform, width = payload[:_HEAD]
    if (rep not in (R_INT, R_DECIMAL, R_BITS) or decimals > _MAX_DECIMALS or (rep != R_DECIMAL and decimals)
            or flags > F_MIXED | F_MINUS_TS | F_RUNS or (flags & F_MIXED and rep == R_INT)
            or transform not in _ANCHORS or not 1 <= width <= 8 or (flags & F_MINUS_TS and ts is None)
            or (flags & F_RUNS and not runs_allowed)):
        raise ValueError(f"bad numeric column header {payload[:_HEAD].hex()}")
    pos = _HEAD + ((n + 7) // 8 if flags & F_MIXED else 0)
    lengths = None
    if flags & F_RUNS:
        lengths, pos = _run_lengths(payload, pos, n)
    x = _inverse(*_unshuffle(payload, pos, n if lengths is None else len(lengths), transform, width))
    if lengths is not None:
        x = np.repeat(x, lengths)
    if flags & F_MINUS_TS:
        ref = None if ts is None or len(ts) != n else _ref(ts, rep, decimals)
        if ref is None:
            raise ValueError("received_at is relative to a ts that has no such representation")
        x = x + ref
    if rep == R_INT:
        return x.tolist(), x
    values = x.view(np.float64) if rep == R_BITS else x.astype(np.float64) / 10.0**decimals
    out = values.tolist()
    if flags & F_MIXED:
        is_int = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, count=(n + 7) // 8, offset=_HEAD), count=n,
                               bitorder="little")
        for i in np.flatnonzero(is_int).tolist():
            out[i] = int(out[i])
    return out, values


def _run_lengths(payload: bytes, pos: int, n: int) -> tuple[np.ndarray, int]:
    """The run lengths of a column in runs (each at least 1, n in all) and the position after them."""
    if len(payload) < pos + 17:
        raise ValueError("truncated run lengths")
    count, base = np.frombuffer(payload, dtype="<i8", count=2, offset=pos).tolist()
    width = payload[pos + 16]
    pos += 17
    if not 1 <= count <= n or not 1 <= width <= 8 or len(payload) < pos + count * width:
        raise ValueError(f"bad run lengths for {n} readings: {count} runs of {width} bytes")
    lengths = _read_planes(payload, pos, count, width) + np.int64(base)
    if lengths.min() < 1 or lengths.max() > n or int(lengths.sum()) != n:
        raise ValueError(f"run lengths do not add up to the column's {n} readings")
    return lengths, pos + count * width


def _read_planes(payload: bytes, pos: int, count: int, width: int) -> np.ndarray:
    """``count`` values of ``width`` bytes stored as byte planes at ``pos`` (as int64, without their base)."""
    wide = np.zeros((count, 8), dtype=np.uint8)
    wide[:, :width] = np.frombuffer(payload, dtype=np.uint8, count=width * count, offset=pos).reshape(width, count).T
    return wide.view("<u8").reshape(count).view(np.int64)


def _unshuffle(payload: bytes, pos: int, n: int, transform: int, width: int) -> tuple[np.ndarray, int, int]:
    """The transformed int64 array (anchors, then the byte planes plus their base), the transform, its step."""
    anchors = min(_ANCHORS[transform], n)
    rows = n - anchors
    n_words = (transform == T_LINE) + anchors + (rows > 0)
    if len(payload) != pos + 8 * n_words + width * rows:
        raise ValueError(f"numeric column of {n} values has {len(payload)} bytes")
    words = np.frombuffer(payload, dtype="<i8", count=n_words, offset=pos).astype(np.int64)
    z = np.empty(n, dtype=np.int64)
    z[:anchors] = words[(transform == T_LINE):][:anchors]
    if rows:
        z[anchors:] = _read_planes(payload, pos + 8 * n_words, rows, width) + words[-1]
    return z, transform, int(words[0]) if transform == T_LINE else 0


def _inverse(z: np.ndarray, transform: int, step: int) -> np.ndarray:
    if transform == T_DELTA:
        return np.cumsum(z)
    if transform == T_DOD:
        return np.cumsum(np.concatenate([z[:1], np.cumsum(z[1:])]))
    if transform == T_XOR:
        return np.bitwise_xor.accumulate(z)
    if transform == T_LINE:
        return z + np.arange(len(z), dtype=np.int64) * np.int64(step)
    return z
