"""The router-only ceiling's subscriber: receives every ``iot.sensor.`` event like storage does, only counts.

It logs in as storage does (ticket ``storage``), subscribes to the same prefix with the same options, and
counts events and readings; every 0.1 s it notes (time, events, readings). On SIGTERM it writes those
samples to ``--report`` (JSON) and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import txaio
from autobahn.wamp.types import SubscribeOptions
from twisted.internet import defer, task

from components.core.settings import load_settings
from components.ops.credentials import CredentialStore
from components.wamp import uris
from components.wamp.connection import announce_ready, make_component, ticket_auth

SAMPLE_S = 0.1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m bench._counter --config C --report R``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--authid", default="storage")
    args = parser.parse_args(argv)

    settings = load_settings(args.config, environ={})
    txaio.use_twisted()
    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor
    ticket = CredentialStore(settings.paths.secrets_dir).ticket(args.authid)
    component = make_component(settings.router, ticket_auth(args.authid, ticket))
    counts = [0, 0]
    samples: list[tuple[float, int, int]] = []

    def on_event(*event_args: Any, details: Any = None, **kwargs: Any) -> None:
        payload = event_args[0] if event_args else None
        counts[0] += 1
        counts[1] += len(payload) if type(payload) is list else 1

    @defer.inlineCallbacks
    def on_join(session: Any, details: Any) -> Any:
        yield session.subscribe(on_event, uris.SENSOR_PREFIX,
                                options=SubscribeOptions(match="prefix", details_arg="details"))
        print("counter subscribed", flush=True)
        announce_ready("counter")

    def sample() -> None:
        samples.append((time.time(), counts[0], counts[1]))

    def write_report() -> None:
        sample()
        Path(args.report).write_text(json.dumps({"samples": samples}), encoding="utf-8")

    component.on("join", on_join)
    sampler = task.LoopingCall(sample)
    sampler.start(SAMPLE_S)
    reactor.addSystemEventTrigger("before", "shutdown", write_report)
    component.start(reactor)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
