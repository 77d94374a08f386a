"""Batches: collecting readings, sealing them into one encrypted record, opening them again.

A write batch's plaintext is msgpack of ``[format, groups]``; a group is the readings of one event as columns
``[device_id, sensor_type, received_at, ts[], value[], seq[] | None, data[] | None]``, followed by the
spool epoch of the seqs when the event named one. Keeping the event's columns as they arrived makes
collecting cheap (no per-reading objects) and lets a query skip a whole group when its device or sensor type
does not match. Every batch holds readings of one device group (format 2; format 1, before groups, any device).

A segment (format 3) is what compaction makes of a window's batches of one group: the columnar encoding of
:mod:`components.core.columns`, in which ``received_at`` (and the epoch) is a column of its own, so its groups
are ``[device_id, sensor_type, received_at[], ts[], value[], seq[] | None, data[] | None, epoch[] | None]``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from components.core import columns
from components.core.errors import DecryptionFailed
from components.core.readings import Columns
from components.core.sealing import KeyRing
from components.storage.interface import BATCH, EVERY_GROUP, SEGMENT, Kind, SealedBatch, SealedState

FORMAT_ANY_DEVICE = 1
FORMAT = 2
SEGMENT_FORMAT = 3
_OVERHEAD_PER_READING = 24
_OVERHEAD_PER_GROUP = 48

Group = list[Any]
"""``[device_id, sensor_type, received_at, ts, values, seqs | None, datas | None]`` plus ``epoch`` when it has one."""


def group_epoch(group: Group) -> str | None:
    """The spool epoch a group's seqs belong to (None: sent without one)."""
    return group[7] if len(group) > 7 else None


@dataclass(slots=True)
class OpenBatch:
    """Readings of one time bucket and device group being collected; closes on a count, bytes or age limit."""

    bucket: int
    opened_at: float
    group: int = EVERY_GROUP
    groups: list[Group] = field(default_factory=list)
    count: int = 0
    nbytes: int = 0
    lo: float = float("inf")
    hi: float = float("-inf")
    rec_lo: float = float("inf")
    rec_hi: float = float("-inf")

    def add(self, device_id: str, sensor_type: str, received_at: float, cols: Columns, epoch: str | None = None
            ) -> None:
        """Add one event's accepted readings (all of this batch's bucket)."""
        seqs = cols.seqs if any(s is not None for s in cols.seqs) else None
        datas = cols.datas if cols.data_bytes else None
        group = [device_id, sensor_type, received_at, cols.ts, cols.values, seqs, datas]
        if epoch is not None and seqs is not None:
            group.append(epoch)
        self.add_group(group, cols.data_bytes)

    def add_group(self, group: Group, data_bytes: int = 0) -> None:
        """Add a group as it is stored."""
        received_at, ts = group[2], group[3]
        n = len(ts)
        self.groups.append(group)
        self.count += n
        self.nbytes += n * _OVERHEAD_PER_READING + _OVERHEAD_PER_GROUP + data_bytes
        lo, hi = min(ts), max(ts)
        if lo < self.lo:
            self.lo = lo
        if hi > self.hi:
            self.hi = hi
        if received_at < self.rec_lo:
            self.rec_lo = received_at
        if received_at > self.rec_hi:
            self.rec_hi = received_at


def _slice(group: Group, a: int, b: int) -> Group:
    device_id, sensor_type, rec, ts, values, seqs, datas, *epoch = group
    return [device_id, sensor_type, rec, ts[a:b], values[a:b], seqs[a:b] if seqs else None,
            datas[a:b] if datas else None, *epoch]


def _fitting(group: Group, limit: int) -> list[tuple[Group, int]]:
    """The group, cut into slices whose encoded size is at most ``limit`` (with their sizes)."""
    size = len(msgpack.packb(group))
    n = len(group[3])
    if size <= limit or n == 1:
        return [(group, size)]
    half = n // 2
    return _fitting(_slice(group, 0, half), limit) + _fitting(_slice(group, half, n), limit)


def split_batch(batch: OpenBatch, limit: int | None) -> list[OpenBatch]:
    """Cut a batch into parts whose sealed body stays under ``limit`` bytes (for backends with an item limit)."""
    if limit is None or batch.nbytes * 2 < limit:
        return [batch]
    budget = limit - 64  # msgpack framing, nonce and tag
    parts: list[OpenBatch] = []
    current, used = OpenBatch(batch.bucket, batch.opened_at, batch.group), 0
    for group in batch.groups:
        for piece, size in _fitting(group, budget):
            if current.groups and used + size > budget:
                parts.append(current)
                current, used = OpenBatch(batch.bucket, batch.opened_at, batch.group), 0
            current.add_group(piece)
            used += size
    if current.groups:
        parts.append(current)
    return parts


def batch_ad(kind: Kind, uid: str, bucket: int, lo: float, hi: float, rec_lo: float, rec_hi: float, count: int,
             key_id: str, fmt: int, group: int = EVERY_GROUP) -> bytes:
    """Associated data: every clear field of the record, so none can change without the body failing to open.

    Bounds are packed as floats: a backend may hand back 1500052521 (an integer ts) as 1500052521.0.
    """
    fields = [kind, fmt, key_id, uid, int(bucket), float(lo), float(hi), float(rec_lo), float(rec_hi), int(count)]
    if fmt != FORMAT_ANY_DEVICE:
        fields.append(int(group))
    return b"sensorhub|" + msgpack.packb(fields)


def _sealed(ring: KeyRing, plaintext: bytes, kind: Kind, uid: str, bucket: int, lo: float, hi: float,
            rec_lo: float, rec_hi: float, count: int, fmt: int, group: int) -> SealedBatch:
    kid = ring.active_id
    key_id, body = ring.seal(plaintext, batch_ad(kind, uid, bucket, lo, hi, rec_lo, rec_hi, count, kid, fmt, group))
    return SealedBatch(uid, int(bucket), float(lo), float(hi), float(rec_lo), float(rec_hi), count, key_id, body,
                       fmt, group)


def seal_groups(ring: KeyRing, groups: list[Group], bucket: int, lo: float, hi: float, rec_lo: float,
                rec_hi: float, count: int, kind: Kind = BATCH, group: int = EVERY_GROUP) -> SealedBatch:
    """Seal groups (readings or audit entries) into one record with a fresh uid and nonce."""
    return _sealed(ring, msgpack.packb([FORMAT, groups]), kind, secrets.token_hex(16), bucket, lo, hi, rec_lo,
                   rec_hi, count, FORMAT, group)


def seal_batch(ring: KeyRing, batch: OpenBatch) -> SealedBatch:
    """Seal a closed batch of readings."""
    return seal_groups(ring, batch.groups, batch.bucket, batch.lo, batch.hi, batch.rec_lo, batch.rec_hi,
                       batch.count, group=batch.group)


def seal_segment(ring: KeyRing, series: list[columns.Series], window: int, group: int) -> SealedBatch:
    """Seal the series of one window and group (sorted by device, sensor type and ts) as a segment."""
    lo = min(s[3][0] for s in series)
    hi = max(s[3][-1] for s in series)
    rec_lo = min(min(s[2]) for s in series)
    rec_hi = max(max(s[2]) for s in series)
    count = sum(len(s[3]) for s in series)
    return _sealed(ring, columns.encode(series), SEGMENT, secrets.token_hex(16), window, lo, hi, rec_lo, rec_hi,
                   count, SEGMENT_FORMAT, group)


def _plaintext(ring: KeyRing, sealed: SealedBatch, kind: Kind) -> bytes:
    return ring.open(sealed.key_id, sealed.body, batch_ad(
        kind, sealed.uid, sealed.bucket, sealed.lo, sealed.hi, sealed.rec_lo, sealed.rec_hi, sealed.count,
        sealed.key_id, sealed.fmt, sealed.group), f"{kind} {sealed.uid}")


def open_segment(ring: KeyRing, sealed: SealedBatch) -> bytes:
    """Decrypt a segment: its columnar encoding (decode it with :func:`segment_groups`)."""
    if sealed.fmt != SEGMENT_FORMAT:
        raise DecryptionFailed(f"segment {sealed.uid} has format {sealed.fmt}, this version reads {SEGMENT_FORMAT}")
    return _plaintext(ring, sealed, SEGMENT)


def segment_groups(sealed: SealedBatch, encoded: bytes, device_id: str | None = None) -> list[Group]:
    """The groups of a decrypted segment (of one device only, when given); DecryptionFailed names the record."""
    try:
        return [list(s) for s in columns.decode(encoded, device_id)]
    except ValueError as err:
        raise DecryptionFailed(f"segment {sealed.uid} does not decode: {err}") from None


def open_groups(ring: KeyRing, sealed: SealedBatch, kind: Kind = BATCH) -> list[Group]:
    """Decrypt and decode a record's groups; DecryptionFailed names the record."""
    if kind == SEGMENT:
        return segment_groups(sealed, open_segment(ring, sealed))
    fmt, groups = msgpack.unpackb(_plaintext(ring, sealed, kind), strict_map_key=False)
    if fmt != sealed.fmt or fmt not in (FORMAT, FORMAT_ANY_DEVICE):
        raise DecryptionFailed(f"{kind} {sealed.uid} has plaintext format {fmt}, this version reads {FORMAT}")
    result: list[Group] = groups
    return result


def reseal(ring: KeyRing, old: SealedBatch, kind: Kind = BATCH) -> SealedBatch:
    """The same record (same uid, format and index fields) sealed again under the ring's active key."""
    plaintext = _plaintext(ring, old, kind)
    return _sealed(ring, plaintext, kind, old.uid, old.bucket, old.lo, old.hi, old.rec_lo, old.rec_hi, old.count,
                   old.fmt, old.group)


def _state_ad(name: str, key_id: str) -> bytes:
    return b"sensorhub|state|" + msgpack.packb([name, key_id])


def seal_state(ring: KeyRing, name: str, value: Any) -> SealedState:
    """Seal a state record (any msgpack-able value) under its name."""
    return seal_packed(ring, name, msgpack.packb(value))


def seal_packed(ring: KeyRing, name: str, packed: bytes) -> SealedState:
    """Seal a state record whose value is packed already."""
    key_id, body = ring.seal(packed, _state_ad(name, ring.active_id))
    return SealedState(name, key_id, body)


def open_state(ring: KeyRing, sealed: SealedState) -> Any:
    """Decrypt a state record."""
    plaintext = ring.open(sealed.key_id, sealed.body, _state_ad(sealed.name, sealed.key_id),
                          f"state record {sealed.name}")
    return msgpack.unpackb(plaintext, strict_map_key=False)


def reseal_state(ring: KeyRing, old: SealedState) -> SealedState:
    """A state record sealed again under the active key."""
    return seal_state(ring, old.name, open_state(ring, old))


def iter_readings(groups: list[Group]) -> Iterator[tuple[str, str, float, float, float, int | None, Any]]:
    """Every reading of a batch or segment as (device_id, sensor_type, received_at, ts, value, seq, data)."""
    for device_id, sensor_type, received_at, ts, values, seqs, datas, *_ in groups:
        recs = received_at if type(received_at) is list else None
        for i, t in enumerate(ts):
            yield (device_id, sensor_type, recs[i] if recs else received_at, t, values[i], seqs[i] if seqs else None,
                   datas[i] if datas else None)

