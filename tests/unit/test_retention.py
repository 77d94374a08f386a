"""Retention (``storage.retention_days``) on a real SQLite store filled through the real ingest service.

A record goes whole once its newest reading is past the cutoff: nothing younger is touched, a query across the
cutoff answers what the store held from the oldest kept record on, and ``iot.get_stats`` says what went.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from components.core.compactor import Compactor
from components.core.errors import ConfigError
from components.core.query import Fetched, QueryService, Reading
from components.core.retention import DAY_S, Retention, record_name
from components.core.sealing import KeyRing
from components.core.settings import load_settings
from components.storage.interface import BATCH, SEGMENT, BatchStore, SealedBatch
from components.storage.sqlite import SqliteBatchStore
from tests.support.corefill import BATCHING, QUERY, STORAGE, H, T, ingest, new_ring, topic

HOUR = 3600.0
DAYS = 8


def hourly_events() -> list[tuple[str, Any, float]]:
    """Every hour of DAYS days, one event of 60 readings (a minute apart) of device 1 or 2: one batch each."""
    events = []
    for hour in range(DAYS * 24):
        device, sensor = ("1", H) if hour % 2 else ("2", T)
        readings = [{"value": float(hour * 60 + i), "ts": hour * HOUR + i * 60.0, "seq": hour // 2 * 60 + i + 1}
                    for i in range(60)]
        events.append((topic(device, sensor), readings, hour * HOUR + HOUR))
    return events


def filled(path: Path, ring: KeyRing) -> BatchStore:
    """A store of hourly_events whose windows before day 3 are compacted into segments, the rest write batches."""
    store = SqliteBatchStore(path)
    ingested = ingest(store, ring, replace(STORAGE, writer_queue=10_000),
                      replace(BATCHING, max_readings=60, max_age_s=1e9))
    ingested.events(hourly_events()).flush()
    assert ingested.service.stats()["stored"] == DAYS * 24 * 60
    # hour segments only, as storage with retention_days 2 compacts (its rollups are of a tenth of that at most)
    Compactor(store, lambda: ring, lambda: ingested.service.index, 3600, 0.0, clock=lambda: 3 * DAY_S + 1,
              rollups=()).run_once()
    return store


def snapshot(store: BatchStore) -> dict[str, tuple[str, SealedBatch]]:
    """Every batch and segment by uid, with all its fields."""
    return {r.uid: (kind, r) for kind, r in store.records() if isinstance(r, SealedBatch) and kind in (BATCH, SEGMENT)}


def listed(answer: Fetched) -> list[Reading]:
    """An answer given at once (not progressive)."""
    assert isinstance(answer, list)
    return answer


@pytest.mark.parametrize("cutoff_day", [5.0, 2.0 + 1.5 / 24], ids=["on-an-hour", "inside-a-segment"])
def test_retention_deletes_only_records_that_ended_before_the_cutoff_and_queries_across_it_answer_the_rest(
        tmp_path: Path, cutoff_day: float) -> None:
    ring = new_ring()
    store, reference = filled(tmp_path / "kept.sqlite3", ring), filled(tmp_path / "reference.sqlite3", ring)
    before = snapshot(store)
    assert {k for k, _ in before.values()} == {BATCH, SEGMENT}
    cutoff = cutoff_day * DAY_S
    retention = Retention(store, lambda: ring, 2.0, record_name(0, 1), clock=lambda: cutoff + 2 * DAY_S, chunk=7)
    removed = retention.run_once()

    after = snapshot(store)
    assert after == {uid: v for uid, v in before.items() if v[1].hi >= cutoff}  # nothing younger touched
    gone = [r for uid, (_, r) in before.items() if uid not in after]
    assert gone and all(r.hi < cutoff for r in gone)
    assert (removed.records, removed.readings) == (len(gone), sum(r.count for r in gone))
    assert retention.run_once().records == 0

    kept_from = min(r.lo for _, r in after.values())  # the oldest reading a kept record holds
    assert kept_from <= cutoff and cutoff - kept_from < HOUR  # a record reaching across the cutoff stays whole
    q, ref = QueryService(QUERY, store, lambda: ring), QueryService(QUERY, reference, lambda: ring)
    for device in (None, "1", "2"):
        across = listed(q.fetch_between_window(cutoff - DAY_S, cutoff + DAY_S, device_id=device))
        expected = listed(ref.fetch_between_window(cutoff - DAY_S, cutoff + DAY_S, device_id=device))
        assert across == [r for r in expected if r["ts"] >= kept_from]
        assert across and across[0]["ts"] == min(r["ts"] for r in expected if r["ts"] >= kept_from)
    assert q.fetch_since(cutoff) == ref.fetch_since(cutoff)
    assert q.fetch_between_window(0.0, kept_from - 0.001) == []
    stats = q.get_stats()["removed"]
    assert (stats["records"], stats["readings"], stats["before"], stats["by"]) == (
        len(gone), sum(r.count for r in gone), cutoff, "storage")


def test_retention_days_that_is_not_a_number_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"router": {"url": "ws://127.0.0.1:8080/ws", "realm": "iot"}, "storage": {"backend": "sqlite", '
                      '"retention_days": "thirty"}, "keys": {"source": "file"}}')
    with pytest.raises(ConfigError, match=r"setting storage\.retention_days: got 'thirty', expected a finite number"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match=r"storage\.retention_days \(from IOT_STORAGE_RETENTION_DAYS\): got '30d'"):
        load_settings(config, environ={"IOT_STORAGE_RETENTION_DAYS": "30d"})
    with pytest.raises(ConfigError, match=r"storage\.retention_days .*expected a value >= 0"):
        load_settings(config, environ={"IOT_STORAGE_RETENTION_DAYS": "-1"})
    assert load_settings(config, environ={"IOT_STORAGE_RETENTION_DAYS": "30"}).storage.retention_days == 30.0


def test_the_compactor_leaves_windows_that_ended_before_the_retention_cutoff_to_retention(tmp_path: Path) -> None:
    ring = new_ring()
    store = SqliteBatchStore(tmp_path / "store.sqlite3")
    ingested = ingest(store, ring, replace(STORAGE, writer_queue=10_000),
                      replace(BATCHING, max_readings=60, max_age_s=1e9))
    ingested.events(hourly_events()[:48]).flush()  # two days
    now = 3 * DAY_S
    Compactor(store, lambda: ring, lambda: ingested.service.index, 3600, 0.0, clock=lambda: now,
              retention_s=1.5 * DAY_S).run_once()
    kinds = {(kind, r.lo // HOUR) for kind, r in snapshot(store).values()}
    assert {hour for kind, hour in kinds if kind == SEGMENT} == set(range(36, 48))  # ended after the cutoff
    assert {hour for kind, hour in kinds if kind == BATCH} == set(range(36))  # left as they were
