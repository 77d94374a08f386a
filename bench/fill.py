"""Filling stores without a router: synthetic readings through the real IngestService, and plain tables.

The ingest service is the storage subscriber's core (validation, batching, sealing on its writer thread,
commits), so a store filled here is laid out exactly as one filled through the router. Filling is paced
by the writer queue: a reading is never shed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.ingest import IngestService
from components.core.sealing import KeyRing
from components.core.settings import BatchingSettings, StorageSettings
from components.storage.interface import BatchStore
from components.wamp import uris
from components.wamp.subscriber import deliver
from devices.simulator import classic_dataset

BASE_TS = 1_699_920_000.0
"""2023-11-14T00:00:00Z, the start of a day bucket."""
STEP_S = 0.01
"""Synthetic readings are STEP_S apart in ts, in order: reading i has ts BASE_TS + i * STEP_S."""
DEVICES = 10
SENSOR_TYPES = ("humidity", "temperature")
PER_EVENT = 100
_VALUES = [round((i * 37.0) % 100.0 + (i % 7) / 10.0, 2) for i in range(997)]

Event = tuple[str, Any, float]
"""(topic, payload, received_at)."""


def synthetic_ts(i: int) -> float:
    """The ts of synthetic reading ``i``."""
    return BASE_TS + i * STEP_S


def window_of(first: int, count: int) -> tuple[float, float]:
    """A [start, end] window holding exactly the synthetic readings first .. first+count-1."""
    return synthetic_ts(first) - STEP_S / 2, synthetic_ts(first + count - 1) + STEP_S / 2


def synthetic_events(total: int, received_at: float | None = None) -> Iterator[Event]:
    """``total`` readings in events of PER_EVENT, round robin over DEVICES devices and both sensor types."""
    rec = time.time() if received_at is None else received_at
    pairs = [(str(d), t) for d in range(DEVICES) for t in SENSOR_TYPES]
    topics = [uris.sensor_topic(d, t) for d, t in pairs]
    nv = len(_VALUES)
    for e, first in enumerate(range(0, total, PER_EVENT)):
        n = min(PER_EVENT, total - first)
        payload = [{"value": _VALUES[(first + j) % nv], "ts": BASE_TS + (first + j) * STEP_S} for j in range(n)]
        yield topics[e % len(topics)], payload, rec + first * 1e-6


def classic_events(total: int = 5000, received_at: float | None = None) -> Iterator[Event]:
    """The classic data set (51 devices, humidity and temperature, a year), one reading per event, by ts."""
    rec = time.time() if received_at is None else received_at
    for i, r in enumerate(classic_dataset(total)):
        yield uris.sensor_topic(r.device_id, r.sensor_type), {"value": r.value, "ts": r.ts}, rec + i * 1e-6


def synthetic_rows(total: int, received_at: float) -> Iterator[tuple[str, str, float, float, float]]:
    """The same readings as plain rows (device_id, sensor_type, ts, value, received_at)."""
    pairs = [(str(d), t) for d in range(DEVICES) for t in SENSOR_TYPES]
    nv = len(_VALUES)
    for i in range(total):
        d, t = pairs[(i // PER_EVENT) % len(pairs)]
        yield d, t, BASE_TS + i * STEP_S, _VALUES[i % nv], received_at


@dataclass(frozen=True)
class FillReport:
    """What a fill did."""

    readings: int
    seconds: float
    counters: dict[str, Any]

    @property
    def per_s(self) -> float:
        """Readings committed per second of filling."""
        return self.readings / self.seconds if self.seconds > 0 else 0.0


def fill(store: BatchStore, ring: KeyRing, events: Iterable[Event], storage: StorageSettings | None = None,
         batching: BatchingSettings | None = None, timeout: float = 900.0) -> FillReport:
    """Ingest ``events`` into ``store`` through a real IngestService and commit everything."""
    storage = storage or StorageSettings(backend="sqlite")
    service = IngestService(storage, batching or BatchingSettings(), store, lambda: ring, lambda acks: None)
    service.start()
    limit = storage.writer_queue
    started = time.monotonic()
    deadline = started + timeout
    try:
        for topic, payload, received_at in events:
            while service.queue_depth() >= limit:  # the writer is behind: wait rather than shed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"filling the store took more than {timeout:.0f}s")
                time.sleep(0.001)
                service.tick()
            deliver(service, topic, payload, received_at)
    finally:
        committed = service.flush(120.0)
    seconds = time.monotonic() - started
    stats = service.stats()
    if not committed or stats["shed"] or sum(stats["rejected"].values()):
        raise RuntimeError(f"filling the store lost readings: {stats}")
    return FillReport(int(stats["stored"]), seconds, stats)


def plain_table(path: Path, rows: Iterable[tuple[str, str, float, float, float]]) -> None:
    """The baseline: a plain SQLite table of readings with an index on ts."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE readings (device_id TEXT NOT NULL, sensor_type TEXT NOT NULL, ts REAL NOT NULL, "
                     "value REAL NOT NULL, received_at REAL NOT NULL)")
        with conn:
            conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?)", rows)
        conn.execute("CREATE INDEX readings_by_ts ON readings (ts)")
    finally:
        conn.close()


def plain_query_ms(path: Path, windows: list[tuple[float, float]], calls: int, expect: int) -> list[float]:
    """Milliseconds per ``SELECT ... WHERE ts BETWEEN ? AND ? ORDER BY ts`` + fetchall, cycling ``windows``."""
    conn = sqlite3.connect(path)
    try:
        sql = ("SELECT device_id, sensor_type, ts, value, received_at FROM readings WHERE ts BETWEEN ? AND ? "
               "ORDER BY ts")
        rows = conn.execute(sql, windows[0]).fetchall()
        if len(rows) != expect:
            raise RuntimeError(f"baseline window holds {len(rows)} rows, expected {expect}")
        out = []
        for i in range(calls):
            t = time.perf_counter()
            conn.execute(sql, windows[i % len(windows)]).fetchall()
            out.append((time.perf_counter() - t) * 1000)
        return out
    finally:
        conn.close()
