"""Running simulated devices: one session and one spool per device, readings at a steady rate or a classic set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import txaio
from twisted.internet import defer, task

from components.core.settings import Settings
from components.ops.credentials import CredentialStore
from components.wamp.connection import device_auth, make_component
from devices.publisher import DevicePublisher
from devices.simulator import SensorSeries, classic_dataset, live_timestamps
from devices.spool import Spool

log = txaio.make_logger()


@dataclass(frozen=True)
class SimulationPlan:
    """What to simulate (the CLI fills it from settings and options)."""

    device_ids: Sequence[str]
    sensor_types: Sequence[str]
    rate: float
    count: int
    seed: int
    batch: int
    classic: bool = False
    serializer: str | None = None
    await_acks: bool = True
    """With a count: finish only once storage has acknowledged every reading."""


def connect_devices(settings: Settings, device_ids: Sequence[str], serializer: str | None = None,
                    spooled: bool = True) -> list[DevicePublisher]:
    """A publisher per device, each logging in with the device's own key (and keeping its own spool)."""
    store = CredentialStore(settings.paths.secrets_dir)
    publishers = []
    for device_id in device_ids:
        component = make_component(settings.router, device_auth(device_id, store.device_key(device_id)),
                                   serializer=serializer)
        spool = Spool(settings.device.spool_dir, device_id, settings.device.spool_max) if spooled else None
        publishers.append(DevicePublisher(component, device_id, settings.device.window, spool,
                                          settings.device.ack_timeout_s))
    return publishers


@defer.inlineCallbacks
def _live_series(reactor: Any, pub: DevicePublisher, sensor_type: str, plan: SimulationPlan) -> Any:
    assert pub.spool is not None
    series = SensorSeries(plan.seed, pub.device_id, sensor_type)
    produced = pub.spool.produced[sensor_type]
    series.take(produced)  # a device that restarts continues its series where it stopped
    interval = 1.0 / plan.rate
    sent = produced
    last_ts = 0.0
    due = reactor.seconds()
    while pub.spool is not None and (plan.count == 0 or sent < plan.count):  # None: stopped (shutdown)
        n = plan.batch if plan.count == 0 else min(plan.batch, plan.count - sent)
        stamps = list(live_timestamps(max(time.time(), last_ts + n * interval), n, interval))
        last_ts = stamps[-1]
        readings = [{"value": v, "ts": ts} for v, ts in zip(series.take(n), stamps, strict=True)]
        pub.send(sensor_type, readings)
        sent += n
        due += n * interval
        delay = due - reactor.seconds()
        if delay > 0:
            yield task.deferLater(reactor, delay, lambda: None)
        else:
            due = reactor.seconds()  # running behind: carry on at the rate, never burst to catch up
            yield task.deferLater(reactor, 0, lambda: None)


def _classic_device(pub: DevicePublisher, readings: list[Any], batch: int) -> None:
    assert pub.spool is not None
    skip = dict(pub.spool.produced)  # already spooled by an earlier run
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in readings:
        by_type.setdefault(r.sensor_type, []).append({"value": r.value, "ts": r.ts})
    for sensor_type, rows in by_type.items():
        rows = rows[skip.get(sensor_type, 0):]
        for i in range(0, len(rows), batch):
            pub.send(sensor_type, rows[i:i + batch])


@defer.inlineCallbacks
def simulate(reactor: Any, settings: Settings, plan: SimulationPlan) -> Any:
    """Run the plan until every device sent its count (and storage acknowledged it), or forever with count 0."""
    publishers = connect_devices(settings, plan.device_ids, plan.serializer)
    for pub in publishers:
        pub.component.start(reactor)
    # On SIGINT/SIGTERM leave the sessions cleanly and close the spools before the reactor stops.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stop_all, publishers)
    log.info("simulating {n} device(s): {ids}", n=len(publishers), ids=", ".join(plan.device_ids))
    try:
        yield defer.gatherResults([p.connected() for p in publishers], consumeErrors=True)
        if plan.classic:
            data = classic_dataset(plan.count or 5000, plan.seed, plan.device_ids, plan.sensor_types)
            for pub in publishers:
                _classic_device(pub, [r for r in data if r.device_id == pub.device_id], plan.batch)
        else:
            yield defer.gatherResults([_live_series(reactor, pub, t, plan) for pub in publishers
                                       for t in plan.sensor_types], consumeErrors=True)
        if plan.await_acks:
            yield defer.gatherResults([p.drained() for p in publishers], consumeErrors=True)
    finally:
        reactor.removeSystemEventTrigger(trigger)
        total = sum(p.published_readings for p in publishers)
        dropped = sum(p.spool.dropped for p in publishers if p.spool)
        log.info("devices published {total} readings ({resends} resends, {dropped} dropped by full spools)",
                 total=total, resends=sum(p.resends for p in publishers), dropped=dropped)
        yield stop_all(publishers)


def stop_all(publishers: Sequence[DevicePublisher]) -> defer.Deferred[Any]:
    """Leave every device's session (and stop reconnecting), close the spools."""
    running = [p.component for p in publishers if p.component._done_f is not None]
    for p in publishers:
        p.stop()
    return defer.gatherResults([c.stop() for c in running], consumeErrors=True)
