"""The HTTP bridge benchmark's router-only baseline: a callee that answers one procedure with a fixed answer.

It logs in as the query callee does (ticket ``query``, role query), registers ``--procedure`` with the
same options, and returns the JSON value of ``--answer`` to every call without looking at its arguments:
the router, the bridge and the serialization do all their work, the callee none. Stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import txaio
from autobahn.wamp.types import RegisterOptions
from twisted.internet import defer

from components.core.settings import load_settings
from components.ops.credentials import CredentialStore
from components.wamp.connection import announce_ready, make_component, ticket_auth


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m bench._echo_callee --config C --procedure P --answer A.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--procedure", required=True)
    parser.add_argument("--answer", required=True, help="JSON file holding the value every call returns")
    parser.add_argument("--authid", default="query")
    args = parser.parse_args(argv)

    settings = load_settings(args.config, environ={})
    answer = json.loads(Path(args.answer).read_text(encoding="utf-8"))
    txaio.use_twisted()
    from twisted.internet import reactor as default_reactor

    reactor: Any = default_reactor
    ticket = CredentialStore(settings.paths.secrets_dir).ticket(args.authid)
    component = make_component(settings.router, ticket_auth(args.authid, ticket))
    calls = [0]

    def handle(*call_args: Any, details: Any = None, **kwargs: Any) -> Any:
        calls[0] += 1
        return answer

    @defer.inlineCallbacks
    def on_join(session: Any, details: Any) -> Any:
        yield session.register(handle, args.procedure,
                               options=RegisterOptions(invoke="roundrobin", details_arg="details"))
        print("echo callee registered", flush=True)
        announce_ready("echo")

    def on_stop() -> None:
        print(f"echo callee answered {calls[0]} calls", flush=True)

    component.on("join", on_join)
    reactor.addSystemEventTrigger("before", "shutdown", on_stop)
    component.start(reactor)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
