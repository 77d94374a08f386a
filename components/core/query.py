"""The query service: validates arguments, finds the batches that can hold the answer, opens, filters, orders.

Plain Python (no WAMP): :meth:`QueryService.call` takes a procedure URI with its positional and keyword
arguments and returns the answer, or, for fetch procedures with progressive results, an iterator of
chunks. Batches are found through the store's interval index, so a query's cost follows the size of its
answer; opened batches are kept decrypted in a bounded LRU cache.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from components.core.batches import Group, open_groups, open_state
from components.core.errors import InvalidArgument, TooManyResults
from components.core.ingest import STATE_PREFIX
from components.core.readings import reading_dict, valid_id
from components.core.sealing import KeyRing
from components.core.settings import QuerySettings
from components.storage.interface import AUDIT, BatchStore, SealedBatch
from components.wamp import uris

INF = float("inf")
FETCH_FILTERS = frozenset({"device_id", "sensor_type", "limit"})
Row = tuple[float, Any, Any, Any, float, str, str]
"""(ts, value, seq, data, received_at, device_id, sensor_type): sorts by ts."""


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

def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number (epoch seconds), got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a non-negative integer, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _filters(procedure: str, kwargs: dict[str, Any], allowed: frozenset[str]) -> Filters:
    for key in sorted(set(kwargs) - allowed):
        known = ", ".join(sorted(allowed)) or "none"
        raise InvalidArgument(f"{procedure} has no keyword argument {key!r} (accepted: {known})")
    device_id, sensor_type = kwargs.get("device_id"), kwargs.get("sensor_type")
    for name, value in (("device_id", device_id), ("sensor_type", sensor_type)):
        if value is not None and not valid_id(value):
            raise InvalidArgument(f"{name} must match ^[0-9a-z_]{{1,64}}$, got {value!r}")
    limit = kwargs.get("limit")
    return Filters(device_id, sensor_type, None if limit is None else _count("limit", limit))


def _positional(procedure: str, names: tuple[str, ...], args: list[Any], kwargs: dict[str, Any],
                optional: tuple[str, ...] = ()) -> list[Any]:
    """Positional arguments, also accepted by name; a wrong count names what is expected."""
    values = list(args)
    for name in names[len(values):]:
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif name in optional:
            values.append(None)
    if len(values) != len(names):
        short = procedure.rsplit(".", 1)[-1]
        raise InvalidArgument(f"{short} takes {len(names)} argument(s) ({', '.join(names) or 'none'}), "
                              f"got {len(args)}")
    return values


# ---- reading rows out of batches

def _rows_of(groups: list[Group], f: Filters, lo: float, hi: float, rec_lo: float, covers: bool) -> list[Row]:
    """Rows of one batch within [lo, hi] by ts and received_at >= rec_lo, matching the filters."""
    out: list[Row] = []
    for device_id, sensor_type, rec, ts, values, seqs, datas, *_ in groups:
        if not f.matches(device_id, sensor_type) or rec < rec_lo:
            continue
        n = len(ts)
        seq_col = seqs or [None] * n
        data_col = datas or [None] * n
        if covers:
            out.extend(zip(ts, values, seq_col, data_col, [rec] * n, [device_id] * n, [sensor_type] * n,
                           strict=True))
        else:
            out.extend((t, values[i], seq_col[i], data_col[i], rec, device_id, sensor_type)
                       for i, t in enumerate(ts) if lo <= t <= hi)
    return out


def _as_reading(row: Row) -> dict[str, Any]:
    return reading_dict(row[5], row[6], row[0], row[1], row[2], row[3], row[4])


_CacheItem = tuple[SealedBatch, list[Group], dict[str, list[Group]]]
"""A cached batch: the record as it was opened, its groups, and its groups by device."""


class BatchCache:
    """Decrypted batches, least recently used evicted first, bounded by the number of readings held.

    Each batch is held with its groups indexed by device, so a query for one device touches that device's
    groups only, however many other devices share the batch.
    """

    def __init__(self, max_readings: int) -> None:
        """Hold at most ``max_readings`` readings."""
        self._max = max_readings
        self._held = 0
        self._items: OrderedDict[str, _CacheItem] = OrderedDict()
        self._lock = threading.Lock()

    def groups(self, ring: KeyRing, sealed: SealedBatch, device_id: str | None = None) -> list[Group]:
        """The batch's groups (of ``device_id`` only, when given): from the cache only if the record is byte for
        byte the one that was opened (so an edited index field or a moved body is never served from memory),
        else freshly opened."""
        with self._lock:
            item = self._items.get(sealed.uid)
            if item is not None and item[0] == sealed:
                self._items.move_to_end(sealed.uid)
            else:
                item = None
        if item is None:
            item = self._open(ring, sealed)
        return item[1] if device_id is None else item[2].get(device_id, [])

    def _open(self, ring: KeyRing, sealed: SealedBatch) -> _CacheItem:
        """Decrypt a batch, index its groups by device, and keep it (evicting the least recently used)."""
        groups = open_groups(ring, sealed)
        by_device: dict[str, list[Group]] = {}
        for group in groups:
            by_device.setdefault(group[0], []).append(group)
        item = (sealed, groups, by_device)
        if sealed.count <= self._max:
            with self._lock:
                old = self._items.pop(sealed.uid, None)
                if old is not None:
                    self._held -= old[0].count
                self._items[sealed.uid] = item
                self._held += sealed.count
                while self._held > self._max:
                    _, (evicted, _, _) = self._items.popitem(last=False)
                    self._held -= evicted.count
        return item


class QueryService:
    """Answers the query procedures of the wire contract."""

    def __init__(self, settings: QuerySettings, store: BatchStore, keys: Callable[[], KeyRing],
                 clock: Callable[[], float] = time.time) -> None:
        """Read from ``store``, opening with ``keys()``."""
        self.settings = settings
        self.store = store
        self.keys = keys
        self.clock = clock
        self.cache = BatchCache(settings.cache_readings)
        self._procedures: dict[str, Callable[[list[Any], dict[str, Any], bool], Any]] = {
            uris.FETCH_BETWEEN_WINDOW: self._between_window,
            uris.FETCH_SINCE: self._since,
            uris.FETCH_LAST_N_SEC: self._last_n_sec,
            uris.FETCH_LAST_WINDOW: self._last_window,
            uris.FETCH_ALL: self._all,
            uris.GET_MAX_REL_TIME: self._max_rel_time,
            uris.LIST_DEVICES: self._list_devices,
            uris.GET_LATEST: self._latest,
            uris.AGGREGATE: self._aggregate,
            uris.GET_STATS: self._stats,
        }

    @property
    def procedures(self) -> list[str]:
        """URIs this service answers (``iot.get_audit`` is answered by the audit log)."""
        return list(self._procedures)

    def call(self, procedure: str, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any],
             progressive: bool = False) -> Any:
        """Answer ``procedure``; fetches with ``progressive`` return an iterator of reading chunks."""
        return self._procedures[procedure](list(args), dict(kwargs), progressive)

    # ---- fetch procedures
    def _between_window(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        start, end = _positional(uris.FETCH_BETWEEN_WINDOW, ("start", "end"), args, kwargs)
        f = _filters(uris.FETCH_BETWEEN_WINDOW, kwargs, FETCH_FILTERS)
        start, end = _number("start", start), _number("end", end)
        if start > end:
            raise InvalidArgument(f"start ({start}) is after end ({end})")
        return self._answer(self._by_ts(start, end, f), f, progressive)

    def _since(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        (start,) = _positional(uris.FETCH_SINCE, ("start",), args, kwargs)
        f = _filters(uris.FETCH_SINCE, kwargs, FETCH_FILTERS)
        return self._answer(self._by_ts(_number("start", start), INF, f), f, progressive)

    def _all(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        _positional(uris.FETCH_ALL, (), args, kwargs)
        f = _filters(uris.FETCH_ALL, kwargs, FETCH_FILTERS)
        return self._answer(self._by_ts(-INF, INF, f), f, progressive)

    def _last_n_sec(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        (n,) = _positional(uris.FETCH_LAST_N_SEC, ("n",), args, kwargs)
        f = _filters(uris.FETCH_LAST_N_SEC, kwargs, FETCH_FILTERS)
        since = self.clock() - _count("n", n)
        batches = self.store.batches_by_received(since, INF)
        return self._answer(self._merge(batches, -INF, INF, f, since), f, progressive)

    def _last_window(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        (n,) = _positional(uris.FETCH_LAST_WINDOW, ("n",), args, kwargs)
        f = _filters(uris.FETCH_LAST_WINDOW, kwargs, FETCH_FILTERS)
        want = _count("n", n)
        if f.limit is not None:
            want = min(want, f.limit)
        if want == 0:
            return self._answer(iter(()), f, progressive)
        if not progressive and want > self.settings.max_results:
            raise TooManyResults(self._too_many(f"{want} readings were asked for"))
        ring = self.keys()
        top: list[Row] = []  # min-heap of the ``want`` greatest rows so far
        for sealed in self.store.batches_by_hi_desc():
            if len(top) >= want and sealed.hi < top[0][0]:
                break  # every later batch ends before the smallest kept reading
            for row in _rows_of(self.cache.groups(ring, sealed, f.device_id), f, -INF, INF, -INF, True):
                if len(top) < want:
                    heapq.heappush(top, row)
                elif row[0] > top[0][0]:
                    heapq.heapreplace(top, row)
        top.sort(key=lambda r: r[0])
        return self._answer(iter([top]), Filters(f.device_id, f.sensor_type, None), progressive)

    def _by_ts(self, start: float, end: float, f: Filters) -> Iterator[list[Row]]:
        return self._merge(self.store.batches_by_ts(start, end), start, end, f, -INF)

    def _merge(self, batches: list[SealedBatch], start: float, end: float, f: Filters, rec_lo: float
               ) -> Iterator[list[Row]]:
        """Sorted runs of rows: batches whose ts ranges overlap are sorted together, others one by one."""
        ring = self.keys()
        run: list[Row] = []
        run_hi = -INF
        for sealed in batches:  # ordered by lo
            if run and sealed.lo > run_hi:
                run.sort(key=lambda r: r[0])
                yield run
                run = []
            groups = self.cache.groups(ring, sealed, f.device_id)
            if groups:  # with device_id=, most batches of a long window hold nothing of that device
                run.extend(_rows_of(groups, f, start, end, rec_lo, start <= sealed.lo and sealed.hi <= end))
            if sealed.hi > run_hi:
                run_hi = sealed.hi
        if run:
            run.sort(key=lambda r: r[0])
            yield run

    def _too_many(self, what: str) -> str:
        return (f"{what}, more than query.max_results ({self.settings.max_results}): narrow the window, pass "
                f"limit=, or call with progressive results (receive_progress) to stream them in chunks")

    def _answer(self, runs: Iterable[list[Row]], f: Filters, progressive: bool) -> Any:
        limit = f.limit
        if progressive:
            return self._chunks(runs, limit)
        out: list[dict[str, Any]] = []
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

    def _chunks(self, runs: Iterable[list[Row]], limit: int | None) -> Iterator[list[dict[str, Any]]]:
        size = self.settings.chunk_size
        pending: list[dict[str, Any]] = []
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

    def _summary(self) -> dict[str, dict[str, list[Any]]]:
        merged: dict[str, dict[str, list[Any]]] = {}
        for state in self._states():
            for device_id, types in state.get("devices", {}).items():
                merged.setdefault(device_id, {}).update(types)
        return merged

    def _max_rel_time(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        _positional(uris.GET_MAX_REL_TIME, (), args, kwargs)
        f = _filters(uris.GET_MAX_REL_TIME, kwargs, frozenset({"device_id", "sensor_type"}))
        if f.device_id is None and f.sensor_type is None:
            return self.store.max_ts()
        last = [entry[2] for device_id, types in self._summary().items() for sensor_type, entry in types.items()
                if f.matches(device_id, sensor_type)]
        return max(last) if last else None

    def _list_devices(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        _positional(uris.LIST_DEVICES, (), args, kwargs)
        f = _filters(uris.LIST_DEVICES, kwargs, frozenset({"device_id"}))
        rows = []
        for device_id, types in sorted(self._summary().items()):
            if not f.matches(device_id, ""):
                continue
            entries = types.values()
            rows.append({
                "device_id": device_id,
                "sensor_types": sorted(types),
                "count": sum(e[0] for e in entries),
                "first_ts": min(e[1] for e in entries),
                "last_ts": max(e[2] for e in entries),
                "last_received_at": max(e[3] for e in entries),
            })
        return rows

    def _latest(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        _positional(uris.GET_LATEST, (), args, kwargs)
        f = _filters(uris.GET_LATEST, kwargs, frozenset({"device_id", "sensor_type"}))
        out = []
        for device_id, types in sorted(self._summary().items()):
            for sensor_type, entry in sorted(types.items()):
                if f.matches(device_id, sensor_type) and entry[4] is not None:
                    ts, value, seq, data, rec = entry[4]
                    out.append(reading_dict(device_id, sensor_type, ts, value, seq, data, rec))
        return out

    def _aggregate(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        start, end, bucket = _positional(uris.AGGREGATE, ("start", "end", "bucket"), args, kwargs)
        f = _filters(uris.AGGREGATE, kwargs, frozenset({"device_id", "sensor_type"}))
        start, end, bucket = _number("start", start), _number("end", end), _number("bucket", bucket)
        if start > end:
            raise InvalidArgument(f"start ({start}) is after end ({end})")
        if bucket <= 0:
            raise InvalidArgument(f"bucket must be a positive number of seconds, got {bucket!r}")
        acc: dict[tuple[int, str, str], list[float]] = {}
        for run in self._by_ts(start, end, f):
            for ts, value, _, _, _, device_id, sensor_type in run:
                key = (int((ts - start) // bucket), device_id, sensor_type)
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
        return [{"bucket_start": start + k * bucket, "device_id": d, "sensor_type": t, "count": a[0],
                 "min": a[1], "max": a[2], "mean": a[3] / a[0]} for (k, d, t), a in sorted(acc.items())]

    def _stats(self, args: list[Any], kwargs: dict[str, Any], progressive: bool) -> Any:
        _positional(uris.GET_STATS, (), args, kwargs)
        _filters(uris.GET_STATS, kwargs, frozenset())
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
        return total


AUDIT_FIELDS = ("time", "authid", "authrole", "procedure", "args", "kwargs", "rows", "error", "served_by")


class AuditLog:
    """Who called which query procedure, with which arguments, when, how many rows: sealed in the store."""

    MAX_ARG_CHARS = 1024

    def __init__(self, store: BatchStore, keys: Callable[[], KeyRing], served_by: str,
                 max_results: int, clock: Callable[[], float] = time.time) -> None:
        """Write sealed chunks of entries to ``store``; ``served_by`` names this callee in each entry."""
        self._store = store
        self._keys = keys
        self._served_by = served_by
        self._max_results = max_results
        self._clock = clock
        self._buffer: list[list[Any]] = []
        self._lock = threading.Lock()

    def record(self, authid: str | None, authrole: str | None, procedure: str, args: Any, kwargs: Any,
               rows: int | None, error: str | None = None) -> None:
        """Buffer one entry (written by the next :meth:`flush`)."""
        entry = [self._clock(), authid, authrole, procedure, self._clip(args), self._clip(kwargs), rows, error,
                 self._served_by]
        with self._lock:
            self._buffer.append(entry)

    def _clip(self, value: Any) -> Any:
        text = repr(value)
        return value if len(text) <= self.MAX_ARG_CHARS else text[:self.MAX_ARG_CHARS] + "..."

    def flush(self) -> int:
        """Seal and store the buffered entries as one chunk; return how many were written."""
        from components.core.batches import seal_groups

        with self._lock:
            entries, self._buffer = self._buffer, []
        if not entries:
            return 0
        times = [e[0] for e in entries]
        lo, hi = min(times), max(times)
        try:
            self._store.append_audit(seal_groups(self._keys(), [entries], int(lo // 86400), lo, hi, lo, hi,
                                                 len(entries), kind=AUDIT))
        except Exception:
            with self._lock:
                self._buffer[:0] = entries  # keep them for the next attempt
            raise
        return len(entries)

    def read(self, args: list[Any], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """``iot.get_audit(since=None)``: stored entries (and this callee's unwritten ones), oldest first."""
        (since,) = _positional(uris.GET_AUDIT, ("since",), args, kwargs, optional=("since",))
        f = _filters(uris.GET_AUDIT, kwargs, frozenset({"limit"}))
        since_t = -INF if since is None else _number("since", since)
        ring = self._keys()
        entries: list[list[Any]] = []
        for sealed in self._store.batches_by_ts(since_t, INF, kind=AUDIT):
            for group in open_groups(ring, sealed, AUDIT):
                entries.extend(e for e in group if e[0] >= since_t)
        with self._lock:
            entries.extend(e for e in self._buffer if e[0] >= since_t)
        entries.sort(key=lambda e: e[0])
        if f.limit is not None:
            entries = entries[-f.limit:] if f.limit else []
        if len(entries) > self._max_results:
            raise TooManyResults(f"{len(entries)} audit entries match, more than query.max_results "
                                 f"({self._max_results}): pass since= or limit=")
        return [dict(zip(AUDIT_FIELDS, e, strict=False)) for e in entries]
