"""A device's spool: every reading gets the next ``seq`` and stays in a local file until storage acknowledges it.

The file is an append-only log of msgpack frames: ``["e", epoch]`` first, ``["r", seq, sensor_type, reading]``
for a reading, ``["a", seq]`` for an acknowledgement, ``["c", {sensor_type: produced}]`` for how many readings
of each sensor type the device has produced (written when the file is compacted). Replaying it after a crash
or reboot gives back the epoch, the unacknowledged readings, the next seq and the production counts, so a
device resumes with no gap and no duplicate. A torn frame at the end (a crash mid-write) is cut off.

The epoch is a random id made when the file is created. A device sends it with its readings and storage
keeps one sequence per device and epoch, so a device whose spool is lost (re-flashed, a new card) starts a
new epoch at seq 1 and none of its new readings is taken for a duplicate of an old one. A spool written by
an older version has no epoch frame; it keeps sending without one (``epoch`` is None).

Writes go to the operating system at once (one ``write`` per event), so a killed process loses nothing;
``fsync`` runs at most every ``sync_interval_s`` so a power cut loses at most that much.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

COMPACT_MIN_RECORDS = 10_000
EPOCH_BYTES = 8


def new_epoch() -> str:
    """A fresh spool epoch: 16 random lowercase hex digits (a valid id of the wire contract)."""
    return secrets.token_hex(EPOCH_BYTES)


class SpoolLocked(RuntimeError):
    """Another process holds this device's spool."""


class Spool:
    """Unacknowledged readings of one device, in seq order, persisted in ``<folder>/<device_id>.spool``."""

    def __init__(self, folder: str | os.PathLike[str], device_id: str, max_pending: int,
                 sync_interval_s: float = 1.0) -> None:
        """Open (or create) the spool, replay it, and lock it against a second process."""
        self.path = Path(folder) / f"{device_id}.spool"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_pending = max_pending
        self.pending: deque[tuple[int, str, dict[str, Any]]] = deque()
        self.acked = 0
        self.last_seq = 0
        self.produced: Counter[str] = Counter()
        self.dropped = 0
        self.epoch: str | None = None
        self._records_in_file = 0
        self._sync_interval = sync_interval_s
        self._last_sync = time.monotonic()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise SpoolLocked(f"spool {self.path} is in use by another process (is device {device_id} "
                              f"already running?)") from None
        self._replay()

    def _replay(self) -> None:
        data = self.path.read_bytes()
        if not data:  # a new spool: a new epoch
            self.epoch = new_epoch()
            self._write([["e", self.epoch]])
            return
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data)
        good = 0
        records: dict[int, tuple[int, str, dict[str, Any]]] = {}
        try:
            for frame in unpacker:
                kind = frame[0]
                if kind == "e":
                    self.epoch = frame[1]
                elif kind == "r":
                    seq, sensor_type, reading = frame[1], frame[2], frame[3]
                    records[seq] = (seq, sensor_type, reading)
                    self.produced[sensor_type] += 1
                    self.last_seq = max(self.last_seq, seq)
                elif kind == "a":
                    self.acked = max(self.acked, frame[1])
                elif kind == "c":
                    self.produced.update(frame[1])
                self._records_in_file += 1
                good = unpacker.tell()
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, IndexError, TypeError):
            pass  # a damaged frame: keep what came before it
        if good < len(data):
            os.ftruncate(self._fd, good)  # a torn last frame from a crash
        self.last_seq = max(self.last_seq, self.acked)
        self.pending = deque(r for seq, r in sorted(records.items()) if seq > self.acked)

    def _write(self, frames: list[Any]) -> None:
        os.write(self._fd, b"".join(msgpack.packb(f) for f in frames))
        self._records_in_file += len(frames)
        now = time.monotonic()
        if now - self._last_sync >= self._sync_interval:
            os.fsync(self._fd)
            self._last_sync = now

    def add(self, sensor_type: str, readings: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Number and keep readings; return those taken (when the spool is full the rest are dropped, counted)."""
        room = self.max_pending - len(self.pending)
        if room < len(readings):
            self.dropped += len(readings) - max(room, 0)
            readings = readings[:max(room, 0)]
        taken: list[dict[str, Any]] = []
        for reading in readings:
            self.last_seq += 1
            numbered = {**reading, "seq": self.last_seq}
            self.pending.append((self.last_seq, sensor_type, numbered))
            self.produced[sensor_type] += 1
            taken.append(numbered)
        if taken:
            first = self.last_seq - len(taken) + 1
            self._write([["r", first + i, sensor_type, r] for i, r in enumerate(taken)])
        return taken

    def ack(self, seq: int) -> int:
        """Storage holds every reading up to ``seq``: forget them; return how many were released."""
        if seq <= self.acked:
            return 0
        released = 0
        while self.pending and self.pending[0][0] <= seq:
            self.pending.popleft()
            released += 1
        self.acked = min(seq, self.last_seq)
        self._write([["a", self.acked]])
        if self._records_in_file > max(COMPACT_MIN_RECORDS, 4 * len(self.pending)):
            self._compact()
        return released

    def _compact(self) -> None:
        """Rewrite the file with only what is still needed (atomic rename)."""
        tmp = self.path.with_suffix(".spool.tmp")
        frames: list[Any] = [] if self.epoch is None else [["e", self.epoch]]
        frames += [["c", dict(self._produced_before_pending())], ["a", self.acked]]
        frames += [["r", seq, t, r] for seq, t, r in self.pending]
        with open(tmp, "wb") as fh:
            fh.write(b"".join(msgpack.packb(f) for f in frames))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        new_fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(self._fd)
        self._fd = new_fd
        self._records_in_file = len(frames)

    def _produced_before_pending(self) -> Counter[str]:
        counts = Counter(self.produced)
        counts.subtract(Counter(t for _, t, _ in self.pending))
        return +counts

    def from_seq(self, seq: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Pending readings with seq >= ``seq``, in order."""
        if not self.pending:
            return
        start = max(0, seq - self.pending[0][0])
        for i in range(start, len(self.pending)):
            yield self.pending[i]

    @property
    def first_pending(self) -> int | None:
        """Lowest unacknowledged seq."""
        return self.pending[0][0] if self.pending else None

    def close(self) -> None:
        """Flush to disk and release the lock."""
        os.fsync(self._fd)
        os.close(self._fd)
