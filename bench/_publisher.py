"""A publisher process of the ingest benchmark: device sessions publishing pre-generated readings.

Each device logs in with its own cryptosign key (as ``devices/`` does) and keeps at most ``--window``
publishes waiting for the router's acknowledgement, like :class:`devices.publisher.DevicePublisher`.
Readings carry a per-device ``seq``; when storage repeats an ack (it dropped readings after a gap, e.g.
while shedding) the device goes back and sends again from there. The payloads are generated before the
run: only the ``seq`` fields are set at publish time, so the process does little but publish.

Protocol with the benchmark: prints its ready line (``{"ready": "publisher", ...}``) once every device is
connected, waits for a line on stdin, publishes for ``--duration`` seconds, waits for its last
acknowledgements, writes ``--report`` (JSON) and exits.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import txaio
from autobahn.twisted.component import Component
from autobahn.wamp.types import PublishOptions
from twisted.internet import defer

from components.core.settings import load_settings
from components.ops.credentials import CredentialStore
from components.wamp import uris
from components.wamp.connection import announce_ready, device_auth, make_component

ACK = PublishOptions(acknowledge=True)
POOL = 64
"""Pre-generated events per device (reused round robin; only their seq changes)."""
GO_BACK_MIN_S = 0.5
DRAIN_S = 10.0
CONNECT_S = 60.0


class DeviceLoop:
    """One device: a session, a pool of events, a window of acknowledged publishes, go-back on repeated acks."""

    def __init__(self, component: Component, device_id: str, batch: int, window: int, seed: int) -> None:
        """Publish events of ``batch`` readings through ``component``, ``window`` at a time."""
        self.component = component
        self.device_id = device_id
        self.window = window
        rng = random.Random(f"{seed}:{device_id}")
        now = time.time()
        self.pool: list[tuple[str, Any, list[dict[str, Any]]]] = []
        for k in range(POOL):
            sensor_type = ("humidity", "temperature")[k % 2]
            readings = [{"value": round(rng.uniform(0.0, 100.0), 2), "ts": round(now - rng.uniform(0.0, 60.0), 6),
                         "seq": 0} for _ in range(batch)]
            self.pool.append((uris.sensor_topic(device_id, sensor_type),
                              readings[0] if batch == 1 else readings, readings))
        self.session: Any = None
        self.joined: defer.Deferred[None] = defer.Deferred()
        self.running = False
        self.deadline = 0.0
        self.k = 0
        self.next_seq = 1
        self.acked = 0
        self.inflight = 0
        self.events = 0
        self.readings = 0
        self.failed = 0
        self.resends = 0
        self.acks = 0
        self._last_go_back = 0.0
        self._idle: defer.Deferred[None] | None = None
        component.on("join", self._on_join)
        component.on("leave", self._on_leave)

    @defer.inlineCallbacks
    def _on_join(self, session: Any, details: Any) -> Any:
        yield session.subscribe(self._on_ack, uris.ack_topic(self.device_id))
        self.session = session
        self.inflight = 0
        if not self.joined.called:
            self.joined.callback(None)
        self.pump()

    def _on_leave(self, session: Any, details: Any) -> None:
        self.session = None

    def _on_ack(self, payload: Any = None, *args: Any, **kwargs: Any) -> None:
        seq = payload.get("seq") if isinstance(payload, dict) else None
        if type(seq) is not int:
            return
        self.acks += 1
        if seq > self.acked:
            self.acked = seq
        elif seq == self.acked and self.next_seq > seq + 1 and time.monotonic() - self._last_go_back >= GO_BACK_MIN_S:
            self._last_go_back = time.monotonic()
            self.next_seq = seq + 1  # storage saw a gap: send again from the first unacknowledged reading
            self.resends += 1

    def start(self, deadline: float) -> None:
        """Publish until ``deadline`` (time.monotonic())."""
        self.deadline = deadline
        self.running = True
        self.pump()

    def pump(self) -> None:
        """Fill the window."""
        session = self.session
        if session is None:
            return
        while self.running and self.inflight < self.window:
            if time.monotonic() >= self.deadline:
                self.running = False
                break
            topic, payload, readings = self.pool[self.k % POOL]
            self.k += 1
            seq = self.next_seq
            for r in readings:
                r["seq"] = seq
                seq += 1
            self.next_seq = seq
            self.inflight += 1
            d = session.publish(topic, payload, options=ACK)
            d.addCallbacks(self._published, self._failed, callbackArgs=(len(readings),))
        self._check_idle()

    def _published(self, _: Any, n: int) -> None:
        self.inflight -= 1
        self.events += 1
        self.readings += n
        self.pump()

    def _failed(self, failure: Any) -> None:
        self.inflight -= 1
        self.failed += 1
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.running and self.inflight <= 0 and self._idle is not None and not self._idle.called:
            self._idle.callback(None)

    def idle(self) -> defer.Deferred[None]:
        """Fires once publishing stopped and nothing is in flight."""
        self._idle = defer.Deferred()
        self._check_idle()
        return self._idle


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m bench._publisher --config C --devices 0,1 --batch 100 --duration 15 --report R``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--devices", required=True, help="comma-separated device ids (provisioned)")
    parser.add_argument("--serializer", default="msgpack", choices=("msgpack", "json"))
    parser.add_argument("--batch", type=int, default=1, help="readings per event")
    parser.add_argument("--window", type=int, default=16, help="publishes awaiting acknowledgement per device")
    parser.add_argument("--duration", type=float, required=True, help="seconds of publishing after 'go'")
    parser.add_argument("--report", required=True, help="JSON file written at the end")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    settings = load_settings(args.config, environ={})
    txaio.use_twisted()
    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor
    store = CredentialStore(settings.paths.secrets_dir)
    loops = [DeviceLoop(make_component(settings.router, device_auth(d, store.device_key(d)),
                                       serializer=args.serializer), d, args.batch, args.window, args.seed)
             for d in args.devices.split(",") if d]
    report: dict[str, Any] = {"devices": len(loops), "batch": args.batch, "window": args.window}
    def wait_for_go() -> None:
        line = sys.stdin.readline()
        if line:
            reactor.callFromThread(start)
        else:
            reactor.callFromThread(finish, "stdin closed before go")

    def start() -> None:
        report["t_go"] = time.time()
        deadline = time.monotonic() + args.duration
        for loop in loops:
            loop.start(deadline)
        reactor.callLater(args.duration, drain)

    @defer.inlineCallbacks
    def drain() -> Any:
        report["t_stop"] = time.time()
        idle = defer.DeferredList([loop.idle() for loop in loops])
        timeout = reactor.callLater(DRAIN_S, idle.cancel)
        try:
            yield idle
        except defer.CancelledError:
            report["drain_timeout"] = True
        if timeout.active():
            timeout.cancel()
        finish(None)

    done = False

    def finish(error: str | None) -> None:
        nonlocal done
        if done:
            return
        done = True
        report.update(t_end=time.time(), error=error,
                      events=sum(x.events for x in loops), readings=sum(x.readings for x in loops),
                      failed=sum(x.failed for x in loops), resends=sum(x.resends for x in loops),
                      acks=sum(x.acks for x in loops), acked_seq=sum(x.acked for x in loops),
                      sent_seq=sum(x.next_seq - 1 for x in loops))
        Path(args.report).write_text(json.dumps(report), encoding="utf-8")
        stops = [x.component.stop() for x in loops if x.component._done_f is not None]
        d = defer.DeferredList(stops)
        d.addBoth(lambda _: reactor.stop())
        reactor.callLater(5.0, lambda: reactor.running and reactor.stop())

    @defer.inlineCallbacks
    def ready() -> Any:
        yield defer.DeferredList([loop.joined for loop in loops])
        announce_ready("publisher")
        threading.Thread(target=wait_for_go, name="go", daemon=True).start()

    def connect_timeout() -> None:
        if not all(loop.joined.called for loop in loops):
            finish("devices did not connect in time")

    for loop in loops:
        loop.component.start(reactor)
    reactor.callWhenRunning(ready)
    reactor.callLater(CONNECT_S, connect_timeout)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: finish("stopped by a signal"))
    reactor.run()
    return 0 if report.get("error") is None else 1


if __name__ == "__main__":
    sys.exit(main())
