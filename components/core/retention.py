"""Retention: write batches and segments whose newest reading is older than ``storage.retention_days`` go.

A record is deleted whole once its ``hi`` (the greatest ``ts`` it holds) is older than the cutoff, so a record
that reaches across the cutoff stays until all of it is old, and nothing younger is ever touched. On SQLite a
pass deletes in small transactions (:data:`DELETE_CHUNK` records, oldest first) with a pause between them, so
the writer never waits long for the database; on DynamoDB the table's TTL attribute does the deleting
(:attr:`~components.storage.interface.BatchStore.expires_itself`) and a pass only records the cutoff.

What a pass removed is added to a sealed named record, ``retention/<shard>-of-<shards>``, which
``iot.get_stats`` reports. Audit chunks and device rows are kept: a device's counts in ``iot.list_devices`` are
of every reading it ever sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from components.core.batches import open_state, seal_state
from components.core.passes import PassThread
from components.core.sealing import KeyRing
from components.storage.interface import BatchStore, Removed

log = logging.getLogger(__name__)

PREFIX = "retention/"
DAY_S = 86400.0
DELETE_CHUNK = 256
"""Records deleted in one transaction."""
PAUSE_S = 0.005
"""Pause between two deleting transactions: the writer takes the database in between."""
PASS_INTERVAL_S = 60.0


def record_name(shard: int, shards: int) -> str:
    """The named record of one storage instance's retention totals."""
    return f"{PREFIX}{shard}-of-{shards}"


class Retention:
    """Deletes what is past the retention, on a thread of its own, and keeps the totals."""

    def __init__(self, store: BatchStore, keys: Callable[[], KeyRing], retention_days: float, name: str,
                 clock: Callable[[], float] = time.time, chunk: int = DELETE_CHUNK, pause_s: float = PAUSE_S) -> None:
        """Keep ``retention_days`` of readings in ``store``; totals in the named record ``name``."""
        if retention_days <= 0:
            raise ValueError("retention_days must be positive (0 keeps everything: start no Retention)")
        self._store = store
        self._keys = keys
        self._keep_s = retention_days * DAY_S
        self._name = name
        self._clock = clock
        self._chunk = chunk
        self._pause_s = pause_s
        self._background = PassThread("storage-retention", "retention", self.run_once, PASS_INTERVAL_S)
        self._stop = self._background.stopping
        self.total = Removed()
        self.longest_s = 0.0
        """The longest deleting call so far (how long the writer may have waited)."""

    def cutoff(self) -> float:
        """Records whose hi is below this are past the retention."""
        return self._clock() - self._keep_s

    def load(self) -> None:
        """Read the totals of earlier runs."""
        for sealed in self._store.get_states([self._name]):
            value = open_state(self._keys(), sealed)
            self.total = Removed(value.get("records", 0), value.get("readings", 0), value.get("bytes", 0))

    def run_once(self) -> Removed:
        """One pass: delete in chunks until nothing is past the cutoff (or :meth:`stop`); what it removed."""
        before = self.cutoff()
        removed = Removed()
        while not self._store.expires_itself and not self._stop.is_set():
            started = time.perf_counter()
            chunk = self._store.delete_before(before, self._chunk)
            self.longest_s = max(self.longest_s, time.perf_counter() - started)
            removed += chunk
            if chunk.records < self._chunk:
                break
            self._stop.wait(self._pause_s)
        self.total += removed
        self._save(before)
        if removed.records:
            log.info("retention: deleted %d record(s) holding %d readings that ended before %s", removed.records,
                     removed.readings, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before)))
        return removed

    def _save(self, before: float) -> None:
        value: dict[str, Any] = {"v": 1, "records": self.total.records, "readings": self.total.readings,
                                 "bytes": self.total.bytes, "before": before, "at": self._clock(),
                                 "by": "ttl" if self._store.expires_itself else "storage"}
        self._store.commit([], [seal_state(self._keys(), self._name, value)])

    # ---- the thread
    def start(self) -> None:
        """Load the totals, then run a pass now and every :data:`PASS_INTERVAL_S` until :meth:`stop`."""
        self.load()
        self._background.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the transaction under way."""
        self._background.stop(timeout)
