"""The query procedures' semantics on a store filled through the real ingest path, on every backend.

Each test fills a fresh store (``any_store``: SQLite and DynamoDB Local) through IngestService and asks
QueryService directly (through the callee's argument decoding where a test goes by procedure URI); the WAMP
and HTTP paths are covered in test_query_wamp.py.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import pytest

from components.core.audit import AuditLog
from components.core.errors import DecryptionFailed, InvalidArgument, TooManyResults
from components.core.query import QueryService
from components.core.rekey import rekey_file, rekey_ring
from components.core.sealing import KeyFile, KeyRing
from components.storage.interface import BatchStore
from components.wamp import uris
from components.wamp.callee import answer
from tests.support.corefill import QUERY, H, T, dataset, fill, new_ring, topic


def service(store: BatchStore, ring: KeyRing, now: float = 6001.0, **query: Any) -> QueryService:
    return QueryService(dataclasses.replace(QUERY, **query), store, lambda: ring, clock=lambda: now)


@pytest.fixture
def filled(any_store: BatchStore) -> tuple[BatchStore, KeyRing]:
    ring = new_ring()
    fill(any_store, ring, dataset(), max_readings=7)
    return any_store, ring


def keys(readings: list[dict]) -> list[tuple[str, str, float]]:
    return [(r["device_id"], r["sensor_type"], r["ts"]) for r in readings]


def test_window_bounds_are_inclusive_and_results_merge_across_batches_in_ts_order(filled) -> None:
    q = service(*filled)
    got = q.fetch_between_window(1003, 1006)
    assert [r["ts"] for r in got] == [1003.0, 1003.0, 1003.0, 1004.0, 1005.0, 1005.0, 1006.0, 1006.0]
    assert {(r["device_id"], r["sensor_type"]) for r in got} == {("1", H), ("1", T), ("2", T)}
    first = got[0]
    assert first == {"device_id": "1", "sensor_type": H, "value": 3.0, "ts": 1003.0, "seq": 4, "received_at": 5000.0}


def test_a_window_starting_and_ending_inside_batches_returns_exactly_its_readings(filled) -> None:
    q = service(*filled)
    got = q.fetch_between_window(1008.5, 1010.0, device_id="2")
    assert [r["ts"] for r in got] == [1009.0, 1010.0]
    assert q.fetch_between_window(1009.5, 1009.6) == []


def test_an_empty_store_answers_empty_lists_and_null(any_store) -> None:
    q = service(any_store, new_ring())
    for procedure, args in [(uris.FETCH_BETWEEN_WINDOW, [0, 1e10]), (uris.FETCH_SINCE, [0]),
                            (uris.FETCH_LAST_N_SEC, [60]), (uris.FETCH_LAST_WINDOW, [5]), (uris.FETCH_ALL, []),
                            (uris.LIST_DEVICES, []), (uris.GET_LATEST, []), (uris.AGGREGATE, [0, 100, 10])]:
        assert answer(q, procedure, args, {}) == [], procedure
    assert q.get_max_rel_time() is None


@pytest.mark.parametrize("procedure,args", [
    (uris.FETCH_BETWEEN_WINDOW, [0, 1e10]), (uris.FETCH_SINCE, [1000]), (uris.FETCH_LAST_N_SEC, [10_000]),
    (uris.FETCH_LAST_WINDOW, [100]), (uris.FETCH_ALL, []),
])
def test_every_fetch_procedure_takes_device_sensor_and_limit_filters(filled, procedure: str, args: list) -> None:
    q = service(*filled)
    everything = answer(q, procedure, args, {})
    assert len(everything) == 23
    assert [r["ts"] for r in everything] == sorted(r["ts"] for r in everything)
    by_device = answer(q, procedure, args, {"device_id": "1"})
    assert len(by_device) == 12 and {r["device_id"] for r in by_device} == {"1"}
    by_sensor = answer(q, procedure, args, {"sensor_type": T})
    assert len(by_sensor) == 12 and {r["sensor_type"] for r in by_sensor} == {T}
    both = answer(q, procedure, args, {"device_id": "1", "sensor_type": T})
    assert keys(both) == [("1", T, 1003.0), ("1", T, 1003.0)]
    limited = answer(q, procedure, args, {"limit": 4})
    assert limited == everything[:4] if procedure != uris.FETCH_LAST_WINDOW else limited == everything[-4:]


def test_fetch_since_and_fetch_all_order_by_ts(filled) -> None:
    q = service(*filled)
    since = q.fetch_since(1013.0)
    assert keys(since) == [("2", T, 1013.0), ("2", T, 1014.0), ("43", H, 2000.25)]
    assert since[-1]["data"] == {"fw": "1.0"}
    assert len(q.fetch_all()) == 23


def test_fetch_last_n_sec_goes_by_arrival_time_on_the_server_clock(filled) -> None:
    q = service(*filled, now=6001.0)
    assert keys(q.fetch_last_n_sec(1)) == [("1", T, 1003.0), ("1", T, 1003.0), ("43", H, 2000.25)]
    assert len(q.fetch_last_n_sec(1001)) == 23
    assert q.fetch_last_n_sec(0) == []


def test_fetch_last_window_returns_the_n_latest_readings_in_ts_order(filled) -> None:
    q = service(*filled)
    assert keys(q.fetch_last_window(3)) == [("2", T, 1013.0), ("2", T, 1014.0), ("43", H, 2000.25)]
    assert keys(q.fetch_last_window(2, device_id="1")) == [("1", H, 1008.0), ("1", H, 1009.0)]
    assert q.fetch_last_window(0) == []


def test_max_rel_time_list_devices_and_latest_summarise_the_store(filled) -> None:
    q = service(*filled)
    assert q.get_max_rel_time() == 2000.25
    assert q.get_max_rel_time(device_id="1") == 1009.0
    assert q.get_max_rel_time(device_id="9") is None
    assert q.list_devices() == [
        {"device_id": "1", "sensor_types": [H, T], "count": 12, "first_ts": 1000.0, "last_ts": 1009.0,
         "last_received_at": 6000.5},
        {"device_id": "2", "sensor_types": [T], "count": 10, "first_ts": 1005.0, "last_ts": 1014.0,
         "last_received_at": 5001.0},
        {"device_id": "43", "sensor_types": [H], "count": 1, "first_ts": 2000.25, "last_ts": 2000.25,
         "last_received_at": 6000.0},
    ]
    latest = q.get_latest()
    assert [(r["device_id"], r["sensor_type"], r["ts"], r["value"]) for r in latest] == [
        ("1", H, 1009.0, 9.0), ("1", T, 1003.0, -1.0), ("2", T, 1014.0, 109.0), ("43", H, 2000.25, 7.5)]
    assert latest[0]["seq"] == 10 and latest[3]["data"] == {"fw": "1.0"}


def test_aggregate_gives_count_min_max_mean_per_bucket_device_and_sensor(filled) -> None:
    q = service(*filled)
    rows = q.aggregate(1000, 1009.999, 5)
    assert rows == [
        {"bucket_start": 1000.0, "device_id": "1", "sensor_type": H, "count": 5, "min": 0.0, "max": 4.0, "mean": 2.0},
        {"bucket_start": 1000.0, "device_id": "1", "sensor_type": T, "count": 2, "min": -2.0, "max": -1.0,
         "mean": -1.5},
        {"bucket_start": 1005.0, "device_id": "1", "sensor_type": H, "count": 5, "min": 5.0, "max": 9.0, "mean": 7.0},
        {"bucket_start": 1005.0, "device_id": "2", "sensor_type": T, "count": 5, "min": 100.0, "max": 104.0,
         "mean": 102.0},
    ]
    assert q.aggregate(1000, 1010, 100, device_id="2")[0]["count"] == 6


@pytest.mark.parametrize("procedure,args,kwargs,message", [
    (uris.FETCH_BETWEEN_WINDOW, ["a", 5], {}, "start must be a number"),
    (uris.FETCH_BETWEEN_WINDOW, [5, None], {}, "end must be a number"),
    (uris.FETCH_BETWEEN_WINDOW, [9, 5], {}, "start (9.0) is after end (5.0)"),
    (uris.FETCH_BETWEEN_WINDOW, [float("nan"), 5], {}, "start must be a finite number"),
    (uris.FETCH_BETWEEN_WINDOW, [1, float("inf")], {}, "end must be a finite number"),
    (uris.FETCH_BETWEEN_WINDOW, [1], {}, "fetch_between_window takes 2 argument(s) (start, end), got 1"),
    (uris.FETCH_BETWEEN_WINDOW, [1, 2], {"device": "1"}, "has no keyword argument 'device'"),
    (uris.FETCH_BETWEEN_WINDOW, [1, 2], {"device_id": "No!"}, "device_id must match"),
    (uris.FETCH_BETWEEN_WINDOW, [1, 2], {"limit": -1}, "limit must be a non-negative integer"),
    (uris.FETCH_BETWEEN_WINDOW, [True, 2], {}, "start must be a number"),
    (uris.FETCH_LAST_N_SEC, [-5], {}, "n must be a non-negative integer, got -5"),
    (uris.FETCH_LAST_N_SEC, [2.5], {}, "n must be a non-negative integer, got 2.5"),
    (uris.FETCH_LAST_WINDOW, ["10"], {}, "n must be a non-negative integer"),
    (uris.FETCH_SINCE, [], {}, "fetch_since takes 1 argument(s)"),
    (uris.FETCH_ALL, [1], {}, "fetch_all takes 0 argument(s)"),
    (uris.AGGREGATE, [0, 10, 0], {}, "bucket must be a positive number of seconds"),
    (uris.AGGREGATE, [0, 10, 5], {"limit": 3}, "has no keyword argument 'limit'"),
    (uris.GET_MAX_REL_TIME, [], {"limit": 1}, "has no keyword argument 'limit'"),
    (uris.GET_STATS, [], {"x": 1}, "has no keyword argument 'x'"),
])
def test_a_bad_argument_gets_invalid_argument_naming_it(filled, procedure, args, kwargs, message) -> None:
    q = service(*filled)
    with pytest.raises(InvalidArgument) as err:
        answer(q, procedure, args, kwargs)
    assert message in str(err.value)
    assert uris.error_uri(err.value) == uris.ERROR_INVALID_ARGUMENT


def test_arguments_may_also_be_given_by_name(filled) -> None:
    q = service(*filled)
    assert q.fetch_between_window(start=1003, end=1003) == \
        q.fetch_between_window(1003, 1003)


def test_an_answer_over_the_maximum_is_refused_never_truncated(filled) -> None:
    q = service(*filled, max_results=5)
    with pytest.raises(TooManyResults, match=r"more than query.max_results \(5\).*limit=.*progressive"):
        q.fetch_all()
    with pytest.raises(TooManyResults):
        q.fetch_last_window(6)
    assert len(q.fetch_all(limit=5)) == 5
    assert len(q.fetch_between_window(1000, 1002)) == 3


def test_progressive_results_stream_every_reading_in_chunks(filled) -> None:
    store, ring = filled
    full = service(store, ring).fetch_all()
    q = service(store, ring, max_results=5, chunk_size=4)
    chunks = list(q.fetch_all(progressive=True))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 3]
    assert [r for c in chunks for r in c] == full
    limited = list(q.fetch_since(0, limit=6, progressive=True))
    assert [len(c) for c in limited] == [4, 2]


def test_a_tampered_batch_fails_naming_it_while_other_batches_still_read(any_store) -> None:
    ring = new_ring()
    fill(any_store, ring, [(topic("1", H), {"value": 1.0, "ts": 100.0}, 10.0)])
    fill(any_store, ring, [(topic("1", H), {"value": 2.0, "ts": 200.0}, 20.0)])
    (victim,) = any_store.batches_by_ts(150, 250)
    body = bytearray(victim.body)
    body[20] ^= 0x01
    assert any_store.replace("batch", victim, dataclasses.replace(victim, body=bytes(body)))
    q = service(any_store, ring)
    assert [r["value"] for r in q.fetch_between_window(0, 150)] == [1.0]
    with pytest.raises(DecryptionFailed, match=f"batch {victim.uid} failed its integrity check") as err:
        q.fetch_between_window(0, 300)
    assert uris.error_uri(err.value) == uris.ERROR_DECRYPTION_FAILED


def test_the_wrong_key_gives_a_clear_error_not_garbage(filled) -> None:
    store, _ = filled
    q = service(store, new_ring())
    with pytest.raises(DecryptionFailed, match="which is not among the configured keys"):
        q.fetch_all()


def test_rekey_leaves_every_reading_readable_under_the_new_key_only(any_store, tmp_path) -> None:
    key_file = KeyFile(tmp_path / "keys.json")
    old_ring = key_file.load()
    fill(any_store, old_ring, dataset(), max_readings=7)
    audit = AuditLog(any_store, lambda: old_ring, "test", 100)
    audit.record("alice", "admin", uris.FETCH_ALL, [], {}, 23)
    audit.flush()
    before = service(any_store, old_ring).fetch_all()

    report = rekey_file(any_store, key_file, grace_s=0)
    new_ring_ = key_file.load()
    assert list(new_ring_.keys) == [report.active_key] and report.active_key != old_ring.active_id
    assert report.dropped_keys == (old_ring.active_id,)
    assert {r.key_id for _, r in any_store.records()} == {report.active_key}
    assert service(any_store, new_ring_).fetch_all() == before
    assert service(any_store, new_ring_).list_devices()[0]["count"] == 12
    assert AuditLog(any_store, lambda: new_ring_, "t", 100).read()[0]["authid"] == "alice"
    with pytest.raises(DecryptionFailed):
        service(any_store, old_ring).fetch_all()
    # running it again is harmless: a fresh rotation, everything still readable
    rekey_file(any_store, key_file, grace_s=0)
    assert service(any_store, key_file.load()).fetch_all() == before


def test_an_interrupted_rekey_resumes_where_it_stopped(any_store, tmp_path) -> None:
    from components.core.rekey import reseal_all
    from components.core.sealing import key_id

    key_file = KeyFile(tmp_path / "keys.json")
    old = key_file.load()
    fill(any_store, old, dataset(), max_readings=7)
    new_key = os.urandom(32)
    ring = old.rotated(key_id(new_key), {key_id(new_key): new_key, **old.keys})
    key_file.save(ring)
    done = []
    reseal_all(any_store, ring, stop=lambda: len(done.append(1) or done) > 2)  # interrupted after two records
    assert len({r.key_id for _, r in any_store.records()}) == 2
    report = rekey_file(any_store, key_file, grace_s=0)
    assert report.resumed and report.active_key == ring.active_id
    assert {r.key_id for _, r in any_store.records()} == {ring.active_id}
    assert len(service(any_store, key_file.load()).fetch_all()) == 23


def test_rekey_with_keys_from_the_environment_reseals_under_the_first_key(filled) -> None:
    store, old = filled
    new_key = os.urandom(32)
    ring = KeyRing.of([new_key, *old.keys.values()], old.index_key)
    assert rekey_ring(store, ring).resealed > 0
    only_new = KeyRing.of([new_key], old.index_key)
    assert len(service(store, only_new).fetch_all()) == 23


def test_the_audit_log_records_calls_and_reads_back_since_a_time(any_store) -> None:
    ring = new_ring()
    clock = iter([100.0, 200.0, 300.0])
    audit = AuditLog(any_store, lambda: ring, "callee-a", 100, clock=lambda: next(clock))
    audit.record("dashboard", "reader", uris.FETCH_ALL, [], {"device_id": "1"}, 12)
    audit.record("dashboard", "reader", uris.FETCH_BETWEEN_WINDOW, [1, 0], {}, None, uris.ERROR_INVALID_ARGUMENT)
    assert audit.flush() == 2
    audit.record("admin", "admin", uris.GET_AUDIT, [], {}, 2)  # not yet flushed: still visible here
    entries = audit.read()
    assert [(e["time"], e["authid"], e["procedure"], e["rows"], e["error"]) for e in entries] == [
        (100.0, "dashboard", uris.FETCH_ALL, 12, None),
        (200.0, "dashboard", uris.FETCH_BETWEEN_WINDOW, None, uris.ERROR_INVALID_ARGUMENT),
        (300.0, "admin", uris.GET_AUDIT, 2, None)]
    assert entries[0]["kwargs"] == {"device_id": "1"} and entries[0]["served_by"] == "callee-a"
    assert [e["time"] for e in audit.read(250)] == [300.0]
    assert [e["time"] for e in audit.read(since=150, limit=1)] == [300.0]



class _TornCommits:
    """A store whose commits are not one transaction (as on DynamoDB): storage then replays what it finds."""

    atomic_commit = False

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def test_batches_committed_after_the_last_state_record_are_not_stored_twice_after_a_restart(any_store) -> None:
    # a backend that commits batches and state in two writes (DynamoDB) can lose the second in a crash
    any_store = _TornCommits(any_store)
    from components.core.batches import OpenBatch, seal_batch
    from components.core.readings import validate_event
    from tests.support.corefill import ingest

    ring = new_ring()
    t = topic("7", H)
    fill(any_store, ring, [(t, [{"value": 1.0, "ts": 10.0, "seq": 1}, {"value": 2.0, "ts": 11.0, "seq": 2}], 1.0)])
    orphan = OpenBatch(0, 0.0)
    cols, _ = validate_event("7", H, [{"value": 3.0, "ts": 12.0, "seq": 3}, {"value": 4.0, "ts": 13.0, "seq": 4}])
    orphan.add("7", H, time.time(), cols)
    any_store.commit([seal_batch(ring, orphan)], [])  # the batch landed, its state update did not
    again = ingest(any_store, ring)
    # the device never saw an ack for 3 and 4: it sends them again, then 5
    again.service.ingest("7", H, [{"value": 3.0, "ts": 12.0, "seq": 3}, {"value": 4.0, "ts": 13.0, "seq": 4},
                                   {"value": 5.0, "ts": 14.0, "seq": 5}], 2.0)
    assert again.service.tick() == {("7", None): 4}  # the resent ones are known: acknowledged again at once
    again.flush()
    readings = service(any_store, ring).fetch_all()
    assert [r["seq"] for r in readings] == [1, 2, 3, 4, 5]
    assert service(any_store, ring).list_devices()[0]["count"] == 5
