"""Running simulated devices: one session per device, readings at a steady rate or as a classic data set."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import txaio
from twisted.internet import defer, task

from components.credentials import CredentialStore
from components.settings import Settings
from components.wamp import device_auth, make_component
from devices.publisher import DevicePublisher
from devices.simulator import SensorSeries, classic_dataset, live_timestamps

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


def connect_devices(settings: Settings, device_ids: Sequence[str], serializer: str | None = None
                    ) -> list[DevicePublisher]:
    """A publisher per device, each logging in with the device's own key."""
    store = CredentialStore(settings.paths.secrets_dir)
    publishers = []
    for device_id in device_ids:
        component = make_component(settings.router, device_auth(device_id, store.device_key(device_id)),
                                   serializer=serializer)
        publishers.append(DevicePublisher(component, device_id, settings.device.window))
    return publishers


class _Pipeline:
    """Keeps up to ``window`` sends of one producer in flight; waiting on it is the producer's brake."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._inflight: deque[defer.Deferred[Any]] = deque()

    @defer.inlineCallbacks
    def push(self, d: defer.Deferred[Any]) -> Any:
        self._inflight.append(d)
        while len(self._inflight) >= self._window:
            yield self._inflight.popleft()

    @defer.inlineCallbacks
    def drain(self) -> Any:
        while self._inflight:
            yield self._inflight.popleft()


def _event(readings: list[dict[str, Any]]) -> list[dict[str, Any]] | dict[str, Any]:
    return readings[0] if len(readings) == 1 else readings


@defer.inlineCallbacks
def _live_series(reactor: Any, pub: DevicePublisher, sensor_type: str, plan: SimulationPlan,
                 window: int) -> Any:
    series = SensorSeries(plan.seed, pub.device_id, sensor_type)
    pipeline = _Pipeline(window)
    interval = 1.0 / plan.rate
    sent = 0
    last_ts = 0.0
    due = reactor.seconds()
    yield pub.connected()
    while plan.count == 0 or sent < plan.count:
        n = plan.batch if plan.count == 0 else min(plan.batch, plan.count - sent)
        values = series.take(n)
        stamps = list(live_timestamps(max(time.time(), last_ts + n * interval), n, interval))
        last_ts = stamps[-1]
        readings = [{"value": v, "ts": ts} for v, ts in zip(values, stamps, strict=True)]
        yield pipeline.push(pub.send(sensor_type, _event(readings)))
        sent += n
        due += n * interval
        delay = due - reactor.seconds()
        if delay > 0:
            yield task.deferLater(reactor, delay, lambda: None)
        else:
            due = reactor.seconds()  # running behind: carry on at the rate, never burst to catch up
    yield pipeline.drain()


@defer.inlineCallbacks
def _classic_device(pub: DevicePublisher, readings: list[Any], batch: int, window: int) -> Any:
    pipeline = _Pipeline(window)
    yield pub.connected()
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in readings:
        by_type.setdefault(r.sensor_type, []).append({"value": r.value, "ts": r.ts})
    for sensor_type, rows in by_type.items():
        for i in range(0, len(rows), batch):
            yield pipeline.push(pub.send(sensor_type, _event(rows[i:i + batch])))
    yield pipeline.drain()


@defer.inlineCallbacks
def simulate(reactor: Any, settings: Settings, plan: SimulationPlan) -> Any:
    """Run the plan until every device sent its count (or forever when count is 0)."""
    publishers = connect_devices(settings, plan.device_ids, plan.serializer)
    for pub in publishers:
        pub.component.start(reactor)
    # On SIGINT/SIGTERM leave the sessions cleanly before the reactor stops.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stop_all, publishers)
    window = settings.device.window
    if plan.classic:
        data = classic_dataset(plan.count or 5000, plan.seed, plan.device_ids, plan.sensor_types)
        work = [_classic_device(pub, [r for r in data if r.device_id == pub.device_id], plan.batch, window)
                for pub in publishers]
    else:
        work = [_live_series(reactor, pub, t, plan, window) for pub in publishers for t in plan.sensor_types]
    log.info("simulating {n} device(s): {ids}", n=len(publishers), ids=", ".join(plan.device_ids))
    try:
        yield defer.gatherResults(work, consumeErrors=True)
    finally:
        total = sum(p.published_readings for p in publishers)
        failed = sum(p.failed_events for p in publishers)
        log.info("devices published {total} readings ({failed} events failed)", total=total, failed=failed)
        reactor.removeSystemEventTrigger(trigger)
        yield stop_all(publishers)


def stop_all(publishers: Sequence[DevicePublisher]) -> defer.Deferred[Any]:
    """Leave every device's session (and stop reconnecting)."""
    running = [p.component for p in publishers if p.component._done_f is not None]
    return defer.gatherResults([c.stop() for c in running], consumeErrors=True)
