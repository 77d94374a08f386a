"""A device's WAMP publisher: one authenticated session per device, reconnecting, flow-controlled, resending.

Readings go into the device's spool first (each gets the next ``seq``), then a go-back-N sender publishes
them in seq order, at most ``window`` events waiting for the router's acknowledgement at once (so a fast
producer never queues seconds of data in front of the WebSocket pings). Storage acknowledges on
``iot.ack.<device_id>`` with the spool's epoch; acknowledged readings leave the spool, and an ack of another
epoch (one meant for this device's readings before its spool was lost) releases nothing. After a reconnect,
when storage repeats an ack (it saw a gap), or when no ack came for ``ack_timeout_s``, the sender goes back
to the oldest unacknowledged reading and sends again from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import txaio
from autobahn.twisted.component import Component
from autobahn.wamp.types import PublishOptions
from twisted.internet import defer, task

from components.wamp import uris
from devices.spool import Spool

log = txaio.make_logger()

_ACK_PUBLISH = PublishOptions(acknowledge=True)
MAX_EVENT_READINGS = 500


class DevicePublisher:
    """Publishes one device's readings to ``iot.sensor.<device_id>.<sensor_type>``."""

    def __init__(self, component: Component, device_id: str, window: int = 16, spool: Spool | None = None,
                 ack_timeout_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        """Publish through ``component`` (logged in as ``device_id``); with a spool, readings are numbered,
        kept until acknowledged and resent."""
        self.device_id = device_id
        self.component = component
        self.spool = spool
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.session: Any = None
        self.published_events = 0
        self.published_readings = 0
        self.resends = 0
        self.failed_events = 0
        self._clock = clock
        self._inflight = 0
        self._cursor = 0
        self._last_progress = clock()
        self._last_go_back = clock()
        self._fast_go_back_s = min(1.0, max(0.2, ack_timeout_s / 4))
        self._joined: list[defer.Deferred[None]] = []
        self._drained: list[defer.Deferred[None]] = []
        self._slots = defer.DeferredSemaphore(window)
        self._ack_topic = uris.ack_topic(device_id)
        self._watchdog = task.LoopingCall(self._check_overdue)
        component.on("join", self._on_join)
        component.on("leave", self._on_leave)

    # ---- session
    @defer.inlineCallbacks
    def _on_join(self, session: Any, details: Any) -> Any:
        if self.spool is not None:
            yield session.subscribe(self._on_ack, self._ack_topic)
        self.session = session
        log.info("device {device} connected", device=self.device_id)
        if self.spool is not None:
            self._go_back()  # whatever was in flight when the connection dropped may be lost
            if not self._watchdog.running:
                self._watchdog.start(max(0.05, self.ack_timeout_s / 4), now=False)
        waiting, self._joined = self._joined, []
        for d in waiting:
            d.callback(None)

    def _on_leave(self, session: Any, details: Any) -> None:
        self.session = None
        self._inflight = 0

    def connected(self) -> defer.Deferred[None]:
        """Fires when a session is up."""
        if self.session is not None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._joined.append(d)
        return d

    # ---- spooled sending (at-least-once, de-duplicated by storage)
    def send(self, sensor_type: str, readings: list[dict[str, Any]]) -> int:
        """Spool readings and let the sender publish them; return how many the spool took."""
        assert self.spool is not None, "send() needs a spool; use publish_once() without one"
        taken = self.spool.add(sensor_type, readings)
        self._pump()
        return len(taken)

    def _go_back(self) -> None:
        assert self.spool is not None
        first = self.spool.first_pending
        self._cursor = first if first is not None else self.spool.last_seq + 1
        self._last_progress = self._last_go_back = self._clock()
        self._pump()

    def _pump(self) -> None:
        spool, session = self.spool, self.session
        if spool is None or session is None:
            return
        while self._inflight < self.window and spool.pending and self._cursor <= spool.last_seq:
            if self._cursor < spool.pending[0][0]:
                self._cursor = spool.pending[0][0]
            event: list[dict[str, Any]] = []
            sensor_type = ""
            for _seq, t, reading in spool.from_seq(self._cursor):
                if event and (t != sensor_type or len(event) >= MAX_EVENT_READINGS):
                    break
                sensor_type = t
                event.append(reading)
            if not event:
                return
            self._cursor += len(event)
            self._inflight += 1
            epoch = {} if spool.epoch is None else {"epoch": spool.epoch}
            d = session.publish(uris.sensor_topic(self.device_id, sensor_type),
                                event[0] if len(event) == 1 else event, options=_ACK_PUBLISH, **epoch)
            d.addCallbacks(self._published, self._publish_failed, callbackArgs=(len(event),))

    def _published(self, _: Any, n: int) -> None:
        self._inflight = max(0, self._inflight - 1)
        self.published_events += 1
        self.published_readings += n
        self._pump()

    def _publish_failed(self, failure: Any) -> None:
        self._inflight = max(0, self._inflight - 1)
        self.failed_events += 1
        log.debug("device {device}: publish failed: {err}", device=self.device_id, err=failure.value)

    def _on_ack(self, payload: Any = None, *args: Any, **kwargs: Any) -> None:
        if self.spool is None or not isinstance(payload, dict) or type(payload.get("seq")) is not int:
            return
        if payload.get("epoch") != self.spool.epoch:
            return  # storage acknowledges readings of another epoch of this device
        if self.spool.ack(payload["seq"]):
            self._last_progress = self._clock()
        elif (self.spool.pending and self._cursor > self.spool.pending[0][0]
              and self._clock() - self._last_go_back >= self._fast_go_back_s):
            # a repeated ack: storage saw a gap (an event was lost or shed), so send again from the oldest
            self.resends += 1
            self._go_back()
        if not self.spool.pending:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)
        self._pump()

    def _check_overdue(self) -> None:
        spool = self.spool
        if spool is None or not spool.pending or self.session is None:
            self._last_progress = self._clock()
            return
        if self._clock() - self._last_progress >= self.ack_timeout_s:
            self.resends += 1
            log.info("device {device}: no ack for {t:.1f}s, sending again from seq {seq}", device=self.device_id,
                     t=self._clock() - self._last_progress, seq=spool.first_pending)
            self._go_back()

    def drained(self) -> defer.Deferred[None]:
        """Fires once storage has acknowledged everything spooled so far."""
        if self.spool is None or not self.spool.pending:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        return d

    def stop(self) -> None:
        """Stop the ack watchdog and close the spool."""
        if self._watchdog.running:
            self._watchdog.stop()
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    # ---- one-off, at-most-once
    @defer.inlineCallbacks
    def publish_once(self, sensor_type: str, readings: list[dict[str, Any]] | dict[str, Any]) -> Any:
        """Publish one event without spool or seq (at most once); True once the router acknowledged it."""
        yield self._slots.acquire()
        try:
            yield self.connected()
            try:
                yield self.session.publish(uris.sensor_topic(self.device_id, sensor_type), readings,
                                           options=_ACK_PUBLISH)
            except Exception as err:
                self.failed_events += 1
                log.warn("device {device}: publish failed: {err}", device=self.device_id, err=err)
                return False
            self.published_events += 1
            return True
        finally:
            self._slots.release()
