"""A device's WAMP publisher: one authenticated session per device, reconnecting, flow-controlled.

Flow control: at most ``window`` publishes wait for the router's acknowledgement at once. A caller of
:meth:`DevicePublisher.send` gets a Deferred that fires once its event has been handed to the router,
so a producer that waits for it can never queue seconds of data in front of the WebSocket pings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txaio
from autobahn.twisted.component import Component
from autobahn.wamp.types import PublishOptions
from twisted.internet import defer

from components import uris

log = txaio.make_logger()

_ACK_PUBLISH = PublishOptions(acknowledge=True)


class DevicePublisher:
    """Publishes one device's readings to ``iot.sensor.<device_id>.<sensor_type>``."""

    def __init__(self, component: Component, device_id: str, window: int = 16) -> None:
        """Publish through ``component`` (logged in as ``device_id``), ``window`` events in flight at most."""
        self.device_id = device_id
        self.component = component
        self.session: Any = None
        self.published_events = 0
        self.published_readings = 0
        self.failed_events = 0
        self.on_ack: Callable[[int], None] | None = None
        self._slots = defer.DeferredSemaphore(window)
        self._joined: list[defer.Deferred[None]] = []
        self._ack_topic = uris.ack_topic(device_id)
        component.on("join", self._on_join)
        component.on("leave", self._on_leave)

    @defer.inlineCallbacks
    def _on_join(self, session: Any, details: Any) -> Any:
        self.session = session
        if self.on_ack is not None:
            yield session.subscribe(self._ack, self._ack_topic)
        log.info("device {device} connected", device=self.device_id)
        waiting, self._joined = self._joined, []
        for d in waiting:
            d.callback(None)

    def _on_leave(self, session: Any, details: Any) -> None:
        self.session = None

    def _ack(self, payload: Any) -> None:
        if self.on_ack is not None and isinstance(payload, dict) and type(payload.get("seq")) is int:
            self.on_ack(payload["seq"])

    def connected(self) -> defer.Deferred[None]:
        """Fires when a session is up."""
        if self.session is not None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._joined.append(d)
        return d

    @defer.inlineCallbacks
    def send(self, sensor_type: str, readings: list[dict[str, Any]] | dict[str, Any]) -> Any:
        """Publish one event (a reading or a list of readings); True once the router acknowledged it."""
        yield self._slots.acquire()
        try:
            yield self.connected()
            count = len(readings) if isinstance(readings, list) else 1
            try:
                yield self.session.publish(uris.sensor_topic(self.device_id, sensor_type), readings,
                                           options=_ACK_PUBLISH)
            except Exception as err:  # a lost connection or a refusal: the caller decides what to resend
                self.failed_events += 1
                log.warn("device {device}: publish failed: {err}", device=self.device_id, err=err)
                return False
            self.published_events += 1
            self.published_readings += count
            return True
        finally:
            self._slots.release()
