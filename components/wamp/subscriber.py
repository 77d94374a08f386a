"""The storage subscriber: a thin WAMP adapter around :class:`components.core.ingest.IngestService`.

It subscribes to ``iot.sensor.`` (prefix match), hands each event (with the ``epoch`` keyword argument
devices send) to the service, publishes ``iot.ack.<device_id>`` as ``{"seq": N, "epoch": E}`` after each
commit, and on SIGTERM/SIGINT commits every open batch before exiting.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import txaio
from autobahn.twisted.component import Component
from autobahn.wamp.types import SubscribeOptions
from twisted.internet import defer, task, threads

from components.core.errors import ConfigError, IotError, StorageUnavailable
from components.core.ingest import IngestService, Mark
from components.core.metrics import storage_exposition
from components.core.retention import Retention, record_name
from components.core.sealing import KeySource
from components.core.settings import Settings
from components.storage.backends import open_store
from components.wamp import uris
from components.wamp.connection import announce_ready, make_component, start_service, ticket_auth
from components.wamp.monitoring import Health, serve

log = txaio.make_logger()

TICK_S = 0.05
FLUSH_TIMEOUT_S = 30.0


def ack_payload(seq: int, epoch: str | None) -> dict[str, Any]:
    """What ``iot.ack.<device_id>`` carries: the highest committed seq, and the epoch it counts in."""
    return {"seq": seq} if epoch is None else {"seq": seq, "epoch": epoch}


def deliver(service: IngestService, topic: str, payload: object, received_at: float | None = None,
            epoch: object = None) -> None:
    """Hand an event published on ``topic`` to ``service`` (a topic of another shape is counted as refused)."""
    parsed = uris.parse_sensor_topic(topic)
    if parsed is None:
        service.refuse_source(payload, topic)
    else:
        service.ingest(parsed[0], parsed[1], payload, received_at, epoch)


class StorageAdapter:
    """Connects an IngestService to a WAMP session."""

    def __init__(self, component: Component, service: IngestService, reactor: Any,
                 retention: Retention | None = None) -> None:
        """Wire ``service`` to ``component``; acks go out on ``reactor``'s thread; ``retention`` stops with it."""
        self.component = component
        self.service = service
        self.retention = retention
        self.reactor = reactor
        self.session: Any = None
        self.subscription: Any = None
        self.ticker = task.LoopingCall(self.tick)
        self.stopping = False
        component.on("join", self._on_join)
        component.on("leave", self._on_leave)

    @defer.inlineCallbacks
    def _on_join(self, session: Any, details: Any) -> Any:
        self.subscription = yield session.subscribe(self._on_event, uris.SENSOR_PREFIX,
                                options=SubscribeOptions(match="prefix", details_arg="details"))
        self.session = session
        log.info("storage subscribed to {prefix}* as {authid}", prefix=uris.SENSOR_PREFIX, authid=details.authid)
        announce_ready("storage")

    def _on_leave(self, session: Any, details: Any) -> None:
        self.session = None

    def _on_event(self, *args: Any, details: Any = None, **kwargs: Any) -> None:
        if self.stopping:
            return  # not acknowledged: devices that number their readings send them again
        deliver(self.service, details.topic, args[0] if args else None, epoch=kwargs.get("epoch"))

    def acks_from_writer(self, acks: dict[Mark, int]) -> None:
        """Called on the writer thread after a commit."""
        self.reactor.callFromThread(self.publish_acks, acks)

    def publish_acks(self, acks: dict[Mark, int]) -> None:
        """Tell each device how far its readings of an epoch are stored (dropped when disconnected: a resend
        re-acks)."""
        session = self.session
        if session is None or not acks:
            return
        for (device_id, epoch), seq in acks.items():
            session.publish(uris.ack_topic(device_id), ack_payload(seq, epoch))

    def tick(self) -> None:
        """Periodic service work; re-acknowledge duplicates of committed readings."""
        self.publish_acks(self.service.tick())

    @defer.inlineCallbacks
    def shutdown(self) -> Any:
        """Stop taking events, commit what is open (acks still go out), then leave."""
        self.stopping = True
        if self.ticker.running:
            self.ticker.stop()
        if self.retention is not None:
            yield threads.deferToThread(self.retention.stop)
        if self.session is not None and self.subscription is not None:
            try:
                yield self.subscription.unsubscribe()
            except Exception as err:  # the connection may already be gone; the flush matters, not this
                log.debug("unsubscribe failed: {err}", err=err)
        ok = yield threads.deferToThread(self.service.flush, FLUSH_TIMEOUT_S)
        stats = self.service.stats()
        log.info("storage stopped: {stored} readings stored in {batches} batches ({status})",
                 stored=stats["stored"], batches=stats["batches"],
                 status="everything committed" if ok else "some readings NOT committed")
        if self.component._done_f is not None:
            yield self.component.stop()


def _open_and_load(settings: Settings, keys: KeySource, on_commit: Any) -> tuple[Any, IngestService]:
    """Open the backend and load the committed state, waiting while the backend is unavailable.

    Storage must know what it already committed before it takes readings; devices keep theirs meanwhile.
    """
    delay, attempts = 0.5, 0
    while True:
        try:
            store = open_store(settings.storage)
            service = IngestService(settings.storage, settings.batching, store, keys, on_commit=on_commit)
            service.start()
            return store, service
        except StorageUnavailable as err:
            attempts += 1
            if attempts == 1 or attempts % 10 == 0:
                log.warn("storage backend unavailable ({err}); retrying every {d:.0f}s", err=err, d=delay)
            time.sleep(delay)  # nothing else to do before the backend answers: not connected to the router yet
            delay = min(10.0, delay * 2)


def start_retention(settings: Settings, store: Any, keys: KeySource) -> Retention | None:
    """With ``storage.retention_days`` set, storage shard 0 runs retention for the whole store."""
    s = settings.storage
    if s.retention_days <= 0 or s.shard != 0:
        return None
    retention = Retention(store, keys, s.retention_days, record_name(s.shard, s.shards))
    retention.start()
    return retention


def run(settings: Settings, authid: str = "storage") -> int:
    """``python -m components storage``: run until SIGTERM/SIGINT, then commit and exit 0."""
    try:
        reactor, keys, ticket = start_service(settings, authid)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    component = make_component(settings.router, ticket_auth(authid, ticket))
    adapter: StorageAdapter
    try:
        store, service = _open_and_load(settings, keys, lambda acks: adapter.acks_from_writer(acks))
    except (ConfigError, IotError) as err:
        print(f"error: storage cannot start: {err}", file=sys.stderr)
        return 2
    adapter = StorageAdapter(component, service, reactor, start_retention(settings, store, keys))
    adapter.ticker.start(TICK_S, now=False)
    shard = f"{settings.storage.shard}-of-{settings.storage.shards}"
    serve(reactor, settings.monitoring.listen_host, settings.monitoring.storage_port,
          lambda: storage_exposition(service, adapter.retention, shard),
          Health("storage", lambda: adapter.session is not None and not adapter.stopping, store.max_ts, reactor))
    reactor.addSystemEventTrigger("before", "shutdown", adapter.shutdown)
    component.start(reactor)
    reactor.run()
    store.close()
    return 0
