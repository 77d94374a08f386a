"""Shared pieces of the WAMP adapters: connecting with retry, authentication, error mapping."""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import txaio
from autobahn.twisted.component import Component
from autobahn.twisted.wamp import Session as _ComponentSession
from autobahn.wamp.exception import ApplicationError
from twisted.internet import defer

from components.core.errors import IotError
from components.core.sealing import KeySource
from components.core.settings import RouterSettings, Settings, setup_logging
from components.ops.credentials import CredentialStore
from components.ops.supervisor import ready_line
from components.wamp.uris import error_uri

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Session(_ComponentSession):
    """A component session that does not log the project's own errors answered to callers.

    A caller's bad argument is answered with ``iot.error.*``; logging each one would let any caller
    flood the log. Other errors are still logged with their traceback.
    """

    def onUserError(self, fail: Any, msg: str) -> None:
        """Skip ``iot.error.*`` answers; log the rest."""
        err = getattr(fail, "value", None)
        if isinstance(err, ApplicationError) and err.error.startswith("iot.error."):
            return
        super().onUserError(fail, msg)


def ticket_auth(authid: str, ticket: str) -> dict[str, Any]:
    """Authentication settings for a service or person logging in with a ticket."""
    return {"ticket": {"authid": authid, "ticket": ticket}}


def device_auth(device_id: str, private_key_hex: str) -> dict[str, Any]:
    """Authentication settings for a device logging in with its cryptosign key."""
    return {"cryptosign": {"authid": device_id, "privkey": private_key_hex}}


def make_component(router: RouterSettings, authentication: dict[str, Any], *, serializer: str | None = None,
                   max_retries: int = -1) -> Component:
    """An autobahn Component that connects to the router and reconnects (with backoff) until stopped."""
    transport: dict[str, Any] = {
        "type": "websocket",
        "url": router.url,
        "serializers": [serializer or router.serializer],
        "max_retries": max_retries,
        "initial_retry_delay": 0.25,
        "max_retry_delay": 3.0,
        "retry_delay_growth": 1.5,
        "retry_delay_jitter": 0.1,
        "options": {
            "auto_ping_interval": router.auto_ping_interval_s,
            "auto_ping_timeout": router.auto_ping_timeout_s,
            "max_message_payload_size": MAX_MESSAGE_BYTES,
            "max_frame_payload_size": MAX_MESSAGE_BYTES,
            "open_handshake_timeout": 10,
        },
    }
    if router.url.startswith("wss://") and router.tls_trust_root:
        parsed = urlparse(router.url)
        transport["endpoint"] = {"type": "tcp", "host": parsed.hostname, "port": parsed.port or 443,
                                 "tls": {"hostname": parsed.hostname, "trust_root": router.tls_trust_root}}
    return Component(transports=[transport], realm=router.realm, authentication=authentication,
                     session_factory=Session)


F = TypeVar("F", bound=Callable[..., Any])


def wamp_errors(fn: F) -> F:
    """Turn the project's exceptions into WAMP errors (``iot.error.*``), keeping the cause."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def translate(failure: Any) -> Any:
            err = failure.value
            if isinstance(err, IotError):
                raise ApplicationError(error_uri(err), str(err)) from err
            return failure

        try:
            result = fn(*args, **kwargs)
        except IotError as err:
            raise ApplicationError(error_uri(err), str(err)) from err
        if isinstance(result, defer.Deferred):
            result.addErrback(translate)
        return result

    return wrapper  # type: ignore[return-value]


def start_service(settings: Settings, authid: str) -> tuple[Any, KeySource, str]:
    """Entry-point set-up shared by the services: logging, the reactor, the key source and the service's ticket.

    Raises ConfigError (a missing ticket, a bad key setting) for the caller to report.
    """
    setup_logging(settings.log_level)
    txaio.use_twisted()
    txaio.start_logging(level=settings.log_level)
    from twisted.internet import reactor

    keys = KeySource(settings.keys, os.environ)
    ticket = os.environ.get("IOT_TICKET") or CredentialStore(settings.paths.secrets_dir).ticket(authid)
    return reactor, keys, ticket


def announce_ready(name: str) -> None:
    """Tell whoever started this service that it is ready (subscribed, registered): one machine-readable line.

    ``{"ready": "storage", "pid": N}`` on the process's real stdout (txaio's logging has replaced ``sys.stdout``
    with a logger that would put a timestamp in front), which the supervisor waits for (components.ops.supervisor).
    """
    out = sys.__stdout__ or sys.stdout
    out.write(ready_line(name) + "\n")
    out.flush()


GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect cyclic garbage less often, and never look at what start-up loaded again.

    A service builds answers of thousands of small dicts and lists that hold no cycles; with the default
    thresholds (700, 10, 10) the collector ran every few hundred of them and walked the whole heap (the
    decrypted batch cache included) many times per answer.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
