"""Nothing lost, nothing stored twice: real router, storage and device processes, killed and restarted by
the test with signals."""

from __future__ import annotations

import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import pytest_twisted
from autobahn.wamp.types import PublishOptions
from twisted.internet import reactor, task, threads

from components.core.batches import iter_readings, open_groups
from components.core.ingest import shard_of
from components.core.sealing import KeyFile
from components.core.settings import Settings
from components.storage.sqlite import SqliteBatchStore
from components.wamp import uris
from devices.fleet import connect_devices
from devices.simulator import SensorSeries
from devices.spool import Spool
from tests.support.harness import (
    ComponentProcess,
    RouterProcess,
    derive_settings,
    python_process,
    stack_settings,
    start_storage,
    wait_until,
)

pytestmark = pytest.mark.slow
TYPES = ("humidity", "temperature")
SEED = 11


def stored_count(db_path: str) -> int:
    """Readings committed so far, from the batches' clear counts (no key needed, works while storage is down)."""
    if not Path(db_path).exists():
        return 0
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        row = conn.execute("SELECT coalesce(sum(n), 0) FROM records WHERE kind = 'batch'").fetchone()
        return int(row[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def all_readings(settings: Settings, db_path: str | None = None) -> list[tuple]:
    """Every stored reading as (device_id, sensor_type, received_at, ts, value, seq, data)."""
    store = SqliteBatchStore(db_path or settings.storage.sqlite_path)
    ring = KeyFile(settings.keys.file).load()
    try:
        return [r for b in store.batches_by_ts(float("-inf"), float("inf"))
                for r in iter_readings(open_groups(ring, b))]
    finally:
        store.close()


def simulator(settings: Settings, name: str, device_ids: list[str], count: int, rate: float, batch: int
              ) -> ComponentProcess:
    return python_process(settings, name, "devices", "simulate", "--device-ids", ",".join(device_ids),
                          "--count", str(count), "--rate", str(rate), "--batch", str(batch), "--seed", str(SEED))


def assert_exactly_once(readings: list[tuple], device_ids: list[str], per_series: int) -> None:
    """Every series complete, in the seeded values, with one seq per reading and no gap, nothing twice."""
    assert len(readings) == len(device_ids) * len(TYPES) * per_series
    for device_id in device_ids:
        mine = [r for r in readings if r[0] == device_id]
        assert sorted(r[5] for r in mine) == list(range(1, len(TYPES) * per_series + 1)), device_id
        for sensor_type in TYPES:
            series = sorted((r for r in mine if r[1] == sensor_type), key=lambda r: r[5])
            assert [r[4] for r in series] == SensorSeries(SEED, device_id, sensor_type).take(per_series)


@pytest_twisted.inlineCallbacks
def wait_for_stored(db_path: str, at_least: int, timeout: float = 120) -> object:
    yield wait_until(lambda: stored_count(db_path) >= at_least, timeout, 0.1, f"{at_least} readings stored")


@pytest_twisted.inlineCallbacks
def test_storage_killed_twice_and_a_router_restart_lose_nothing_and_store_nothing_twice(tmp_path) -> None:
    devices = [str(i) for i in range(10)]
    s = stack_settings(tmp_path, devices=tuple(devices), overrides={
        "device": {"ack_timeout_s": 2.0}, "batching": {"max_age_s": 0.5}})
    router = RouterProcess(s).start()
    storage = yield start_storage(s)
    sim = simulator(s, "devices", devices, count=1000, rate=40.0, batch=10).start()  # 20,000 readings
    try:
        db = s.storage.sqlite_path
        for threshold, n in ((3000, 1), (8000, 2)):
            yield wait_for_stored(db, threshold)
            storage.kill()  # SIGKILL: its open batch and queue are lost, unacknowledged
            storage = yield start_storage(s, f"storage-after-kill-{n}")
        yield wait_for_stored(db, 13000)
        router.stop()
        router.start()  # same port; every component reconnects on its own
        code = yield threads.deferToThread(sim.wait, 300)  # exits once storage acknowledged everything
        assert code == 0, sim.log()[-3000:]
    finally:
        sim.kill()
        storage.stop()
        router.stop()
    readings = all_readings(s)
    assert_exactly_once(readings, devices, 1000)
    assert "resends" in sim.log()


@pytest_twisted.inlineCallbacks
def test_a_device_killed_and_restarted_resumes_with_no_gap_and_no_duplicate(router, router_settings, tmp_path):
    s = derive_settings(router_settings, tmp_path, {"device": {"ack_timeout_s": 2.0},
                                                    "batching": {"max_age_s": 0.3}})
    storage = yield start_storage(s)
    try:
        first = simulator(s, "device-5-first", ["2"], count=300, rate=60.0, batch=5).start()
        yield wait_for_stored(s.storage.sqlite_path, 150)
        first.kill()
        again = simulator(s, "device-5-again", ["2"], count=300, rate=60.0, batch=5).start()
        code = yield threads.deferToThread(again.wait, 120)
        assert code == 0, again.log()[-3000:]
    finally:
        storage.stop()
    readings = all_readings(s)
    assert_exactly_once(readings, ["2"], 300)


@pytest_twisted.inlineCallbacks
def test_a_device_whose_spool_is_lost_stores_both_runs_once_and_late_resends_are_not_stored_twice(
        router, router_settings, tmp_path):
    s = derive_settings(router_settings, tmp_path, {"batching": {"max_age_s": 0.2}})
    storage = yield start_storage(s)
    spool_file = Path(s.device.spool_dir) / "1.spool"
    try:
        epochs = []
        for run in ("before", "after"):
            sim = simulator(s, f"device-1-{run}", ["1"], count=50, rate=200.0, batch=5).start()
            code = yield threads.deferToThread(sim.wait, 120)  # exits once storage acknowledged everything
            assert code == 0, sim.log()[-3000:]
            spool = Spool(s.device.spool_dir, "1", 10)
            epochs.append(spool.epoch)
            spool.close()
            spool_file.unlink()  # the device is re-flashed: its spool is gone, the next run starts at seq 1
        assert None not in epochs and epochs[0] != epochs[1]
        first_run = sorted((r for r in all_readings(s) if r[5] <= 5), key=lambda r: r[2])[:5]
        # a late resend of the first epoch's seq 1..5 (a packet stuck somewhere): known, re-acknowledged
        (device,) = connect_devices(s, ["1"], spooled=False)
        acks: list[dict] = []
        device.component.start(reactor)
        yield device.connected()
        yield device.session.subscribe(acks.append, uris.ack_topic("1"))
        for r in first_run:
            yield device.session.publish(uris.sensor_topic("1", r[1]), {"value": r[4], "ts": r[3], "seq": r[5]},
                                         epoch=epochs[0], options=PublishOptions(acknowledge=True))
        yield wait_until(lambda: {"seq": 100, "epoch": epochs[0]} in acks, 20, message="the re-ack of the old epoch")
        yield device.component.stop()
    finally:
        storage.stop()
    readings = all_readings(s)
    assert len(readings) == 2 * 2 * 50  # both runs, once each
    assert Counter(r[5] for r in readings) == {seq: 2 for seq in range(1, 101)}  # seq 1..100 in each epoch
    for sensor_type in TYPES:
        values = sorted(r[4] for r in readings if r[1] == sensor_type)
        assert values == sorted(SensorSeries(SEED, "1", sensor_type).take(50) * 2)


@pytest_twisted.inlineCallbacks
def test_two_storage_shards_store_complete_and_disjoint_device_sets(router, router_settings, tmp_path) -> None:
    devices = ["0", "1", "2"]
    s0 = derive_settings(router_settings, tmp_path / "s0", {"storage": {"shard": 0, "shards": 2}})
    s1 = derive_settings(router_settings, tmp_path / "s1", {"storage": {"shard": 1, "shards": 2}})
    Path(s1.keys.file).parent.mkdir(parents=True, exist_ok=True)
    KeyFile(s0.keys.file).load()
    Path(s1.keys.file).write_bytes(Path(s0.keys.file).read_bytes())  # one key for the whole deployment
    Path(s1.keys.file).chmod(0o600)
    shard0 = yield start_storage(s0, "storage-shard-0")
    shard1 = yield start_storage(s1, "storage-shard-1")
    try:
        sim = simulator(s0, "devices", devices, count=100, rate=200.0, batch=10).start()
        code = yield threads.deferToThread(sim.wait, 120)  # every device acknowledged by its shard
        assert code == 0, sim.log()[-3000:]
    finally:
        shard0.stop()
        shard1.stop()
    got = [all_readings(s0), all_readings(s1)]
    sets = [{r[0] for r in rs} for rs in got]
    assert sets[0] | sets[1] == set(devices) and not sets[0] & sets[1]
    for i in (0, 1):
        assert sets[i] == {d for d in devices if shard_of(d, 2) == i}
    assert_exactly_once(got[0] + got[1], devices, 100)


@pytest_twisted.inlineCallbacks
def test_storage_memory_stays_bounded_while_a_device_publishes_faster_than_it_can_write(router, router_settings,
                                                                                         tmp_path) -> None:
    bound_mb = 256
    # one reading per batch and a short queue: the writer commits a few thousand readings a second at most
    s = derive_settings(router_settings, tmp_path, {"batching": {"max_readings": 1}, "storage": {"writer_queue": 2},
                                                    "device": {"window": 32, "spool_max": 500_000}})
    storage = yield start_storage(s)
    proc = psutil.Process(storage.proc.pid)
    (pub,) = connect_devices(s, ["1"])
    pub.component.start(reactor)
    samples: list[float] = []
    pending_seen = 0
    try:
        yield pub.connected()
        deadline = time.monotonic() + 12
        for i in range(300):  # 300 events of 500 readings, as fast as flow control lets them out
            pub.send("humidity", [{"value": float(k), "ts": 1000.0 + i + k / 1000} for k in range(500)])
            samples.append(proc.memory_info().rss / 2**20)
            pending_seen = max(pending_seen, len(pub.spool.pending))
            while pub._inflight >= pub.window and time.monotonic() < deadline:
                yield task.deferLater(reactor, 0.01, lambda: None)
            if time.monotonic() > deadline:
                break
        for _ in range(30):  # and while the writer works through what it kept
            samples.append(proc.memory_info().rss / 2**20)
            yield task.deferLater(reactor, 0.1, lambda: None)
    finally:
        pub.stop()
        yield pub.component.stop()
        storage.stop()
    state = all_readings(s)
    peak, first_half, second_half = max(samples), max(samples[:len(samples) // 2]), max(samples[len(samples) // 2:])
    print(f"\nstorage RSS under overload: peak {peak:.1f} MB (bound {bound_mb} MB), first half {first_half:.1f} MB, "
          f"second half {second_half:.1f} MB, {len(samples)} samples; device spool peaked at {pending_seen} "
          f"unacknowledged readings; {len(state)} readings stored")
    assert peak < bound_mb
    assert second_half < first_half * 1.25 + 16  # flat, not growing with the backlog
    assert pending_seen > 10_000  # the device saw it: acks fell behind and its spool grew
    log = storage.log()
    assert "shedding new readings" in log


STUCK_SUBSCRIBER = """
import sys, txaio
txaio.use_twisted()
from autobahn.wamp.types import SubscribeOptions
from twisted.internet import reactor
from components.core.settings import load_settings
from components.ops.credentials import CredentialStore
from components.wamp.connection import make_component, ticket_auth
s = load_settings(sys.argv[1])
c = make_component(s.router, ticket_auth("dashboard", CredentialStore(s.paths.secrets_dir).ticket("dashboard")))
def joined(session, details):
    d = session.subscribe(lambda *a, **k: None, "iot.sensor.", options=SubscribeOptions(match="prefix"))
    d.addCallback(lambda _: print("subscribed", flush=True))
c.on("join", joined)
c.on("leave", lambda session, details: print("lost", details.reason, flush=True))
c.start(reactor)
reactor.run()
"""


@pytest_twisted.inlineCallbacks
def test_a_stuck_subscriber_is_dropped_by_auto_ping_and_never_stalls_storage(tmp_path) -> None:
    s = stack_settings(tmp_path, overrides={"router": {"auto_ping_interval_s": 1.0, "auto_ping_timeout_s": 1.0}})
    router = RouterProcess(s).start()
    storage = yield start_storage(s)
    stuck = ComponentProcess("stuck", [sys.executable, "-c", STUCK_SUBSCRIBER, s.config_path],
                             log_path=Path(s.paths.run_dir) / "stuck.log").start()
    try:
        yield stuck.wait_for_log("subscribed")
        stuck.signal(signal.SIGSTOP)  # a tab in the background, a dead peer: it reads nothing, answers no ping
        (pub,) = connect_devices(s, ["0"])
        pub.component.start(reactor)
        yield pub.connected()
        for i in range(40):
            pub.send("humidity", [{"value": float(k), "ts": 50.0 + i + k / 100} for k in range(50)])
        yield pub.drained()  # all 2,000 stored and acknowledged while the subscriber hangs
        pub.stop()
        yield pub.component.stop()
        yield wait_until(lambda: "WebSocket ping timeout" in router.log(), 10, 0.2, "the router to drop the stuck peer")
        stuck.signal(signal.SIGCONT)
        yield wait_until(lambda: stuck.log().count("subscribed") >= 2, 30, 0.1,
                         "the stuck subscriber to notice and reconnect")
    finally:
        stuck.kill()
        storage.stop()
        router.stop()
    assert stored_count(s.storage.sqlite_path) == 2000
    assert "lost" in stuck.log()


def test_acks_only_cover_committed_readings_across_devices(tmp_path) -> None:
    # a unit-level reminder of the rule the tests above rely on: acks come per device, after the commit
    from tests.support.corefill import fill, new_ring

    store = SqliteBatchStore(tmp_path / "db.sqlite3")
    done = fill(store, new_ring(), [(uris.sensor_topic(d, "humidity"), [{"value": 1.0, "ts": 1.0, "seq": 1},
                                                                         {"value": 2.0, "ts": 2.0, "seq": 2}], 1.0)
                                    for d in ("a", "b")])
    assert Counter(d for acks in done.acks for d, _ in acks) == {"a": 1, "b": 1}
    assert {d: s for acks in done.acks for (d, _), s in acks.items()} == {"a": 2, "b": 2}
    store.close()

