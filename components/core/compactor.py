"""The compactor: closed windows of write batches become one columnar segment per (window, device group).

Write batches make acks cheap, but at a batch a second a device's hour is thousands of small records. Once a
window of ``ts`` (``storage.segment_seconds``) has ended ``storage.compact_after_s`` ago, the compactor reads
that window's batches of one group (and the group's segments of that window, if late readings came after
an earlier pass), sorts their readings by device, sensor type and ``ts``, encodes them as columns
(:mod:`components.core.columns`), seals the result and asks the store to swap it in for the records it read.
The swap is what a query sees: all of the old records or all of the new, never both or neither (one
transaction on SQLite, a protocol on DynamoDB). So the compactor may be killed at any instant; the next pass
simply finds the window's batches again.

It runs on a thread of its own (never on the reactor), holds one window of one group in memory at a time,
and each storage shard compacts the groups with ``group % shards == shard``. Records written before device
groups (group 0) are compacted by shard 0 into segments of each device's group. A record that fails to open
is logged and left in place; the rest of its window is compacted without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components.core import columns
from components.core.batches import group_epoch, open_groups, open_segment, seal_segment, segment_groups
from components.core.devices import DeviceIndex
from components.core.errors import DecryptionFailed
from components.core.passes import PassThread
from components.core.sealing import KeyRing
from components.storage.interface import BATCH, EVERY_GROUP, SEGMENT, BatchStore, SealedBatch

log = logging.getLogger(__name__)

PASS_INTERVAL_S = 10.0
_SEAL_OVERHEAD = 64


@dataclass
class CompactionReport:
    """What one pass did."""

    windows: int = 0
    records_in: int = 0
    segments_out: int = 0
    readings: int = 0
    left_in_place: list[str] = field(default_factory=list)


@dataclass
class _Series:
    rec: list[Any] = field(default_factory=list)
    ts: list[Any] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    seqs: list[Any] = field(default_factory=list)
    datas: list[Any] = field(default_factory=list)
    epochs: list[Any] = field(default_factory=list)

    def add(self, rec: list[Any], ts: list[Any], values: list[Any], seqs: list[Any] | None, datas: list[Any] | None,
            epochs: list[Any] | None) -> None:
        n = len(ts)
        self.rec += rec
        self.ts += ts
        self.values += values
        self.seqs += seqs if seqs else [None] * n
        self.datas += datas if datas else [None] * n
        self.epochs += epochs if epochs else [None] * n

    def sealed_form(self, device_id: str, sensor_type: str) -> columns.Series:
        order = sorted(range(len(self.ts)), key=self.ts.__getitem__)  # stable: equal ts keep arrival order

        def col(values: list[Any]) -> list[Any]:
            return [values[i] for i in order]

        def optional(values: list[Any]) -> list[Any] | None:
            return col(values) if any(v is not None for v in values) else None

        return (device_id, sensor_type, col(self.rec), col(self.ts), col(self.values), optional(self.seqs),
                optional(self.datas), optional(self.epochs))


class Compactor:
    """Compacts closed windows of one storage shard's groups."""

    def __init__(self, store: BatchStore, keys: Callable[[], KeyRing], index: Callable[[], DeviceIndex],
                 segment_seconds: int, compact_after_s: float, shard: int = 0, shards: int = 1,
                 clock: Callable[[], float] = time.time, retention_s: float = 0.0) -> None:
        """Compact ``store``; ``index()`` gives the device groups (known once storage has started). Windows that
        end more than ``retention_s`` ago (when positive) are left to retention, which deletes them."""
        self._store = store
        self._keys = keys
        self._index = index
        self._window_s = segment_seconds
        self._after_s = compact_after_s
        self._shard, self._shards = shard, shards
        self._clock = clock
        self._retention_s = retention_s
        self._background = PassThread("storage-compactor", "compaction", self.run_once,
                                      min(PASS_INTERVAL_S, max(1.0, compact_after_s)))
        self._stop = self._background.stopping
        self._bad: dict[tuple[int, int], set[str]] = {}
        self.passes = 0
        self.oldest_due: float | None = None
        """End of the oldest window that was due for compaction and still held write batches, as of the latest
        pass (None: none); its age past ``compact_after_s`` is the compaction lag."""

    # ---- the thread
    def start(self) -> None:
        """Run passes on a thread of its own until :meth:`stop`."""
        self._background.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the window being compacted (a window cut short is simply done again next time)."""
        self._background.stop(timeout)

    # ---- one pass
    def lag(self) -> float:
        """Seconds the oldest window due for compaction has waited past ``compact_after_s`` (0: none waits)."""
        due = self.oldest_due
        return 0.0 if due is None else max(0.0, self._clock() - self._after_s - due)

    def mine(self, group: int) -> bool:
        """True for the groups this shard compacts."""
        return group % self._shards == self._shard

    def run_once(self) -> CompactionReport:
        """Compact every closed window of this shard's groups that holds write batches."""
        report = CompactionReport()
        closed_before = self._clock() - self._after_s
        last_closed = int(closed_before // self._window_s) - 1  # windows up to this one have ended
        pending = self._store.pending_windows(self._window_s, (last_closed + 1) * self._window_s)
        expired = (int((self._clock() - self._retention_s) // self._window_s) - 1 if self._retention_s > 0
                   else None)  # windows up to this one end before the retention's cutoff
        due = [(w, g) for w, g in pending if w <= last_closed and self.mine(g) and (expired is None or w > expired)]
        self.oldest_due = (min(due)[0] + 1) * self._window_s if due else None
        left = []
        for window, group in due:
            if self._stop.is_set() or not self.compact(window, group, report):
                left.append(window)
        self.oldest_due = (min(left) + 1) * self._window_s if left else None
        self.passes += 1
        if report.windows:
            log.info("compacted %d window(s): %d record(s) into %d segment(s), %d readings", report.windows,
                     report.records_in, report.segments_out, report.readings)
        return report

    def compact(self, window: int, group: int, report: CompactionReport | None = None) -> bool:
        """Rewrite one window of one group; True if the store swapped it in."""
        report = report if report is not None else CompactionReport()
        ring = self._keys()
        start, end = window * self._window_s, (window + 1) * self._window_s
        batches = [b for b in self._store.batches_by_ts(start, end, BATCH, (group,)) if start <= b.lo < end]
        bad = self._bad.get((window, group), set())
        if not batches or {b.uid for b in batches} <= bad:
            return False
        index = self._index()
        merged: dict[tuple[int, str, str], _Series] = {}  # (window of ts, device, sensor type)
        old: list[SealedBatch] = []
        for b in batches:
            try:
                groups = open_groups(ring, b)
            except DecryptionFailed as err:
                if b.uid not in bad:
                    log.error("compaction of window %d, group %d leaves a record in place: %s", window, group, err)
                    report.left_in_place.append(b.uid)
                self._bad.setdefault((window, group), set()).add(b.uid)
                continue
            old.append(b)
            for g in groups:
                n = len(g[3])
                epoch = group_epoch(g)
                self._add(merged, g[0], g[1], [g[2]] * n, g[3], g[4], g[5], g[6],
                          [epoch] * n if epoch is not None else None)
        if not old:
            return False
        windows = {k[0] for k in merged}
        if group != EVERY_GROUP:  # fold in the group's segments of those windows, so one segment each remains
            for s in self._store.batches_by_ts(min(windows) * self._window_s, (max(windows) + 1) * self._window_s,
                                               SEGMENT, (group,)):
                if s.bucket not in windows:
                    continue
                try:
                    seg = segment_groups(s, open_segment(ring, s))
                except DecryptionFailed as err:
                    log.error("compaction of window %d, group %d leaves a segment in place: %s", window, group, err)
                    continue
                old.append(s)
                for g in seg:
                    self._add(merged, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7])
        new: list[SealedBatch] = []
        by_out: dict[tuple[int, int], list[tuple[int, str, str]]] = {}
        for k in sorted(merged):
            by_out.setdefault((k[0], group if group != EVERY_GROUP else index.group(k[1])), []).append(k)
        for (out_window, out_group), keys in sorted(by_out.items()):
            series = [merged[k].sealed_form(k[1], k[2]) for k in keys]
            new += [seal_segment(ring, part, out_window, out_group) for part in self._fit(series)]
        if not self._store.swap(old, new):
            log.info("window %d of group %d changed while it was compacted; it is done again next pass", window, group)
            return False
        report.windows += 1
        report.records_in += len(old)
        report.segments_out += len(new)
        report.readings += sum(s.count for s in new)
        return True

    def _add(self, merged: dict[tuple[int, str, str], _Series], device_id: str, sensor_type: str, rec: list[Any],
             ts: list[Any], values: list[Any], seqs: list[Any] | None, datas: list[Any] | None,
             epochs: list[Any] | None) -> None:
        """Add readings to the series of their ts windows (a batch may reach past the end of its window)."""
        w = self._window_s
        first, last = int(min(ts) // w), int(max(ts) // w)
        if first == last:
            merged.setdefault((first, device_id, sensor_type), _Series()).add(rec, ts, values, seqs, datas, epochs)
            return
        for i, t in enumerate(ts):
            merged.setdefault((int(t // w), device_id, sensor_type), _Series()).add(
                rec[i:i + 1], [t], values[i:i + 1], seqs[i:i + 1] if seqs else None,
                datas[i:i + 1] if datas else None, epochs[i:i + 1] if epochs else None)

    def _fit(self, series: list[columns.Series]) -> list[list[columns.Series]]:
        """The series cut into parts whose encoding fits the store's record size."""
        limit = self._store.max_body_bytes
        if limit is None or len(columns.encode(series)) <= limit - _SEAL_OVERHEAD:
            return [series]
        if len(series) > 1:
            half = len(series) // 2
            return self._fit(series[:half]) + self._fit(series[half:])
        (s,) = series
        n = len(s[3])
        if n == 1:
            return [series]

        def cut(col: list[Any] | None, a: int, b: int) -> list[Any] | None:
            return None if col is None else col[a:b]

        halves: list[columns.Series] = [(s[0], s[1], s[2][a:b], s[3][a:b], s[4][a:b], cut(s[5], a, b),
                                         cut(s[6], a, b), cut(s[7], a, b)) for a, b in ((0, n // 2), (n // 2, n))]
        return [part for h in halves for part in self._fit([h])]

