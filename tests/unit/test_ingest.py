"""The ingest service on a real SQLite file: batching limits, backpressure, de-duplication, bad input."""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from pathlib import Path

import pytest

from components.core import readings as rd
from components.core.batches import OpenBatch, open_groups, seal_batch, split_batch
from components.core.ingest import shard_of
from components.core.query import QueryService
from components.core.readings import Columns
from components.storage.sqlite import SqliteBatchStore
from components.wamp import uris
from components.wamp.subscriber import deliver
from tests.support.corefill import BATCHING, QUERY, STORAGE, fill, ingest, new_ring

H = "humidity"


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteBatchStore(tmp_path / "iot.sqlite3")
    yield s
    s.close()


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def reading(i: int, seq: bool = True, **extra) -> dict:
    r = {"value": float(i), "ts": 500.0 + i, **extra}
    if seq:
        r["seq"] = i
    return r


def stored(store, ring) -> list[dict]:
    return QueryService(QUERY, store, lambda: ring).fetch_all()


def batch_sizes(store) -> list[int]:
    return sorted(b.count for b in store.batches_by_ts(float("-inf"), float("inf")))


def test_a_batch_closes_at_the_readings_limit(store) -> None:
    ring = new_ring()
    ing = ingest(store, ring, batching=dataclasses.replace(BATCHING, max_readings=5))
    for i in range(1, 13):
        ing.service.ingest("1", H, reading(i), 1.0)
    ing.flush()
    assert batch_sizes(store) == [2, 5, 5]
    assert [r["seq"] for r in stored(store, ring)] == list(range(1, 13))


def test_a_batch_closes_at_the_bytes_limit(store) -> None:
    ring = new_ring()
    ing = ingest(store, ring, batching=dataclasses.replace(BATCHING, max_bytes=4096))
    for i in range(1, 5):
        ing.service.ingest("1", H, reading(i, data={"blob": "x" * 1500}), 1.0)
    ing.flush()
    assert batch_sizes(store) == [1, 3]


def test_a_batch_closes_at_the_age_limit(store) -> None:
    ring = new_ring()
    clock = Clock()
    ing = ingest(store, ring, batching=dataclasses.replace(BATCHING, max_age_s=1.0), clock=clock)
    ing.service.ingest("1", H, reading(1), 1.0)
    clock.t += 0.5
    ing.service.tick()
    ing.service.ingest("1", H, reading(2), 1.0)
    clock.t += 0.6
    ing.service.tick()  # the batch opened 1.1 s ago: closes with both readings
    ing.service.ingest("1", H, reading(3), 1.0)
    ing.flush()
    assert batch_sizes(store) == [1, 2]


class SlowStore:
    """A real SQLite store whose commits wait for a go-ahead (a disk that cannot keep up)."""

    def __init__(self, inner: SqliteBatchStore) -> None:
        self.inner = inner
        self.go = threading.Event()
        self.max_body_bytes = None

    def commit(self, batches, state):
        assert self.go.wait(30)
        return self.inner.commit(batches, state)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_when_the_writer_is_behind_readings_are_shed_counted_and_not_acknowledged(store) -> None:
    ring = new_ring()
    slow = SlowStore(store)
    ing = ingest(slow, ring, storage=dataclasses.replace(STORAGE, writer_queue=2),
                 batching=dataclasses.replace(BATCHING, max_readings=10))
    svc = ing.service
    seq = 0
    for _ in range(100):  # 100 events of 10 readings, far more than 1 batch in the writer + 2 queued + 1 held
        svc.ingest("1", H, [reading(seq + k + 1) for k in range(10)], 1.0)
        seq += 10
    stats = svc.stats()
    assert stats["shed"] > 0 and stats["received"] == 1000
    assert svc.queue_depth() <= 3  # bounded: two queued plus the one held back
    slow.go.set()
    ing.flush()
    readings_stored = stored(store, ring)
    # what was not shed is stored, in order, once; the device's seq stops at the first shed reading
    assert len(readings_stored) == 1000 - svc.stats()["shed"] - svc.stats()["out_of_order"]
    assert [r["seq"] for r in readings_stored] == list(range(1, len(readings_stored) + 1))
    assert max(a[("1", None)] for a in ing.acks) == len(readings_stored)


def test_duplicates_gaps_and_refused_readings_follow_the_seq_rules(store) -> None:
    ring = new_ring()
    ing = ingest(store, ring)
    svc = ing.service
    svc.ingest("7", H, [reading(1), reading(2), reading(3)], 1.0)
    svc.ingest("7", H, [reading(2), reading(3)], 1.0)  # duplicates
    svc.ingest("7", H, [reading(6)], 1.0)  # a gap: 4 and 5 missing
    svc.ingest("7", H, [reading(4, value="bad")], 1.0)  # refused, but uses up seq 4
    svc.ingest("7", H, [reading(5), reading(6)], 1.0)
    ing.flush()
    assert [r["seq"] for r in stored(store, ring)] == [1, 2, 3, 5, 6]
    stats = svc.stats()
    assert stats["duplicates"] == 2 and stats["out_of_order"] == 1
    assert stats["rejected"] == {rd.VALUE_NOT_NUMBER: 1}
    assert ing.acks[-1] == {("7", None): 6}


def test_a_device_must_start_its_seq_at_one(store) -> None:
    ring = new_ring()
    ing = ingest(store, ring)
    ing.service.ingest("8", H, [reading(5)], 1.0)
    ing.flush()
    assert stored(store, ring) == [] and ing.service.stats()["out_of_order"] == 1


def test_de_duplication_survives_a_restart_and_resent_duplicates_are_acknowledged(store) -> None:
    ring = new_ring()
    t = uris.sensor_topic("7", H)
    fill(store, ring, [(t, [reading(1), reading(2)], 1.0)])
    again = ingest(store, ring)
    again.service.ingest("7", H, [reading(1), reading(2), reading(3)], 2.0)
    assert again.service.tick() == {("7", None): 2}  # re-ack of what was committed before the restart
    again.flush()
    assert [r["seq"] for r in stored(store, ring)] == [1, 2, 3]
    assert again.acks[-1] == {("7", None): 3}


def test_a_device_that_lost_its_spool_starts_a_new_epoch_and_loses_nothing(store) -> None:
    ring = new_ring()
    t = uris.sensor_topic("7", H)
    old = [{"value": float(i), "ts": 500.0 + i, "seq": i} for i in range(1, 101)]
    fill(store, ring, [(t, old, 1.0)])  # a device without epoch (an older version), seq 1..100
    again = ingest(store, ring)
    new = [{"value": -float(i), "ts": 900.0 + i, "seq": i} for i in range(1, 11)]  # re-flashed: seq from 1
    again.service.ingest("7", H, new, 2.0, epoch="e2")
    assert again.service.tick() == {}  # not taken for duplicates of the old sequence
    again.flush()
    got = stored(store, ring)
    assert len(got) == 110 and sorted(r["ts"] for r in got) == sorted(r["ts"] for r in old + new)
    assert again.acks[-1] == {("7", "e2"): 10}  # the ack names the new epoch

    third = ingest(store, ring)  # after a restart: both sequences are known
    third.service.ingest("7", H, new[5:], 3.0, epoch="e2")  # late resends of each epoch: duplicates
    third.service.ingest("7", H, old[90:], 3.0)
    assert third.service.tick() == {("7", "e2"): 10, ("7", None): 100}
    newer = [{"value": 1.5, "ts": 990.0 + i, "seq": i} for i in range(1, 4)]
    third.service.ingest("7", H, newer, 3.0, epoch="e3")  # and a third spool
    third.flush()
    assert len(stored(store, ring)) == 113
    assert third.service.stats()["duplicates"] == 15
    assert third.acks[-1] == {("7", "e3"): 3}


def test_an_event_with_a_malformed_epoch_is_refused_and_counted(store) -> None:
    ring = new_ring()
    ing = ingest(store, ring)
    ing.service.ingest("7", H, [reading(1), reading(2)], 1.0, epoch="Not Valid!")
    ing.service.ingest("7", H, [reading(1)], 1.0, epoch=["e"])
    ing.service.ingest("8", H, [reading(1)], 1.0, epoch="ok")
    ing.flush()
    assert [r["device_id"] for r in stored(store, ring)] == ["8"]
    assert ing.service.stats()["rejected"] == {rd.BAD_EPOCH: 3}


def test_readings_without_seq_are_stored_as_they_come(store) -> None:
    ring = new_ring()
    t = uris.sensor_topic("7", H)
    fill(store, ring, [(t, [reading(1, seq=False), reading(1, seq=False)], 1.0)])
    assert len(stored(store, ring)) == 2


def test_bad_input_is_counted_by_reason_and_spoils_nothing_else(store, caplog) -> None:
    ring = new_ring()
    clock = Clock()
    ing = ingest(store, ring, clock=clock)
    svc = ing.service
    good = {"value": 1.0, "ts": 10.0}
    svc.ingest("7", H, [good, {"value": "x", "ts": 1.0}, {"ts": 2.0}, 5, good], 1.0)
    svc.ingest("7", H, {**good, "device_id": "8"}, 1.0)
    deliver(svc, "iot.sensor.Bad-Id.humidity", good, 1.0)
    deliver(svc, "iot.sensor.7", good, 1.0)
    svc.ingest("7", H, None, 1.0)
    svc.ingest("7", H, [], 1.0)
    with caplog.at_level(logging.WARNING, logger="components.core.ingest"):
        for _ in range(50):  # many more refusals within the same second: still one log line per interval
            svc.ingest("7", H, {"value": float("nan"), "ts": 1.0}, 1.0)
            svc.tick()
        clock.t += 1.5
        svc.tick()
    ing.flush()
    assert len(stored(store, ring)) == 2
    assert svc.stats()["rejected"] == {rd.VALUE_NOT_NUMBER: 1, rd.VALUE_MISSING: 1, rd.NOT_AN_OBJECT: 2,
                                       rd.DEVICE_ID_MISMATCH: 1, rd.BAD_TOPIC: 2, rd.EMPTY_EVENT: 1,
                                       rd.VALUE_NOT_FINITE: 50}
    refusal_logs = [r for r in caplog.records if "refused readings" in r.getMessage()]
    assert len(refusal_logs) == 2, [r.getMessage() for r in refusal_logs]


def test_shards_store_disjoint_device_sets(tmp_path: Path) -> None:
    ring = new_ring()
    devices = [str(i) for i in range(51)]
    stores = [SqliteBatchStore(tmp_path / f"s{i}.sqlite3") for i in range(2)]
    for i, s in enumerate(stores):
        fill(s, ring, [(uris.sensor_topic(d, H), reading(1), 1.0) for d in devices], shard=i, shards=2)
    sets = [{r["device_id"] for r in stored(s, ring)} for s in stores]
    assert sets[0] | sets[1] == set(devices) and not sets[0] & sets[1]
    assert sets[1] == {d for d in devices if shard_of(d, 2) == 1}


def test_device_ids_values_and_data_are_only_inside_the_ciphertext(store, tmp_path: Path) -> None:
    ring = new_ring()
    value = 12345.6789
    fill(store, ring, [(uris.sensor_topic("zz_marker_device", H),
                        {"value": value, "ts": 77.0, "seq": 1, "data": {"note": "marker-freeform-XYZ"}}, 1.0)])
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("iot.sqlite3*"))
    assert len(raw) > 0
    for needle in (b"zz_marker_device", b"marker-freeform-XYZ", str(value).encode(), struct.pack(">d", value),
                   struct.pack("<d", value), b"humidity"):
        assert needle not in raw, needle


def test_a_large_batch_is_cut_to_the_backend_record_limit_before_sealing() -> None:
    ring = new_ring()
    batch = OpenBatch(0, 0.0)
    for d in range(30):
        n = 40
        cols = Columns([float(i) for i in range(n)], [1.0] * n, [None] * n, [{"x": "y" * 200}] * n, 210 * n)
        batch.add(str(d), H, 1.0, cols)
    parts = split_batch(batch, 64 * 1024)
    assert len(parts) > 1 and sum(p.count for p in parts) == batch.count
    for part in parts:
        sealed = seal_batch(ring, part)
        assert len(sealed.body) <= 64 * 1024
        assert sum(len(g[3]) for g in open_groups(ring, sealed)) == part.count
    assert split_batch(batch, None) == [batch]


def test_integer_timestamps_and_values_come_back_unchanged(store) -> None:
    # JSON clients send 1500052521, not 1500052521.0; the store may hand bounds back as floats
    ring = new_ring()
    fill(store, ring, [(uris.sensor_topic("14", H), {"value": 99, "ts": 1500052521}, 1.0)])
    (got,) = stored(store, ring)
    assert got["ts"] == 1500052521 and type(got["ts"]) is int
    assert got["value"] == 99 and type(got["value"]) is int
