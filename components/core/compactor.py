"""The compactor: closed windows of write batches become one columnar segment per (window, device group).

Write batches make acks cheap, but at a batch a second a device's hour is thousands of small records. Once a
window of ``ts`` (``storage.segment_seconds``) has ended ``storage.compact_after_s`` ago, the compactor reads
that window's batches of one group (and the group's segments of that window, if late readings came after
an earlier pass), sorts their readings by device, sensor type and ``ts``, encodes them as columns
(:mod:`components.core.columns`), seals the result and asks the store to swap it in for the records it read.
The swap is what a query sees: all of the old records or all of the new, never both or neither (one
transaction on SQLite, a protocol on DynamoDB). So the compactor may be killed at any instant; the next pass
simply finds the window's batches again.

Closed windows of a group whose readings are few are then merged once more (a *rollup*): the group's segments
that lie inside one day, then one 30-day and one 360-day window of ``ts`` (:data:`ROLLUPS`, counted from the
epoch) become one segment, when they hold at most :data:`ROLLUP_READINGS` readings together. A sparse device's
year is then one or two records instead of hundreds, and a query's cost follows its answer again rather than
the number of hours its readings are spread over. A rollup is due once its window has ended
``storage.compact_after_s`` ago, and is tried for the windows that the hourly passes wrote into (remembered
between passes until they close); it swaps like a compaction, so a query sees the old segments or the new.

It runs on a thread of its own (never on the reactor), holds one window of one group in memory at a time,
and each storage shard compacts the groups with ``group % shards == shard``. Records written before device
groups (group 0) are compacted by shard 0 into segments of each device's group. A record that fails to open
is logged and left in place; the rest of its window is compacted without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from components.core import columns
from components.core.batches import Group, group_epoch, open_groups, open_segment, seal_segment, segment_groups
from components.core.devices import DeviceIndex
from components.core.errors import DecryptionFailed
from components.core.passes import PassThread
from components.core.sealing import KeyRing
from components.storage.interface import BATCH, EVERY_GROUP, SEGMENT, BatchStore, SealedBatch

log = logging.getLogger(__name__)

PASS_INTERVAL_S = 10.0
_SEAL_OVERHEAD = 64
DAY_S = 86_400
ROLLUPS = (DAY_S, 30 * DAY_S, 360 * DAY_S)
"""Windows of ``ts`` (seconds; each a multiple of the one before) whose segments of one group are merged into one."""
ROLLUP_READINGS = 10_000
"""A rollup merges a window's segments only when they hold at most this many readings together: a one-device read
of a narrower window then filters at most this many readings of the segment (its device's share, decoded once and
kept in the callee's cache), a few milliseconds at worst, instead of opening one record per hour."""
ROLLUP_RETENTION_SHARE = 10
"""With retention on, only rollup windows of at most this share of the retention period are used: retention deletes
a segment once its newest reading has expired, so a merged segment outlives its oldest reading by at most that."""


@dataclass
class CompactionReport:
    """What one pass did."""

    windows: int = 0
    records_in: int = 0
    segments_out: int = 0
    readings: int = 0
    left_in_place: list[str] = field(default_factory=list)
    rollups: int = 0
    rolled_in: int = 0


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


def _opened(ring: KeyRing, segments: list[SealedBatch], by: str) -> Iterator[tuple[SealedBatch, list[Group]]]:
    """Each segment that opens, with its groups; one that fails to open is logged and skipped (left in place)."""
    for s in segments:
        try:
            groups = segment_groups(s, open_segment(ring, s))
        except DecryptionFailed as err:
            log.error("%s leaves a segment in place: %s", by, err)
            continue
        yield s, groups


class Compactor:
    """Compacts closed windows of one storage shard's groups."""

    def __init__(self, store: BatchStore, keys: Callable[[], KeyRing], index: Callable[[], DeviceIndex],
                 segment_seconds: int, compact_after_s: float, shard: int = 0, shards: int = 1,
                 clock: Callable[[], float] = time.time, retention_s: float = 0.0,
                 rollups: tuple[int, ...] = ROLLUPS) -> None:
        """Compact ``store``; ``index()`` gives the device groups (known once storage has started). Windows that
        end more than ``retention_s`` ago (when positive) are left to retention, which deletes them. Closed
        segments are merged in the windows of ``rollups`` (seconds, ascending; ``()``: none)."""
        self._store = store
        self._keys = keys
        self._index = index
        self._window_s = segment_seconds
        self._after_s = compact_after_s
        self._shard, self._shards = shard, shards
        self._clock = clock
        self._retention_s = retention_s
        self._rollups = tuple(r for r in rollups if retention_s <= 0 or r * ROLLUP_RETENTION_SHARE <= retention_s)
        self._rollups_due: set[tuple[int, int, int]] = set()
        """(rollup window seconds, window, group) written into by compaction and not yet rolled up."""
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
        self._roll_up(closed_before, report)
        self.passes += 1
        if report.windows:
            log.info("compacted %d window(s): %d record(s) into %d segment(s), %d readings", report.windows,
                     report.records_in, report.segments_out, report.readings)
        if report.rollups:
            log.info("rolled up %d window(s): %d segment(s) merged", report.rollups, report.rolled_in)
        return report

    def _roll_up(self, closed_before: float, report: CompactionReport) -> None:
        """Roll up the due windows that have closed, smaller windows first (a 30-day window then merges days)."""
        expired = self._clock() - self._retention_s if self._retention_s > 0 else None
        for size in self._rollups:
            for key in sorted(k for k in self._rollups_due if k[0] == size):
                _, window, group = key
                end = (window + 1) * size
                if end > closed_before:
                    continue  # still open: due when it has closed
                if self._stop.is_set():
                    return
                self._rollups_due.discard(key)
                if expired is None or end > expired:
                    self.roll_up(size, window, group, report)

    def roll_up(self, size: int, window: int, group: int, report: CompactionReport | None = None) -> bool:
        """Merge the group's segments that lie inside window ``window`` of ``size`` seconds into one (parts that
        fit the store's record size) when there are several and they hold at most ROLLUP_READINGS readings;
        True if the store swapped them in."""
        report = report if report is not None else CompactionReport()
        start, end = window * size, (window + 1) * size
        inside = [s for s in self._store.batches_by_ts(start, end, SEGMENT, (group,)) if start <= s.lo and s.hi < end]
        if len(inside) < 2 or sum(s.count for s in inside) > ROLLUP_READINGS:
            return False
        ring = self._keys()
        merged: dict[tuple[str, str], _Series] = {}
        old: list[SealedBatch] = []
        # ordered by lo: readings equal in ts keep their order (they are one segment's)
        for s, seg in _opened(ring, inside, f"rollup of group {group}"):
            old.append(s)
            for g in seg:
                merged.setdefault((g[0], g[1]), _Series()).add(g[2], g[3], g[4], g[5], g[6], g[7])
        if len(old) < 2:
            return False
        series = [merged[k].sealed_form(*k) for k in sorted(merged)]
        first = int(min(s.lo for s in old) // self._window_s)
        new = [seal_segment(ring, part, first, group) for part in self._fit(series)]
        if not self._store.swap(old, new):
            log.info("segments of group %d changed while they were rolled up; tried again when next written", group)
            return False
        report.rollups += 1
        report.rolled_in += len(old)
        return True

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
            ours = [s for s in self._store.batches_by_ts(min(windows) * self._window_s,
                                                         (max(windows) + 1) * self._window_s, SEGMENT, (group,))
                    # not another window's, nor a rollup reaching past this window (left as it is)
                    if s.bucket in windows and s.hi < (s.bucket + 1) * self._window_s]
            for s, seg in _opened(ring, ours, f"compaction of window {window}, group {group}"):
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
        for out_window, out_group in by_out:
            at = out_window * self._window_s
            self._rollups_due.update((size, int(at // size), out_group) for size in self._rollups)
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

