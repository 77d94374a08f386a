"""The query service: validates arguments, finds the records that can hold the answer, opens, filters, orders.

Plain Python (no WAMP): one method per query procedure, with typed arguments; fetches with ``progressive``
return an iterator of reading chunks. Argument values are checked here (:class:`InvalidArgument` names the
argument); the WAMP adapter decodes positional and keyword arguments into them. Records (write batches and
compacted segments) are found through the store's interval index, and with ``device_id=`` only in that
device's group, so a query's cost follows the size of its answer, not of the store or the fleet; opened
records are kept decrypted in a bounded LRU cache. ``list_devices``, ``get_latest`` and
``get_max_rel_time`` read device rows.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, cast

from components.core.batches import SEGMENT_FORMAT, Group, open_groups, open_segment, open_state, segment_groups
from components.core.devices import DEVICE_PREFIX, DeviceIndex, DeviceRow
from components.core.errors import InvalidArgument, TooManyResults
from components.core.ingest import STATE_PREFIX, STATE_VERSION, TAG_BITS, open_rows
from components.core.readings import reading_dict, valid_id
from components.core.retention import PREFIX as RETENTION_PREFIX
from components.core.sealing import KeyRing
from components.core.settings import QuerySettings, StorageSettings
from components.storage.interface import BATCH, SEGMENT, BatchStore, Groups, SealedBatch

INF = float("inf")
Row = tuple[float, float, int | None, dict[str, Any] | None, float, str, str]
"""(ts, value, seq, data, received_at, device_id, sensor_type)."""
ORDER = operator.itemgetter(0, 5, 6, 4)
"""Answers are ordered by ts, then device, sensor type and arrival: the same however the readings are stored."""


class Reading(TypedDict):
    """A stored reading as the fetch procedures return it."""

    device_id: str
    sensor_type: str
    value: float
    ts: float
    seq: NotRequired[int]
    data: NotRequired[dict[str, Any]]
    received_at: float


Fetched = list[Reading] | Iterator[list[Reading]]
"""A fetch's answer: every reading, or (with ``progressive``) chunks of them."""


class Device(TypedDict):
    """One device as ``list_devices`` describes it."""

    device_id: str
    sensor_types: list[str]
    count: int
    first_ts: float
    last_ts: float
    last_received_at: float


class Bucket(TypedDict):
    """One time bucket of one device and sensor type, as ``aggregate`` returns it."""

    bucket_start: float
    device_id: str
    sensor_type: str
    count: int
    min: float
    max: float
    mean: float


class ShardStats(TypedDict):
    """One storage instance in ``get_stats``."""

    name: str
    written_at: float | None
    stored: int
    queue_depth: int


class RemovedStats(TypedDict):
    """What retention deleted (``storage.retention_days``), summed over storage instances."""

    records: int
    readings: int
    bytes: int
    before: float | None
    by: str | None


class Stats(TypedDict):
    """Storage counters summed over every storage instance."""

    received: int
    stored: int
    duplicates: int
    out_of_order: int
    shed: int
    batches: int
    bytes: int
    queue_depth: int
    rejected: dict[str, int]
    shards: list[ShardStats]
    removed: RemovedStats


@dataclass(frozen=True)
class Filters:
    """Keyword filters of a query."""

    device_id: str | None = None
    sensor_type: str | None = None
    limit: int | None = None

    def matches(self, device_id: str, sensor_type: str) -> bool:
        """True when a group of this device and sensor type can match."""
        return ((self.device_id is None or self.device_id == device_id)
                and (self.sensor_type is None or self.sensor_type == sensor_type))


# ---- argument checks (every message names the argument)

def number_arg(name: str, value: object) -> float:
    """``value`` as a finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number (epoch seconds), got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
    return float(value)


def count_arg(name: str, value: object) -> int:
    """``value`` as a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a non-negative integer, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _filters(device_id: str | None = None, sensor_type: str | None = None, limit: int | None = None) -> Filters:
    for name, value in (("device_id", device_id), ("sensor_type", sensor_type)):
        if value is not None and not valid_id(value):
            raise InvalidArgument(f"{name} must match ^[0-9a-z_]{{1,64}}$, got {value!r}")
    return Filters(device_id, sensor_type, None if limit is None else count_arg("limit", limit))


def _window(start: float, end: float) -> tuple[float, float]:
    start, end = number_arg("start", start), number_arg("end", end)
    if start > end:
        raise InvalidArgument(f"start ({start}) is after end ({end})")
    return start, end


# ---- reading rows out of batches

def _rows_of(groups: list[Group], f: Filters, lo: float, hi: float, rec_lo: float, covers: bool) -> list[Row]:
    """Rows of one batch or segment within [lo, hi] by ts and received_at >= rec_lo, matching the filters.

    A batch's group has one ``received_at``; a segment's has a column of them.
    """
    out: list[Row] = []
    for device_id, sensor_type, rec, ts, values, seqs, datas, *_ in groups:
        if not f.matches(device_id, sensor_type):
            continue
        n = len(ts)
        if type(rec) is list:
            rec_col = rec
            if rec_lo > -INF:
                covers = covers and min(rec) >= rec_lo
        elif rec < rec_lo:
            continue
        else:
            rec_col = [rec] * n
        seq_col = seqs or [None] * n
        data_col = datas or [None] * n
        if covers:
            out.extend(zip(ts, values, seq_col, data_col, rec_col, [device_id] * n, [sensor_type] * n, strict=True))
        else:
            out.extend((t, values[i], seq_col[i], data_col[i], rec_col[i], device_id, sensor_type)
                       for i, t in enumerate(ts) if lo <= t <= hi and rec_col[i] >= rec_lo)
    return out


def _as_reading(row: Row) -> Reading:
    """The reading of a row, as :func:`components.core.readings.reading_dict` makes it (inlined: once per row)."""
    ts, value, seq, data, rec, device_id, sensor_type = row
    out: dict[str, Any] = {"device_id": device_id, "sensor_type": sensor_type, "value": value, "ts": ts}
    if seq is not None:
        out["seq"] = seq
    if data is not None:
        out["data"] = data
    out["received_at"] = rec  # last, as reading_dict puts it
    return cast(Reading, out)


@dataclass
class _CacheItem:
    """An opened record: its groups by device, and for a segment the decrypted encoding (devices decode lazily)."""

    sealed: SealedBatch
    by_device: dict[str, list[Group]]
    encoded: bytes | None = None
    complete: bool = True


class BatchCache:
    """Decrypted batches and segments, least recently used evicted first, bounded by the number of readings held.

    Each record is held with its groups indexed by device, so a query for one device touches that device's
    groups only, however many other devices share the record; a segment decodes only the devices asked for.
    """

    def __init__(self, max_readings: int) -> None:
        """Hold at most ``max_readings`` readings."""
        self._max = max_readings
        self._held = 0
        self._items: OrderedDict[str, _CacheItem] = OrderedDict()
        self._lock = threading.Lock()

    def groups(self, ring: KeyRing, sealed: SealedBatch, device_id: str | None = None) -> list[Group]:
        """The record's groups (of ``device_id`` only, when given): from the cache only if the record is byte for
        byte the one that was opened (so an edited index field or a moved body is never served from memory),
        else freshly opened."""
        with self._lock:
            item = self._items.get(sealed.uid)
            if item is not None and item.sealed == sealed:
                self._items.move_to_end(sealed.uid)
            else:
                item = None
        if item is None:
            item = self._open(ring, sealed)
        if item.encoded is not None:  # a segment
            if device_id is None:
                if not item.complete:
                    by_device: dict[str, list[Group]] = {}
                    for g in segment_groups(sealed, item.encoded):
                        by_device.setdefault(g[0], []).append(g)
                    item.by_device, item.complete = by_device, True
            elif device_id not in item.by_device and not item.complete:
                item.by_device[device_id] = segment_groups(sealed, item.encoded, device_id)
        if device_id is not None:
            return item.by_device.get(device_id, [])
        return [g for gs in item.by_device.values() for g in gs]

    def _open(self, ring: KeyRing, sealed: SealedBatch) -> _CacheItem:
        """Decrypt a record, index a batch's groups by device, and keep it (evicting the least recently used)."""
        if sealed.fmt == SEGMENT_FORMAT:
            item = _CacheItem(sealed, {}, open_segment(ring, sealed), complete=False)
        else:
            by_device: dict[str, list[Group]] = {}
            for group in open_groups(ring, sealed):
                by_device.setdefault(group[0], []).append(group)
            item = _CacheItem(sealed, by_device)
        if sealed.count <= self._max:
            with self._lock:
                old = self._items.pop(sealed.uid, None)
                if old is not None:
                    self._held -= old.sealed.count
                self._items[sealed.uid] = item
                self._held += sealed.count
                while self._held > self._max:
                    _, evicted = self._items.popitem(last=False)
                    self._held -= evicted.sealed.count
        return item


def _by_lo(*parts: list[SealedBatch]) -> list[SealedBatch]:
    return sorted((b for part in parts for b in part), key=lambda b: b.lo)


class QueryService:
    """Answers the query procedures of the wire contract, one method each."""

    def __init__(self, settings: QuerySettings, store: BatchStore, keys: Callable[[], KeyRing],
                 clock: Callable[[], float] = time.time,
                 tag_bits: int = StorageSettings.device_tag_bits) -> None:
        """Read from ``store``, opening with ``keys()``; ``tag_bits`` is storage's setting, for a store not yet
        written to (a store keeps the length of its groups)."""
        self.settings = settings
        self.store = store
        self.keys = keys
        self.clock = clock
        self.cache = BatchCache(settings.cache_readings)
        self._tag_bits = tag_bits
        self._index: DeviceIndex | None = None

    @property
    def index(self) -> DeviceIndex:
        """Device groups of the store (read from it once)."""
        if self._index is None:
            bits = int(self.store.setting(TAG_BITS, str(self._tag_bits)))
            self._index = DeviceIndex(self.keys().index_key, bits)
        return self._index

    def _groups(self, f: Filters) -> Groups:
        return None if f.device_id is None else self.index.groups_of(f.device_id)

    def _records(self, by: Callable[..., list[SealedBatch]], start: float, end: float, f: Filters
                 ) -> list[SealedBatch]:
        groups = self._groups(f)
        return _by_lo(by(start, end, BATCH, groups), by(start, end, SEGMENT, groups))

    # ---- fetch procedures
    def fetch_between_window(self, start: float, end: float, device_id: str | None = None,
                             sensor_type: str | None = None, limit: int | None = None,
                             progressive: bool = False) -> Fetched:
        """Readings with ``start <= ts <= end``, oldest first."""
        f = _filters(device_id, sensor_type, limit)
        start, end = _window(start, end)
        return self._answer(self._by_ts(start, end, f), f, progressive)

    def fetch_since(self, start: float, device_id: str | None = None, sensor_type: str | None = None,
                    limit: int | None = None, progressive: bool = False) -> Fetched:
        """Readings with ``ts >= start``, oldest first."""
        f = _filters(device_id, sensor_type, limit)
        return self._answer(self._by_ts(number_arg("start", start), INF, f), f, progressive)

    def fetch_all(self, device_id: str | None = None, sensor_type: str | None = None, limit: int | None = None,
                  progressive: bool = False) -> Fetched:
        """Every reading, oldest first."""
        f = _filters(device_id, sensor_type, limit)
        return self._answer(self._by_ts(-INF, INF, f), f, progressive)

    def fetch_last_n_sec(self, n: int, device_id: str | None = None, sensor_type: str | None = None,
                         limit: int | None = None, progressive: bool = False) -> Fetched:
        """Readings received in the last ``n`` seconds, oldest first."""
        f = _filters(device_id, sensor_type, limit)
        since = self.clock() - count_arg("n", n)
        batches = self._records(self.store.batches_by_received, since, INF, f)
        return self._answer(self._merge(batches, -INF, INF, f, since), f, progressive)

    def fetch_last_window(self, n: int, device_id: str | None = None, sensor_type: str | None = None,
                          limit: int | None = None, progressive: bool = False) -> Fetched:
        """The ``n`` readings with the greatest ts, oldest first."""
        f = _filters(device_id, sensor_type, limit)
        want = count_arg("n", n)
        if f.limit is not None:
            want = min(want, f.limit)
        if want == 0:
            return self._answer(iter(()), f, progressive)
        if not progressive and want > self.settings.max_results:
            raise TooManyResults(self._too_many(f"{want} readings were asked for"))
        ring = self.keys()
        top: list[tuple[tuple[Any, ...], int, Row]] = []  # min-heap of the ``want`` greatest rows so far
        tiebreak = itertools.count()
        groups = self._groups(f)
        newest_first = heapq.merge(self.store.batches_by_hi_desc(None, BATCH, groups),
                                   self.store.batches_by_hi_desc(None, SEGMENT, groups), key=lambda b: -b.hi)
        for sealed in newest_first:
            if len(top) >= want and sealed.hi < top[0][0][0]:
                break  # every later batch ends before the smallest kept reading
            for row in _rows_of(self.cache.groups(ring, sealed, f.device_id), f, -INF, INF, -INF, True):
                key = ORDER(row)
                if len(top) < want:
                    heapq.heappush(top, (key, next(tiebreak), row))
                elif key > top[0][0]:
                    heapq.heapreplace(top, (key, next(tiebreak), row))
        if not top:
            return self._answer(iter(()), f, progressive)
        # the rows from the smallest kept key on, in the order every fetch gives them (readings equal in every
        # key keep their order however they are stored), less the surplus of that key at the front
        least = top[0][0]
        rows = [row for run in self._by_ts(least[0], INF, f) for row in run if ORDER(row) >= least]
        return self._answer(iter([rows[max(0, len(rows) - want):]]), Filters(f.device_id, f.sensor_type, None),
                            progressive)

    def _by_ts(self, start: float, end: float, f: Filters) -> Iterator[list[Row]]:
        return self._merge(self._records(self.store.batches_by_ts, start, end, f), start, end, f, -INF)

    def _merge(self, batches: list[SealedBatch], start: float, end: float, f: Filters, rec_lo: float
               ) -> Iterator[list[Row]]:
        """Sorted runs of rows: batches whose ts ranges overlap are sorted together, others one by one."""
        ring = self.keys()
        run: list[Row] = []
        run_hi = -INF
        for sealed in batches:  # ordered by lo
            if run and sealed.lo > run_hi:
                run.sort(key=ORDER)
                yield run
                run = []
            groups = self.cache.groups(ring, sealed, f.device_id)
            if groups:  # with device_id=, most batches of a long window hold nothing of that device
                run.extend(_rows_of(groups, f, start, end, rec_lo, start <= sealed.lo and sealed.hi <= end))
            if sealed.hi > run_hi:
                run_hi = sealed.hi
        if run:
            run.sort(key=ORDER)
            yield run

    def _too_many(self, what: str) -> str:
        return (f"{what}, more than query.max_results ({self.settings.max_results}): narrow the window, pass "
                f"limit=, or call with progressive results (receive_progress) to stream them in chunks")

    def _answer(self, runs: Iterable[list[Row]], f: Filters, progressive: bool) -> Fetched:
        limit = f.limit
        if progressive:
            return self._chunks(runs, limit)
        out: list[Reading] = []
        cap = self.settings.max_results
        for run in runs:
            if limit is not None and len(out) + len(run) >= limit:
                out.extend(_as_reading(r) for r in run[:limit - len(out)])
                break
            if len(out) + len(run) > cap:
                raise TooManyResults(self._too_many(f"more than {cap} readings match"))
            out.extend(map(_as_reading, run))
        if len(out) > cap:
            raise TooManyResults(self._too_many(f"{len(out)} readings were asked for"))
        return out

    def _chunks(self, runs: Iterable[list[Row]], limit: int | None) -> Iterator[list[Reading]]:
        size = self.settings.chunk_size
        pending: list[Reading] = []
        sent = 0
        for run in runs:
            for row in run:
                if limit is not None and sent >= limit:
                    break
                pending.append(_as_reading(row))
                sent += 1
                if len(pending) >= size:
                    yield pending
                    pending = []
        if pending:
            yield pending

    # ---- summaries
    def _states(self) -> list[dict[str, Any]]:
        ring = self.keys()
        return [open_state(ring, s) | {"name": s.name} for s in self.store.states(STATE_PREFIX)]

    def _rows(self, device_id: str | None) -> list[DeviceRow]:
        """Device rows (of one device when given), sorted by device id, with what storage instances of the
        version before device rows still hold in their state records."""
        ring = self.keys()
        if device_id is None:
            rows = open_rows(ring, self.store.states(DEVICE_PREFIX))
        else:
            rows = open_rows(ring, self.store.get_states([self.index.row_name(device_id)]))
        for state in self._states():
            if state.get("v", 1) < STATE_VERSION:
                for device, types in state.get("devices", {}).items():
                    if device_id is None or device == device_id:
                        row = rows.setdefault(device, DeviceRow(device))
                        for sensor_type, entry in types.items():
                            row.merge_entry(sensor_type, entry)
        return [rows[d] for d in sorted(rows) if rows[d].types]

    def get_max_rel_time(self, device_id: str | None = None, sensor_type: str | None = None) -> float | None:
        """The greatest ts stored (of the device and sensor type, when given); None when there is none."""
        f = _filters(device_id, sensor_type)
        if f.device_id is None and f.sensor_type is None:
            return self.store.max_ts()
        last = [entry[2] for row in self._rows(f.device_id) for sensor, entry in row.types.items()
                if f.matches(row.device_id, sensor)]
        return max(last) if last else None

    def list_devices(self, device_id: str | None = None) -> list[Device]:
        """Every device with stored readings (or the one asked for)."""
        f = _filters(device_id)
        devices: list[Device] = []
        for row in self._rows(f.device_id):
            entries = row.types.values()
            devices.append({
                "device_id": row.device_id,
                "sensor_types": sorted(row.types),
                "count": sum(e[0] for e in entries),
                "first_ts": min(e[1] for e in entries),
                "last_ts": max(e[2] for e in entries),
                "last_received_at": max(e[3] for e in entries),
            })
        return devices

    def get_latest(self, device_id: str | None = None, sensor_type: str | None = None) -> list[Reading]:
        """The reading with the greatest ts of each device and sensor type."""
        f = _filters(device_id, sensor_type)
        out: list[Reading] = []
        for row in self._rows(f.device_id):
            for sensor, entry in sorted(row.types.items()):
                if f.matches(row.device_id, sensor) and entry[4] is not None:
                    ts, value, seq, data, rec = entry[4]
                    out.append(cast(Reading, reading_dict(row.device_id, sensor, ts, value, seq, data, rec)))
        return out

    def aggregate(self, start: float, end: float, bucket: float, device_id: str | None = None,
                  sensor_type: str | None = None) -> list[Bucket]:
        """Count, min, max and mean per ``bucket`` seconds from ``start``, device and sensor type."""
        f = _filters(device_id, sensor_type)
        start, end = _window(start, end)
        bucket = number_arg("bucket", bucket)
        if bucket <= 0:
            raise InvalidArgument(f"bucket must be a positive number of seconds, got {bucket!r}")
        acc: dict[tuple[int, str, str], list[float]] = {}
        for run in self._by_ts(start, end, f):
            for ts, value, _, _, _, device, sensor in run:
                key = (int((ts - start) // bucket), device, sensor)
                a = acc.get(key)
                if a is None:
                    acc[key] = [1, value, value, value]
                else:
                    a[0] += 1
                    a[1] = min(a[1], value)
                    a[2] = max(a[2], value)
                    a[3] += value
            if len(acc) > self.settings.max_results:
                raise TooManyResults(self._too_many(f"more than {self.settings.max_results} buckets"))
        return [{"bucket_start": start + k * bucket, "device_id": d, "sensor_type": t, "count": int(a[0]),
                 "min": a[1], "max": a[2], "mean": a[3] / a[0]} for (k, d, t), a in sorted(acc.items())]

    def get_stats(self) -> Stats:
        """Storage counters summed over every storage instance, with each instance's."""
        total: dict[str, Any] = {"received": 0, "stored": 0, "duplicates": 0, "out_of_order": 0, "shed": 0,
                                 "batches": 0, "bytes": 0, "queue_depth": 0, "rejected": {}, "shards": []}
        for state in sorted(self._states(), key=lambda s: s["name"]):
            counters = state.get("counters", {})
            for key in ("received", "stored", "duplicates", "out_of_order", "shed", "batches", "bytes"):
                total[key] += counters.get(key, 0)
            total["queue_depth"] += state.get("queue_depth", 0)
            for reason, n in counters.get("rejected", {}).items():
                total["rejected"][reason] = total["rejected"].get(reason, 0) + n
            total["shards"].append({"name": state["name"], "written_at": state.get("written_at"),
                                    "stored": counters.get("stored", 0), "queue_depth": state.get("queue_depth", 0)})
        total["removed"] = self._removed()
        return cast(Stats, total)

    def _removed(self) -> RemovedStats:
        """Retention's totals: records, readings and bytes deleted, the latest cutoff and who deletes."""
        ring = self.keys()
        removed: RemovedStats = {"records": 0, "readings": 0, "bytes": 0, "before": None, "by": None}
        for sealed in self.store.states(RETENTION_PREFIX):
            value = open_state(ring, sealed)
            removed["records"] += value.get("records", 0)
            removed["readings"] += value.get("readings", 0)
            removed["bytes"] += value.get("bytes", 0)
            removed["before"] = max(removed["before"] or value["before"], value["before"])
            removed["by"] = value.get("by")
        return removed
