"""The audit log: who called which query procedure, with which arguments, when, how many rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypedDict, cast

from components.core.batches import open_groups, seal_groups
from components.core.errors import TooManyResults
from components.core.query import INF, count_arg, number_arg
from components.core.sealing import KeyRing
from components.storage.interface import AUDIT, BatchStore

AUDIT_FIELDS = ("time", "authid", "authrole", "procedure", "args", "kwargs", "rows", "error", "served_by")


class AuditEntry(TypedDict):
    """One call, as ``iot.get_audit`` returns it."""

    time: float
    authid: str | None
    authrole: str | None
    procedure: str
    args: object
    kwargs: object
    rows: int | None
    error: str | None
    served_by: str


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
        self._buffer: list[list[object]] = []
        self._lock = threading.Lock()

    def record(self, authid: str | None, authrole: str | None, procedure: str, args: object, kwargs: object,
               rows: int | None, error: str | None = None) -> None:
        """Buffer one entry (written by the next :meth:`flush`)."""
        entry = [self._clock(), authid, authrole, procedure, self._clip(args), self._clip(kwargs), rows, error,
                 self._served_by]
        with self._lock:
            self._buffer.append(entry)

    def _clip(self, value: object) -> object:
        text = repr(value)
        return value if len(text) <= self.MAX_ARG_CHARS else text[:self.MAX_ARG_CHARS] + "..."

    def flush(self) -> int:
        """Seal and store the buffered entries as one chunk; return how many were written."""
        with self._lock:
            entries, self._buffer = self._buffer, []
        if not entries:
            return 0
        times = [cast(float, e[0]) for e in entries]
        lo, hi = min(times), max(times)
        try:
            self._store.append_audit(seal_groups(self._keys(), [entries], int(lo // 86400), lo, hi, lo, hi,
                                                 len(entries), kind=AUDIT))
        except Exception:
            with self._lock:
                self._buffer[:0] = entries  # keep them for the next attempt
            raise
        return len(entries)

    def read(self, since: float | None = None, limit: int | None = None) -> list[AuditEntry]:
        """``iot.get_audit(since=None)``: stored entries (and this callee's unwritten ones), oldest first."""
        n = None if limit is None else count_arg("limit", limit)
        since_t = -INF if since is None else number_arg("since", since)
        ring = self._keys()
        entries: list[list[object]] = []
        for sealed in self._store.batches_by_ts(since_t, INF, kind=AUDIT):
            for group in open_groups(ring, sealed, AUDIT):
                entries.extend(e for e in group if e[0] >= since_t)
        with self._lock:
            entries.extend(e for e in self._buffer if cast(float, e[0]) >= since_t)
        entries.sort(key=lambda e: cast(float, e[0]))
        if n is not None:
            entries = entries[-n:] if n else []
        if len(entries) > self._max_results:
            raise TooManyResults(f"{len(entries)} audit entries match, more than query.max_results "
                                 f"({self._max_results}): pass since= or limit=")
        return [cast(AuditEntry, dict(zip(AUDIT_FIELDS, e, strict=False))) for e in entries]
