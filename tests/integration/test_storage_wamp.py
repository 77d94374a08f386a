"""The storage subscriber as a real process behind the real router, writing real SQLite files."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import PublishOptions
from twisted.internet import reactor, threads

from components.core.batches import open_state
from components.core.sealing import KeyFile
from components.storage.sqlite import SqliteBatchStore
from components.wamp import uris
from devices.fleet import SimulationPlan, simulate
from devices.simulator import SensorSeries
from tests.support.harness import (
    REPO,
    Collector,
    as_device,
    as_principal,
    derive_settings,
    python_process,
    start_query,
    start_storage,
    wait_until,
)

ACK = PublishOptions(acknowledge=True)


def count_of(stats_call):
    return stats_call.addCallback(lambda s: s["stored"])


@pytest.mark.stack(batching={"max_readings": 50})
@pytest_twisted.inlineCallbacks
def test_simulated_readings_are_stored_exactly_once_and_decrypt_to_what_was_sent(running_stack):
    s, reader = running_stack.settings, running_stack.reader
    plan = SimulationPlan(device_ids=["0", "1", "2"], sensor_types=["humidity", "temperature"], rate=500.0,
                          count=40, seed=7, batch=5)
    yield simulate(reactor, s, plan)
    yield wait_until(lambda: count_of(reader.call(uris.GET_STATS)).addCallback(lambda n: n >= 240), 30,
                     message="240 readings stored")
    got = yield reader.call(uris.FETCH_ALL)
    assert running_stack.storage.stop() == 0
    assert len(got) == 240
    for device_id in plan.device_ids:
        for sensor_type in plan.sensor_types:
            mine = [r for r in got if r["device_id"] == device_id and r["sensor_type"] == sensor_type]
            # exactly once, and the values are the ones the seeded simulator sent, in order
            assert sorted(r["value"] for r in mine) == sorted(SensorSeries(7, device_id, sensor_type).take(40))
            assert len({r["ts"] for r in mine}) == 40
    assert "Traceback" not in running_stack.storage.log()


@pytest_twisted.inlineCallbacks
def test_a_reading_published_twice_with_the_same_seq_is_stored_once_and_acknowledged(running_stack):
    reader = running_stack.reader
    device = yield running_stack.device("2")
    acks = Collector()
    yield device.subscribe(acks, uris.ack_topic("2"))
    readings = [{"value": 1.0 + i, "ts": 1000.0 + i, "seq": i + 1} for i in range(3)]
    yield device.publish(uris.sensor_topic("2", "humidity"), readings, options=ACK)
    yield wait_until(lambda: ({"seq": 3} in [p for _, p in acks.events]), 20, message="ack of seq 3")
    yield device.publish(uris.sensor_topic("2", "humidity"), readings, options=ACK)
    # the duplicate is acknowledged again (the device may have missed the first ack) ...
    yield wait_until(lambda: [p for _, p in acks.events].count({"seq": 3}) >= 2, 20, message="re-ack")
    # counters reach the store at most a second later
    yield wait_until(lambda: reader.call(uris.GET_STATS).addCallback(lambda st: st["duplicates"] == 3), 20,
                     message="3 duplicates counted")
    stored = yield reader.call(uris.FETCH_ALL, device_id="2")
    # ... and stored once
    assert [r["seq"] for r in stored] == [1, 2, 3]


@pytest_twisted.inlineCallbacks
def test_sigterm_in_the_middle_of_a_stream_loses_nothing_storage_had_received(router, router_settings, tmp_path):
    # batches stay open (no count, bytes or age limit is reached): only the shutdown flush can store them
    s = derive_settings(router_settings, tmp_path, {"batching": {"max_readings": 1_000_000, "max_age_s": 600}})
    storage = yield start_storage(s)
    device = yield as_device(s, "1")
    sent = 0
    try:
        for i in range(60):
            yield device.publish(uris.sensor_topic("1", "temperature"),
                                 [{"value": float(k), "ts": 5000.0 + i * 10 + k} for k in range(10)], options=ACK)
            sent += 10
            if i == 30:
                storage.signal(signal.SIGTERM)  # mid-stream
        code = yield threads.deferToThread(storage.wait, 60)
    finally:
        yield device.close()
        storage.kill()
    assert code == 0
    db = SqliteBatchStore(s.storage.sqlite_path)
    try:
        (state,) = db.states("storage/")
        counters = open_state(KeyFile(s.keys.file).load(), state)["counters"]
        stored_batches = db.batches_by_ts(float("-inf"), float("inf"))
    finally:
        db.close()
    assert 0 < counters["received"] <= sent
    assert counters["stored"] == counters["received"] == sum(b.count for b in stored_batches)
    assert "everything committed" in storage.log()


def tamper(db_path: str, sql: str) -> None:
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(sql)
    conn.close()


@pytest_twisted.inlineCallbacks
def test_a_tampered_index_field_or_moved_body_fails_with_a_decryption_error_naming_the_batch(router, router_settings,
                                                                                            tmp_path):
    s = derive_settings(router_settings, tmp_path)
    storage = yield start_storage(s)
    device = yield as_device(s, "0")
    for day in range(3):  # one batch per day bucket
        yield device.publish(uris.sensor_topic("0", "humidity"), {"value": float(day), "ts": 86400.0 * day + 10},
                             options=ACK)
    yield device.close()
    storage.stop()
    db = s.storage.sqlite_path
    uids = [r[0] for r in sqlite3.connect(db).execute("SELECT uid FROM records ORDER BY lo")]
    assert len(uids) == 3
    # day 1: an index field edited (its upper bound widened); day 2: day 0's body copied over it
    tamper(db, f"UPDATE records SET hi = hi + 5 WHERE uid = '{uids[1]}'")
    tamper(db, f"UPDATE records SET body = (SELECT body FROM records WHERE uid = '{uids[0]}') "
               f"WHERE uid = '{uids[2]}'")
    query = yield start_query(s)
    reader = yield as_principal(s, "dashboard")
    try:
        good = yield reader.call(uris.FETCH_BETWEEN_WINDOW, 0, 100)
        errors = []
        for day in (1, 2):
            try:
                yield reader.call(uris.FETCH_BETWEEN_WINDOW, 86400.0 * day, 86400.0 * day + 100)
            except ApplicationError as err:
                errors.append(err)
    finally:
        yield reader.close()
        query.stop()
    assert [r["value"] for r in good] == [0.0]
    assert [e.error for e in errors] == [uris.ERROR_DECRYPTION_FAILED] * 2
    assert uids[1] in errors[0].args[0] and uids[2] in errors[1].args[0]
    assert "integrity check" in errors[0].args[0]


@pytest_twisted.inlineCallbacks
def test_the_wrong_key_gives_a_clear_error_to_callers_and_stops_storage_with_a_message(router, router_settings,
                                                                                         tmp_path):
    s = derive_settings(router_settings, tmp_path)
    storage = yield start_storage(s)
    device = yield as_device(s, "0")
    yield device.publish(uris.sensor_topic("0", "humidity"), {"value": 1.0, "ts": 10.0}, options=ACK)
    yield device.close()
    storage.stop()
    Path(s.keys.file).rename(Path(s.keys.file).with_suffix(".lost"))  # the next start makes a new, wrong key
    query = yield start_query(s)
    reader = yield as_principal(s, "dashboard")
    try:
        with pytest.raises(ApplicationError) as err:
            yield reader.call(uris.FETCH_ALL)
    finally:
        yield reader.close()
        query.stop()
    assert err.value.error == uris.ERROR_DECRYPTION_FAILED
    assert "not among the configured keys" in err.value.args[0]
    restarted = python_process(s, "storage-wrong-key", "components", "storage").start()
    assert restarted.wait(60) == 2
    assert "storage cannot start" in restarted.log() and "not among the configured keys" in restarted.log()


@pytest_twisted.inlineCallbacks
def test_the_sqlite_file_holds_no_device_id_value_or_freeform_data_in_clear(router, router_settings, tmp_path):
    s = derive_settings(router_settings, tmp_path)
    storage = yield start_storage(s)
    device = yield as_device(s, "1")
    value = 4242.4242
    yield device.publish(uris.sensor_topic("1", "humidity"),
                         {"value": value, "ts": 99.0, "data": {"label": "freeform-marker-QX"}}, options=ACK)
    yield device.close()
    storage.stop()
    raw = b"".join(p.read_bytes() for p in Path(s.storage.sqlite_path).parent.glob("iot.sqlite3*"))
    assert b"records" in raw  # it is the database
    for needle in (b"freeform-marker-QX", b"4242.4242", b"humidity", b"iot.sensor"):
        assert needle not in raw


@pytest_twisted.inlineCallbacks
def test_rekey_while_the_stack_runs_leaves_everything_readable_under_the_new_key_only(running_stack):
    s, reader = running_stack.settings, running_stack.reader
    device = yield running_stack.device("2")
    for i in range(5):
        yield device.publish(uris.sensor_topic("2", "humidity"), {"value": float(i), "ts": 100.0 + i},
                             options=ACK)
    yield wait_until(lambda: count_of(reader.call(uris.GET_STATS)).addCallback(lambda n: n == 5), 20)
    old_key = KeyFile(s.keys.file).load().active_id
    rekey = subprocess.Popen([sys.executable, "-m", "components", "--config", s.config_path, "rekey",
                              "--grace", "1.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    for i in range(5, 10):  # storage keeps writing during the rotation
        yield device.publish(uris.sensor_topic("2", "humidity"), {"value": float(i), "ts": 100.0 + i},
                             options=ACK)
    out, _ = yield threads.deferToThread(rekey.communicate, timeout=120)
    yield wait_until(lambda: count_of(reader.call(uris.GET_STATS)).addCallback(lambda n: n == 10), 20)
    # a reading stored after the rotation is sealed with the new key too
    yield device.publish(uris.sensor_topic("2", "humidity"), {"value": 10.0, "ts": 110.0}, options=ACK)
    yield wait_until(lambda: count_of(reader.call(uris.GET_STATS)).addCallback(lambda n: n == 11), 20)
    got = yield reader.call(uris.FETCH_ALL)
    assert rekey.returncode == 0, out
    ring = KeyFile(s.keys.file).load()
    assert list(ring.keys) == [ring.active_id] and ring.active_id != old_key
    assert [r["value"] for r in got] == [float(i) for i in range(11)]
    db = sqlite3.connect(s.storage.sqlite_path)
    key_ids = {r[0] for r in db.execute("SELECT key_id FROM records UNION SELECT key_id FROM states "
                                        "UNION SELECT key_id FROM state_log")}
    assert key_ids == {ring.active_id}


@pytest_twisted.inlineCallbacks
def test_stats_count_what_storage_received_stored_and_refused(running_stack):
    reader = running_stack.reader
    device = yield running_stack.device("0")
    yield device.publish(uris.sensor_topic("0", "humidity"),
                         [{"value": 1.0, "ts": 1.0}, {"value": "NaN?", "ts": 2.0}, {"value": 3.0}], options=ACK)
    yield device.publish(uris.sensor_topic("0", "humidity"), {"value": 1.0, "ts": 1.0, "sensor_type": "temp"},
                         options=ACK)
    stats = yield wait_until(lambda: reader.call(uris.GET_STATS).addCallback(
        lambda st: st if st["received"] == 4 and st["stored"] == 1 else None), 20, message="stats")
    assert stats["rejected"] == {"value_not_number": 1, "ts_missing": 1, "sensor_type_mismatch": 1}
    assert stats["batches"] == 1 and stats["bytes"] > 0 and stats["queue_depth"] == 0
    assert stats["duplicates"] == 0 and stats["shed"] == 0
    assert [sh["name"] for sh in stats["shards"]] == ["storage/0-of-1"]
    json.dumps(stats)  # plain JSON for HTTP callers
