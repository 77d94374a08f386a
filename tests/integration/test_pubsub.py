"""Against the real router: what devices publish reaches a subscriber unchanged."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from autobahn.wamp.types import PublishOptions
from twisted.internet import reactor

from components.wamp import uris
from devices.fleet import SimulationPlan, simulate
from devices.simulator import SensorSeries
from tests.support.harness import Collector, as_device, as_principal, derive_settings, wait_until


@pytest.mark.parametrize("batch", [1, 4])
@pytest_twisted.inlineCallbacks
def test_simulated_readings_arrive_at_a_subscriber_unchanged(router, router_settings, tmp_path, batch: int) -> None:
    settings = derive_settings(router_settings, tmp_path)  # a fresh spool: every device starts at seq 1
    reader = yield as_principal(settings, "dashboard")
    events = Collector()
    yield events.subscribe(reader, uris.SENSOR_PREFIX)
    plan = SimulationPlan(device_ids=["0", "1"], sensor_types=["humidity", "temperature"], rate=200.0,
                          count=8, seed=42, batch=batch, await_acks=False)
    started = time.time()
    try:
        yield simulate(reactor, settings, plan)
        yield wait_until(lambda: sum(len(p) if isinstance(p, list) else 1 for _, p in events.events) >= 32,
                         message="32 readings")
    finally:
        yield reader.close()

    received: dict[str, list[dict]] = {}
    for topic, payload in events.events:
        received.setdefault(topic, []).extend(payload if isinstance(payload, list) else [payload])
    assert sorted(received) == [uris.sensor_topic(d, t) for d in ("0", "1") for t in ("humidity", "temperature")]
    for device_id in ("0", "1"):
        for sensor_type in ("humidity", "temperature"):
            got = received[uris.sensor_topic(device_id, sensor_type)]
            # values are the seed's, in order; timestamps are the device's clock, increasing
            assert [g["value"] for g in got] == SensorSeries(42, device_id, sensor_type).take(8)
            assert set(got[0]) == {"value", "ts", "seq"}
            stamps = [g["ts"] for g in got]
            assert stamps == sorted(stamps) and started - 5 < stamps[0] <= stamps[-1] < time.time() + 1
            if batch > 1:
                assert all(isinstance(p, list) for t, p in events.events)
    for device_id in ("0", "1"):  # one seq per device across its sensor types, from 1, no gap
        seqs = sorted(g["seq"] for topic, p in received.items() if topic.split(".")[2] == device_id for g in p)
        assert seqs == list(range(1, 17))


@pytest.mark.parametrize("serializer", ["json", "msgpack", "cbor"])
@pytest_twisted.inlineCallbacks
def test_every_field_survives_each_serializer(router, router_settings, serializer: str) -> None:
    reader = yield as_principal(router_settings, "dashboard", serializer="msgpack")
    device = yield as_device(router_settings, "1", serializer=serializer)
    events = Collector()
    yield events.subscribe(reader, uris.SENSOR_PREFIX)
    sent = [
        {"device_id": "1", "sensor_type": "humidity", "value": 99, "ts": 1500052521, "seq": 1},
        {"value": 12.345678, "ts": 1500052521.123456, "seq": 2, "data": {"fw": "2.1", "cal": [1, 2.5], "ok": True}},
    ]
    try:
        yield device.publish(uris.sensor_topic("1", "humidity"), sent, options=PublishOptions(acknowledge=True))
        yield wait_until(lambda: events.events, message="the event")
    finally:
        yield device.close()
        yield reader.close()
    assert events.events == [(uris.sensor_topic("1", "humidity"), sent)]
