"""Device groups (a blind index) and device rows.

A device's tag is HMAC-SHA256(index key, device id). Its **group** is the first ``bits`` bits of the tag, written
as ``2**bits + those bits`` so that groups of different lengths never collide (group 0 is
:data:`components.storage.interface.EVERY_GROUP`, the records of any device). Records carry their group in
clear, so a one-device read touches its group only; the device id never leaves the ciphertext. Fewer bits put
more devices in a group: more privacy, more over-read (docs/storage.md, "Device groups").

A **device row** is one sealed named record per device, ``device/<first 16 bytes of the tag, hex>``: the seq
marks of its spool epochs and, per sensor type, count, first and last ``ts``, last ``received_at`` and the
latest reading. Storage rewrites a row in the commit that holds readings of its device, and no other; a
bounded cache keeps recent rows (as packed bytes) so memory does not grow with the fleet.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from components.storage.interface import EVERY_GROUP

DEVICE_PREFIX = "device/"
ROW_FORMAT = 1
NO_EPOCH = ""
"""The marks key of readings sent without a spool epoch (epochs are never empty)."""
MAX_TAG_BITS = 16
MEMO_SIZE = 131_072
"""Devices whose group and row name are remembered (then the memo starts again: a cache, not a registry)."""

Entry = list[Any]
"""Per sensor type: ``[count, first_ts, last_ts, last_received_at, latest [ts, value, seq, data, received_at]]``."""


class DeviceIndex:
    """Tags, groups and row names of device ids under one index key."""

    def __init__(self, index_key: bytes, bits: int) -> None:
        """Groups of ``bits`` bits (0 to 16) of the tag."""
        if not 0 <= bits <= MAX_TAG_BITS:
            raise ValueError(f"device tag bits must be 0 to {MAX_TAG_BITS}, got {bits}")
        self._key = index_key
        self.bits = bits
        self._base = 1 << bits
        # two dicts of atomic values, not one of tuples: the garbage collector does not walk them (see RowCache)
        self._groups: dict[str, int] = {}
        self._names: dict[str, str] = {}

    def tag(self, device_id: str) -> bytes:
        """The device's full tag."""
        return hmac.new(self._key, device_id.encode("utf-8"), hashlib.sha256).digest()

    def _remember(self, device_id: str) -> None:
        """Memoise the group and row name of a device (both are asked per event), for the devices seen most
        recently."""
        if len(self._groups) >= MEMO_SIZE:
            self._groups.clear()
            self._names.clear()
        tag = self.tag(device_id)
        prefix = int.from_bytes(tag[:4], "big") >> (32 - self.bits) if self.bits else 0
        self._groups[device_id] = self._base + prefix
        self._names[device_id] = DEVICE_PREFIX + tag[:16].hex()

    def group(self, device_id: str) -> int:
        """The device's group."""
        g = self._groups.get(device_id)
        if g is None:
            self._remember(device_id)
            g = self._groups[device_id]
        return g

    def groups_of(self, device_id: str) -> tuple[int, int]:
        """The groups whose records may hold readings of ``device_id``: its own and :data:`EVERY_GROUP`."""
        return EVERY_GROUP, self.group(device_id)

    def row_name(self, device_id: str) -> str:
        """Name of the device's row."""
        name = self._names.get(device_id)
        if name is None:
            self._remember(device_id)
            name = self._names[device_id]
        return name


@dataclass(slots=True)
class DeviceRow:
    """What storage knows of one device."""

    device_id: str
    marks: dict[str, int] = field(default_factory=dict)
    types: dict[str, Entry] = field(default_factory=dict)

    def value(self) -> list[Any]:
        """The row as sealed."""
        return [ROW_FORMAT, self.device_id, self.marks, self.types]

    def packed(self) -> bytes:
        """The row as sealed, packed."""
        return msgpack.packb(self.value())

    @classmethod
    def of(cls, value: Sequence[Any]) -> DeviceRow:
        """Inverse of :meth:`value`, taking ``value``'s dicts (an unpacked row is fresh: nothing else holds them)."""
        if not value or value[0] != ROW_FORMAT:
            raise ValueError(f"device row of format {value[0] if value else None!r}, this version reads {ROW_FORMAT}")
        return cls(value[1], value[2], value[3])

    def fold(self, sensor_type: str, rec: float, ts: list[float], values: list[float], seqs: list[Any] | None,
             datas: list[Any] | None) -> None:
        """Count readings of one batch group into the summary."""
        lo, hi = min(ts), max(ts)
        entry = self.types.get(sensor_type)
        if entry is None:
            entry = self.types[sensor_type] = [0, lo, hi, rec, None]
        entry[0] += len(ts)
        entry[1] = min(entry[1], lo)
        entry[3] = max(entry[3], rec)
        if entry[4] is None or hi >= entry[4][0]:
            i = ts.index(hi)
            entry[4] = [hi, values[i], seqs[i] if seqs else None, datas[i] if datas else None, rec]
        entry[2] = max(entry[2], hi)

    def merge_entry(self, sensor_type: str, other: Entry) -> None:
        """Add a summary entry kept elsewhere (a state record of an earlier version)."""
        entry = self.types.get(sensor_type)
        if entry is None:
            self.types[sensor_type] = list(other)
            return
        entry[0] += other[0]
        entry[1] = min(entry[1], other[1])
        entry[2] = max(entry[2], other[2])
        entry[3] = max(entry[3], other[3])
        if other[4] is not None and (entry[4] is None or other[4][0] >= entry[4][0]):
            entry[4] = other[4]

    def raise_mark(self, epoch: str | None, seq: int) -> None:
        """Record that ``seq`` of ``epoch`` is committed (marks only grow)."""
        key = NO_EPOCH if epoch is None else epoch
        if seq > self.marks.get(key, 0):
            self.marks[key] = seq


class RowCache:
    """Device rows as committed, least recently used evicted first, at most ``size`` of them (thread-safe).

    ``load(device_ids)`` reads rows missing from the cache (None: the device has none yet).
    """

    def __init__(self, size: int, load: Callable[[Sequence[str]], dict[str, DeviceRow]]) -> None:
        """Keep ``size`` rows at most."""
        self._size = size
        self._load = load
        # A plain dict of str to bytes holds no object the garbage collector follows, so a full collection does
        # not walk a fleet's worth of entries (an OrderedDict, or a dict of tuples, would be walked every time).
        # It keeps insertion order: a row used again is moved to the end by taking it out and putting it back.
        self._rows: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Rows held."""
        return len(self._rows)

    def get_many(self, device_ids: Iterable[str]) -> dict[str, DeviceRow]:
        """Fresh copies of the rows of ``device_ids`` (a new empty row for a device never seen)."""
        out: dict[str, DeviceRow] = {}
        missing: list[str] = []
        with self._lock:
            for d in device_ids:
                packed = self._rows.get(d)
                if packed is None:
                    missing.append(d)
                else:
                    self._rows[d] = self._rows.pop(d)
                    out[d] = DeviceRow.of(msgpack.unpackb(packed, strict_map_key=False))
        if missing:
            loaded = self._load(missing)
            for d in missing:
                out[d] = loaded.get(d) or DeviceRow(d)
            self.put(out[d] for d in missing)
        return out

    def get(self, device_id: str) -> DeviceRow:
        """A fresh copy of one device's row."""
        return self.get_many((device_id,))[device_id]

    def mark(self, device_id: str, epoch: str | None) -> int:
        """The committed seq of ``device_id``'s ``epoch`` (0: none)."""
        return self.get(device_id).marks.get(NO_EPOCH if epoch is None else epoch, 0)

    def cached_mark(self, device_id: str, epoch: str | None) -> int | None:
        """The committed seq when the row is in the cache, else None (never reads the store)."""
        with self._lock:
            packed = self._rows.get(device_id)
        if packed is None:
            return None
        marks = msgpack.unpackb(packed, strict_map_key=False)[2]
        mark: int = marks.get(NO_EPOCH if epoch is None else epoch, 0)
        return mark

    def put(self, rows: Iterable[DeviceRow]) -> None:
        """Remember rows as committed."""
        self.put_packed([(r.device_id, r.packed()) for r in rows])

    def put_packed(self, packed: Sequence[tuple[str, bytes]]) -> None:
        """Remember rows as committed, packed (:meth:`DeviceRow.packed`)."""
        with self._lock:
            for d, p in packed:
                self._rows.pop(d, None)
                self._rows[d] = p
            while len(self._rows) > self._size:
                del self._rows[next(iter(self._rows))]
