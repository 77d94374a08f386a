"""Compaction, device groups and device rows, through the real ingest, compactor and query services.

A compacted store must answer exactly as the same readings answer uncompacted, in order and content; a store
written by the version before device groups must open, compact and answer as that version did.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.core import compactor as compactor_module
from components.core.batches import SEGMENT_FORMAT
from components.core.compactor import DAY_S, ROLLUPS, Compactor
from components.core.query import QueryService
from components.core.sealing import KeyFile, KeyRing
from components.storage.interface import BATCH, EVERY_GROUP, SEGMENT, BatchStore
from components.storage.memory import MemoryBatchStore
from components.storage.sqlite import SqliteBatchStore
from tests.support.corefill import BATCHING, QUERY, STORAGE, H, T, fill, ingest, new_ring, topic

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_v1"
WINDOW = 600
INF = float("inf")


def compactor(store: BatchStore, ring: KeyRing, service: Any, **kw: Any) -> Compactor:
    """A compactor of the store with the ingest service's device groups, its clock far past every window."""
    return Compactor(store, lambda: ring, lambda: service.index, kw.pop("segment_seconds", WINDOW), 0.0,
                     clock=lambda: 1e12, **kw)


def query(store: BatchStore, ring: KeyRing) -> QueryService:
    return QueryService(QUERY, store, lambda: ring)


def answers(q: QueryService, windows: list[tuple[float, float, str | None, str | None]]) -> list[Any]:
    out: list[Any] = [q.list_devices(), q.get_latest(), q.get_max_rel_time(), q.fetch_all()]
    for start, end, device, sensor in windows:
        out.append(q.fetch_between_window(start, end, device_id=device, sensor_type=sensor))
        out.append(q.aggregate(start, end, 60.0, device_id=device, sensor_type=sensor))
    out.append(q.fetch_last_window(25))
    return out


# -- the property: compacted and uncompacted stores answer the same ------------------------------------------

DEVICES = ["1", "2", "3", "77", "abc"]
reading_st = st.fixed_dictionaries(
    {"value": st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False)),
     "ts": st.one_of(st.integers(0, 3 * WINDOW), st.floats(0, 3 * WINDOW).map(lambda x: round(x, 2)))},
    optional={"data": st.just({"k": 1})})
event_st = st.tuples(st.sampled_from(DEVICES), st.sampled_from([H, T]), st.lists(reading_st, min_size=1, max_size=6),
                     st.floats(0, 4 * WINDOW))
window_st = st.tuples(st.floats(-10, 3 * WINDOW + 10), st.floats(0, 2 * WINDOW), st.none() | st.sampled_from(DEVICES),
                      st.none() | st.sampled_from([H, T]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event_st, min_size=1, max_size=40), windows=st.lists(window_st, min_size=1, max_size=6),
       bits=st.sampled_from([0, 1, 8]), part=st.integers(0, 7))
def test_a_compacted_store_answers_exactly_as_the_same_readings_uncompacted(events, windows, bits, part) -> None:
    ring = new_ring()
    storage = replace(STORAGE, device_tag_bits=bits)
    # every event has an arrival time of its own, as from a router (readings equal in ts, device, sensor type and
    # arrival are one event's, and keep that event's order)
    evs = [(topic(d, s), readings, rec + i / 1024) for i, (d, s, readings, rec) in enumerate(events)]
    plain, compacted = MemoryBatchStore(), MemoryBatchStore()
    fill(plain, ring, evs, max_readings=5)
    service = ingest(compacted, ring, storage, replace(BATCHING, max_readings=5)).events(evs).flush().service
    comp = compactor(compacted, ring, service)
    pending = compacted.pending_windows(WINDOW, INF)
    for i, (w, g) in enumerate(pending):  # some windows compacted, some twice (more batches folded in), some not
        if (part >> (i % 3)) & 1:
            assert comp.compact(w, g)
    if part == 7:
        comp.run_once()
        assert compacted.batches_by_ts(-INF, INF) == []
    wins = [(a, a + b, d, s) for a, b, d, s in windows]
    assert answers(query(compacted, ring), wins) == answers(query(plain, ring), wins)


late_st = st.lists(st.tuples(st.sampled_from(DEVICES), st.sampled_from([H, T]),
                             st.lists(reading_st, min_size=1, max_size=3), st.floats(0, 4 * WINDOW)), max_size=10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event_st, min_size=1, max_size=30), late=late_st,
       windows=st.lists(window_st, min_size=1, max_size=4), bits=st.sampled_from([0, 1, 8]))
def test_a_rolled_up_store_answers_exactly_as_uncompacted_also_after_late_readings_are_folded_in(
        events, late, windows, bits) -> None:
    ring = new_ring()
    storage = replace(STORAGE, device_tag_bits=bits)
    evs = [(topic(d, s), readings, rec + i / 1024) for i, (d, s, readings, rec) in enumerate(events + late)]
    early, later = evs[:len(events)], evs[len(events):]
    plain, compacted = MemoryBatchStore(), MemoryBatchStore()
    fill(plain, ring, evs, max_readings=5)
    ingested = ingest(compacted, ring, storage, replace(BATCHING, max_readings=5)).events(early).flush()
    comp = compactor(compacted, ring, ingested.service)
    comp.run_once()  # every window compacted, then each group's segments of the day merged (the clock is far on)
    groups = {s.group for s in compacted.batches_by_ts(-INF, INF, SEGMENT)}
    assert len(compacted.batches_by_ts(-INF, INF, SEGMENT)) == len(groups)
    ingest(compacted, ring, storage, replace(BATCHING, max_readings=5)).events(later).flush()
    comp.run_once()
    assert compacted.batches_by_ts(-INF, INF) == []
    wins = [(a, a + b, d, s) for a, b, d, s in windows]
    assert answers(query(compacted, ring), wins) == answers(query(plain, ring), wins)


def sparse_year(devices: list[str], days: int = 365) -> list[tuple[str, Any, float]]:
    """One reading a day per device (each in an hour of its own), for ``days`` days from day 1."""
    return [(topic(d, H), {"value": float(i), "ts": (1 + day) * DAY_S + (i * 7 % 24) * 3600.0 + 60.0}, 1e9 + day)
            for day in range(days) for i, d in enumerate(devices)]


def test_a_sparse_devices_year_is_rolled_up_into_a_few_segments_and_answers_the_same(tmp_path) -> None:
    ring = new_ring()
    store, plain = SqliteBatchStore(tmp_path / "s.sqlite3"), MemoryBatchStore()
    evs = sparse_year(["1", "2", "3"])
    fill(plain, ring, evs)
    service = fill(store, ring, evs).service
    report = compactor(store, ring, service, segment_seconds=3600).run_once()
    groups = {service.index.group(d) for d in ("1", "2", "3")}
    assert report.windows == 365 * len(groups) and report.rollups > 0 and not report.left_in_place
    segments = store.batches_by_ts(-INF, INF, SEGMENT)
    # the year lies in two 360-day windows, so each group keeps two segments (at most three: one window's
    # readings may stay in its days when its 30-day windows straddle it; never one per day)
    for g in groups:
        mine = [s for s in segments if s.group == g]
        assert 2 <= len(mine) <= 3, [(s.lo, s.hi) for s in mine]
        assert all(int(s.lo // ROLLUPS[-1]) == int(s.hi // ROLLUPS[-1]) for s in mine)
    assert sum(s.count for s in segments) == 3 * 365
    q, ref = query(store, ring), query(plain, ring)
    for start, end in ((0, 400 * DAY_S), (10 * DAY_S, 10 * DAY_S + 7200), (359 * DAY_S, 362 * DAY_S)):
        assert q.fetch_between_window(start, end, device_id="2") == ref.fetch_between_window(start, end, device_id="2")
        assert q.fetch_between_window(start, end) == ref.fetch_between_window(start, end)
    assert compactor(store, ring, service, segment_seconds=3600).run_once().rollups == 0  # nothing left to do


def test_a_rollup_waits_for_its_window_to_close_and_leaves_windows_of_more_than_its_readings(
        tmp_path, monkeypatch) -> None:
    ring, store = new_ring(), SqliteBatchStore(tmp_path / "s.sqlite3")
    service = fill(store, ring, sparse_year(["1"], days=3)).service
    now = [2 * DAY_S + 12 * 3600.0]  # day 1 has ended, day 2 is half over, day 3 to come
    comp = Compactor(store, lambda: ring, lambda: service.index, 3600, 0.0, clock=lambda: now[0], rollups=(DAY_S,))
    report = comp.run_once()
    assert report.windows == 2 and report.rollups == 0  # one reading per day: a day of one segment needs nothing
    fill(store, ring, [(topic("1", H), {"value": 5.0, "ts": 2 * DAY_S + 5 * 3600.0}, 2e9),
                       (topic("1", H), {"value": 6.0, "ts": 1 * DAY_S + 7 * 3600.0 + 5}, 2e9)])
    report = comp.run_once()
    assert report.windows == 2 and report.rollups == 1  # day 1 (closed) is merged; day 2 waits until it ends
    days = sorted(int(s.lo // DAY_S) for s in store.batches_by_ts(-INF, INF, SEGMENT))
    assert days == [1, 2, 2]
    now[0] = 4 * DAY_S
    assert comp.run_once().rollups == 1  # remembered since the pass that wrote into it
    assert sorted(int(s.lo // DAY_S) for s in store.batches_by_ts(-INF, INF, SEGMENT)) == [1, 2, 3]
    monkeypatch.setattr(compactor_module, "ROLLUP_READINGS", 1)
    fill(store, ring, [(topic("1", H), {"value": 7.0, "ts": 3 * DAY_S + 13 * 3600.0}, 3e9)])
    assert comp.run_once().rollups == 0  # two readings are more than the limit: day 3 stays in two hours
    assert len(store.batches_by_ts(3 * DAY_S, 4 * DAY_S - 1, SEGMENT)) == 2


def test_with_retention_only_windows_of_at_most_a_tenth_of_it_are_rolled_up() -> None:
    store, ring = MemoryBatchStore(), new_ring()
    index: Any = None
    assert Compactor(store, lambda: ring, lambda: index, 3600, 0.0, retention_s=0.0)._rollups == ROLLUPS
    assert Compactor(store, lambda: ring, lambda: index, 3600, 0.0, retention_s=365 * DAY_S)._rollups == ROLLUPS[:2]
    assert Compactor(store, lambda: ring, lambda: index, 3600, 0.0, retention_s=7 * DAY_S)._rollups == ()


def test_compaction_leaves_one_sealed_segment_per_window_and_group_and_a_second_pass_folds_late_batches() -> None:
    ring, store = new_ring(), MemoryBatchStore()
    evs = [(topic(d, H), [{"value": i, "ts": 10.0 * i} for i in range(100)], 5000.0) for d in DEVICES]
    service = fill(store, ring, evs, max_readings=20).service
    groups = {service.index.group(d) for d in DEVICES}
    assert {b.group for b in store.batches_by_ts(-INF, INF)} == groups  # one open batch per group, not per fleet
    report = compactor(store, ring, service, rollups=()).run_once()
    segments = store.batches_by_ts(-INF, INF, SEGMENT)
    assert report.windows == len(groups) and not report.left_in_place  # batches reach into window 1
    assert sorted((s.bucket, s.group) for s in segments) == sorted({(w, g) for w in (0, 1) for g in groups})
    assert all(s.fmt == SEGMENT_FORMAT for s in segments) and sum(s.count for s in segments) == 500
    late = [(topic("1", H), {"value": 9.5, "ts": 15.0}, 6000.0)]
    fill(store, ring, late)
    assert compactor(store, ring, service, rollups=()).run_once().windows == 1
    assert len(store.batches_by_ts(-INF, INF, SEGMENT)) == len(segments)  # folded into the window's segment
    assert store.batches_by_ts(-INF, INF) == []
    assert query(store, ring).fetch_between_window(14, 16, device_id="1") == [
        {"device_id": "1", "sensor_type": H, "value": 9.5, "ts": 15.0, "received_at": 6000.0}]


class CountingRing:
    """A key ring that counts the records it opens."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring, self.opened = ring, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ring, name)

    def open(self, *args: Any) -> bytes:
        self.opened += 1
        return self.ring.open(*args)


def test_a_one_device_query_opens_only_its_group(tmp_path) -> None:
    ring, store = new_ring(), SqliteBatchStore(tmp_path / "s.sqlite3")
    evs = [(topic(str(d), H), {"value": d, "ts": 100.0}, 200.0) for d in range(300)]
    service = fill(store, ring, evs).service
    compactor(store, ring, service).run_once()
    fill(store, ring, [(topic(str(d), H), {"value": d, "ts": 2000.0}, 2001.0) for d in range(300)])
    spy = CountingRing(ring)
    answer = QueryService(QUERY, store, lambda: spy).fetch_between_window(0, 3000, device_id="7")  # type: ignore
    assert [r["ts"] for r in answer] == [100.0, 2000.0]
    assert spy.opened == 2  # its group's segment and its group's batch: none of the other 255 groups


def test_a_record_that_fails_to_open_is_left_in_place_logged_and_the_others_are_compacted(caplog) -> None:
    ring, store = new_ring(), MemoryBatchStore()
    service = fill(store, ring, [(topic("1", H), [{"value": i, "ts": float(i)} for i in range(k, k + 10)], 100.0)
                                 for k in (0, 10, 20)], max_readings=10).service
    victim = store.batches_by_ts(-INF, INF)[0]
    broken = replace(victim, body=victim.body[:-1] + bytes([victim.body[-1] ^ 1]))
    store._records[BATCH][victim.uid] = broken
    report = compactor(store, ring, service).run_once()
    assert report.left_in_place == [victim.uid] and report.windows == 1
    assert store.batches_by_ts(-INF, INF) == [broken]
    assert victim.uid in caplog.text and "leaves a record in place" in caplog.text
    assert compactor(store, ring, service).run_once().windows == 0  # and it is not retried in a loop
    assert len(query(store, ring).fetch_between_window(10, 100, device_id="1", sensor_type=H)) == 20


def test_each_storage_shard_compacts_only_its_own_groups() -> None:
    ring, store = new_ring(), MemoryBatchStore()
    service = fill(store, ring, [(topic(str(d), H), {"value": d, "ts": 1.0}, 2.0) for d in range(40)]).service
    groups = {b.group for b in store.batches_by_ts(-INF, INF)}
    compactor(store, ring, service, shard=0, shards=2).run_once()
    assert {b.group for b in store.batches_by_ts(-INF, INF)} == {g for g in groups if g % 2 == 1}
    compactor(store, ring, service, shard=1, shards=2).run_once()
    assert store.batches_by_ts(-INF, INF) == []


def test_rekey_reseals_segments_and_device_rows_and_keeps_the_index_key(caplog) -> None:
    import os

    from components.core import rekey

    ring, store = new_ring(), MemoryBatchStore()
    evs = [(topic(d, H), [{"value": i, "ts": 100.0 * i, "seq": i + 1} for i in range(20)], 5000.0) for d in DEVICES]
    service = fill(store, ring, evs, max_readings=7).service
    compactor(store, ring, service).run_once()
    fill(store, ring, [(topic("1", T), {"value": 1, "ts": 5.0}, 5001.0)])
    kinds = {kind for kind, _ in store.records()}
    assert {"batch", "segment", "state"} <= kinds
    before = answers(query(store, ring), [(0, 2000, "1", None)])
    new_key = os.urandom(32)
    rotated = KeyRing.of([new_key, *ring.keys.values()], ring.index_key)
    caplog.set_level("INFO")
    old_interval, rekey.PROGRESS_EVERY_S = rekey.PROGRESS_EVERY_S, 0.0
    try:
        assert rekey.rekey_ring(store, rotated).resealed == len(list(store.records()))
    finally:
        rekey.PROGRESS_EVERY_S = old_interval
    assert "re-sealed so far" in caplog.text
    assert {r.key_id for _, r in store.records()} == {rotated.active_id}
    only_new = KeyRing.of([new_key], ring.index_key)
    assert answers(query(store, only_new), [(0, 2000, "1", None)]) == before


# -- device rows -------------------------------------------------------------------------------------------

def test_a_commit_writes_the_rows_of_the_devices_in_it_only() -> None:
    ring, store = new_ring(), MemoryBatchStore()
    fill(store, ring, [(topic(str(d), H), {"value": d, "ts": 1.0, "seq": 1}, 2.0) for d in range(50)])
    written: list[list[str]] = []
    real = store.commit

    def spy(batches, states):
        written.append([s.name for s in states])
        return real(batches, states)

    store.commit = spy  # type: ignore[method-assign]
    again = fill(store, ring, [(topic("7", H), {"value": 1, "ts": 2.0, "seq": 2}, 3.0)])
    rows = [n for names in written for n in names if n.startswith("device/")]
    assert len(rows) == 1 and again.acks[-1] == {("7", None): 2}
    assert query(store, ring).list_devices(device_id="7")[0]["count"] == 2


def test_storage_keeps_a_bounded_cache_of_devices_and_reads_a_row_back_when_a_device_returns() -> None:
    ring, store = new_ring(), MemoryBatchStore()
    storage = replace(STORAGE, device_cache=10)
    ing = ingest(store, ring, storage)
    ing.events([(topic(str(d), H), {"value": d, "ts": 1.0, "seq": 1}, 2.0) for d in range(100)])
    ing.service.tick()
    ing.flush()
    ing = ingest(store, ring, storage)
    ing.events([(topic("5", H), [{"value": 0, "ts": 1.0, "seq": 1}, {"value": 1, "ts": 3.0, "seq": 2}], 4.0)])
    ing.service.tick()
    ing.flush()
    assert {("5", None): 2} in ing.acks  # seq 1 was known from the row: a duplicate, acknowledged again
    assert [r["value"] for r in query(store, ring).fetch_all(device_id="5")] == [5, 1]
    assert ing.service.counters.duplicates == 1


# -- a store of the previous version ------------------------------------------------------------------------

@pytest.fixture
def v1_store(tmp_path) -> tuple[SqliteBatchStore, KeyFile, dict[str, Any]]:
    for name in ("iot.sqlite3", "keys.json"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    (tmp_path / "keys.json").chmod(0o600)
    expected = json.loads((FIXTURE / "answers.json").read_text())
    for name in ("all", "device_1", "device_43_humidity", "last_window_2"):
        # that version left readings of equal ts in the order it stored them; this one orders them by device,
        # sensor type and arrival, whatever the storage
        expected[name].sort(key=lambda r: (r["ts"], r["device_id"], r["sensor_type"], r["received_at"]))
    return SqliteBatchStore(tmp_path / "iot.sqlite3"), KeyFile(tmp_path / "keys.json"), expected


def v1_answers(q: QueryService) -> dict[str, Any]:
    t0 = 1_700_000_000
    return json.loads(json.dumps({
        "all": q.fetch_between_window(t0, t0 + 3 * 3600),
        "device_1": q.fetch_between_window(t0 + 1800, t0 + 7300, device_id="1"),
        "device_43_humidity": q.fetch_between_window(t0, t0 + 3 * 3600, device_id="43", sensor_type="humidity"),
        "last_window_2": q.fetch_last_window(600, device_id="2"),
        "devices": q.list_devices(),
        "latest": q.get_latest(),
        "max_rel_time": q.get_max_rel_time(),
    }))


def test_a_store_of_the_previous_version_opens_is_compacted_and_answers_as_that_version_did(v1_store) -> None:
    store, keys, expected = v1_store
    table = sqlite3.connect(store.path).execute("SELECT sql FROM sqlite_master WHERE name = 'states'").fetchone()
    assert "WITHOUT ROWID" in table[0]  # its named records were clustered by name on opening
    ring = keys.load()  # the key file gains an index key, which later loads keep
    assert keys.load().index_key == ring.index_key
    assert v1_answers(query(store, ring)) == expected
    ing = ingest(store, ring)  # upgrades the state record into device rows
    ing.flush()
    assert {b.group for b in store.batches_by_ts(-INF, INF)} == {EVERY_GROUP}
    report = compactor(store, ring, ing.service, segment_seconds=3600).run_once()
    assert report.windows == 4 and not report.left_in_place and store.batches_by_ts(-INF, INF) == []  # 3 h, 4 windows
    assert EVERY_GROUP not in {s.group for s in store.batches_by_ts(-INF, INF, SEGMENT)}
    assert v1_answers(query(store, ring)) == expected
    # the seq marks survived the upgrade: a resent reading is a duplicate, the next one is stored
    again = ingest(store, ring)
    again.events([(topic("1", H), [{"value": 1.0, "ts": 1_700_010_740, "seq": 359},
                                   {"value": 2.0, "ts": 1_700_010_800, "seq": 361}], 1_700_010_801.0)])
    again.service.tick()
    again.flush()
    assert again.service.counters.duplicates == 1
    assert query(store, ring).list_devices(device_id="1")[0]["count"] == 361
