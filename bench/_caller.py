"""The query benchmarks' WAMP caller: calls procedures one at a time and writes each call's latency.

``--spec`` is a JSON file ``{"cases": [{"name", "procedure", "args", "kwargs", "calls", "warmup",
"max_seconds", "expect"}]}``; ``--report`` receives ``{"cases": {name: {"latencies_ms", "rows", "errors"}}}``.
It logs in with a ticket (``dashboard``, role reader, by default) and exits when done.
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
from twisted.internet import defer

from components.core.settings import load_settings
from components.ops.credentials import CredentialStore
from components.wamp.connection import make_component, ticket_auth


@defer.inlineCallbacks
def run_cases(session: Any, cases: list[dict[str, Any]]) -> Any:
    """Every case in turn: warm-up calls, then timed calls (bounded by count and seconds)."""
    out: dict[str, Any] = {}
    for case in cases:
        args, kwargs = case.get("args", []), case.get("kwargs", {})
        rows, errors, latencies = None, 0, []
        for _ in range(case.get("warmup", 0)):
            result = yield session.call(case["procedure"], *args, **kwargs)
            rows = len(result) if isinstance(result, list) else None
        deadline = time.monotonic() + case.get("max_seconds", 120.0)
        for _ in range(case["calls"]):
            t = time.perf_counter()
            try:
                result = yield session.call(case["procedure"], *args, **kwargs)
            except Exception:  # counted: a failing call must not end the benchmark
                errors += 1
                continue
            latencies.append((time.perf_counter() - t) * 1000)
            rows = len(result) if isinstance(result, list) else None
            if time.monotonic() > deadline:
                break
        expect = case.get("expect")
        if expect is not None and rows != expect:
            errors += 1
        out[case["name"]] = {"latencies_ms": latencies, "rows": rows, "errors": errors}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m bench._caller --config C --spec S --report R``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--authid", default="dashboard")
    parser.add_argument("--serializer", default="msgpack", choices=("msgpack", "json"))
    args = parser.parse_args(argv)

    settings = load_settings(args.config, environ={})
    cases = json.loads(Path(args.spec).read_text(encoding="utf-8"))["cases"]
    txaio.use_twisted()
    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor
    ticket = CredentialStore(settings.paths.secrets_dir).ticket(args.authid)
    component = make_component(settings.router, ticket_auth(args.authid, ticket), serializer=args.serializer,
                               max_retries=0)
    status = {"code": 1}

    @defer.inlineCallbacks
    def on_join(session: Any, details: Any) -> Any:
        try:
            report = yield run_cases(session, cases)
            Path(args.report).write_text(json.dumps({"cases": report}), encoding="utf-8")
            status["code"] = 0
        except Exception as err:
            print(f"caller failed: {err!r}", flush=True)
        finally:
            yield component.stop()
            if reactor.running:
                reactor.stop()

    component.on("join", on_join)
    component.start(reactor)
    reactor.run()
    return status["code"]


if __name__ == "__main__":
    sys.exit(main())
