"""The monitoring endpoint of a service: Prometheus metrics and health, over HTTP on a loopback port.

``GET /metrics``
    The Prometheus text format (:mod:`components.core.metrics`), built when scraped.
``GET /health/live``
    200 while the service's reactor answers: the process is not stuck.
``GET /health/ready``
    200 when the WAMP session is up and the store answers (one cheap read on a worker thread), else 503. Both
    answer JSON ``{"service": ..., "pid": ..., "live": ..., "ready": ..., "session": ..., "store": ...}``, so a
    caller can tell that the answer comes from the process it started (:func:`components.ops.waiting.http_ready`).

The port is ``monitoring.storage_port`` / ``monitoring.query_port`` on ``monitoring.listen_host``; 0 turns the
endpoint off. A port that is taken is logged and the service runs on without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, cast

import txaio
from twisted.internet import defer, threads
from twisted.internet.error import CannotListenError
from twisted.web import resource, server
from twisted.web.resource import IResource

from components.core.metrics import CONTENT_TYPE

log = txaio.make_logger()

STORE_CHECK_TIMEOUT_S = 5.0


class Health:
    """What ``/health/*`` reports for one service."""

    def __init__(self, service: str, session_up: Callable[[], bool], store_answers: Callable[[], object],
                 reactor: Any) -> None:
        """``store_answers()`` runs on a worker thread and raises when the store does not answer."""
        self.service = service
        self._session_up = session_up
        self._store_answers = store_answers
        self._reactor = reactor

    @defer.inlineCallbacks
    def ready(self) -> Any:
        """(ready, document) once the store answered or failed (or the check timed out)."""
        session = self._session_up()
        store, detail = True, ""
        try:
            d = threads.deferToThread(self._store_answers)
            d.addTimeout(STORE_CHECK_TIMEOUT_S, self._reactor)
            yield d
        except Exception as err:  # any failure of the store is "not ready", with what it said
            store, detail = False, f"store: {err}"
        if not session:
            detail = "; ".join(filter(None, ["no WAMP session to the router", detail]))
        doc = {"service": self.service, "pid": os.getpid(), "live": True, "ready": session and store,
               "session": session, "store": store}
        if detail:
            doc["detail"] = detail
        return session and store, doc


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], str]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return self._render().encode("utf-8")


def _json(request: Any, code: int, doc: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(doc).encode()


class _HealthPage(resource.Resource):
    isLeaf = True

    def __init__(self, health: Health) -> None:
        super().__init__()
        self._health = health


class _Live(_HealthPage):
    def render_GET(self, request: Any) -> bytes:
        return _json(request, 200, {"service": self._health.service, "pid": os.getpid(), "live": True})


class _Ready(_HealthPage):
    def render_GET(self, request: Any) -> Any:
        def done(result: tuple[bool, dict[str, Any]]) -> None:
            ok, doc = result
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(_json(request, 200 if ok else 503, doc))
                request.finish()

        self._health.ready().addCallback(done)
        return server.NOT_DONE_YET


class _QuietSite(server.Site):
    """A site that logs no line per request: scrapes and health checks are not worth one each."""

    def log(self, request: Any) -> None:
        """Nothing."""


def serve(reactor: Any, host: str, port: int, render_metrics: Callable[[], str], health: Health) -> Any:
    """Listen on ``host:port`` (nothing when ``port`` is 0); the listening port, or None."""
    if port == 0:
        return None
    root = resource.Resource()
    checks = resource.Resource()
    for parent, name, child in ((root, b"metrics", _Metrics(render_metrics)), (checks, b"live", _Live(health)),
                                (checks, b"ready", _Ready(health)), (root, b"health", checks)):
        parent.putChild(name, cast(IResource, child))
    site = _QuietSite(cast(IResource, root))
    site.noisy = False
    try:
        listening = reactor.listenTCP(port, site, interface=host)
    except CannotListenError as err:
        log.warn("{service}: monitoring endpoint not started, {host}:{port} is taken ({err}); set the port "
                 "with monitoring.{service}_port", service=health.service, host=host, port=port, err=err.socketError)
        return None
    log.info("{service}: metrics on http://{host}:{port}/metrics, health on /health/ready and /health/live",
             service=health.service, host=host, port=port)
    return listening
