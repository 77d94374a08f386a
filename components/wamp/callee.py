"""The query callee: registers every query procedure (shared registration, round robin) and answers from
:class:`components.core.query.QueryService` on a worker thread; records each call in the audit log.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import txaio
from autobahn.twisted.component import Component
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import RegisterOptions
from twisted.internet import defer, task, threads

from components.core.errors import ConfigError, IotError, StorageUnavailable
from components.core.query import AuditLog, QueryService
from components.core.settings import Settings
from components.storage.backends import LazyStore, open_store
from components.wamp import uris
from components.wamp.connection import make_component, start_service, ticket_auth, tune_gc

log = txaio.make_logger()

THREADS = {"sqlite": 1, "dynamodb": 8}
"""Worker threads per backend: SQLite work holds the GIL (more threads only contend for it, measured with
``python -m bench http``); DynamoDB calls wait on the network, so several overlap."""


class QueryAdapter:
    """Connects a QueryService and an AuditLog to a WAMP session."""

    def __init__(self, component: Component, service: QueryService, audit: AuditLog, reactor: Any) -> None:
        """Register on join, answer on ``reactor``'s thread pool."""
        self.component = component
        self.service = service
        self.audit = audit
        self.reactor = reactor
        self.calls = 0
        component.on("join", self._on_join)

    @defer.inlineCallbacks
    def _on_join(self, session: Any, details: Any) -> Any:
        options = RegisterOptions(invoke="roundrobin", details_arg="details")
        for procedure in [*self.service.procedures, uris.GET_AUDIT]:
            yield session.register(self._handler(procedure), procedure, options=options)
        log.info("query callee registered {n} procedures as {authid}", n=len(self.service.procedures) + 1,
                 authid=details.authid)

    def _handler(self, procedure: str) -> Callable[..., Any]:
        @defer.inlineCallbacks
        def handle(*args: Any, details: Any = None, **kwargs: Any) -> Any:
            self.calls += 1
            progress = getattr(details, "progress", None)
            authid, authrole = getattr(details, "caller_authid", None), getattr(details, "caller_authrole", None)
            try:
                result = yield threads.deferToThread(self._answer, procedure, args, kwargs, progress)
            except IotError as err:
                self.audit.record(authid, authrole, procedure, list(args), kwargs, None, err.uri)
                raise ApplicationError(err.uri, str(err)) from err
            except Exception as err:
                log.failure("query {procedure} failed", procedure=procedure)
                self.audit.record(authid, authrole, procedure, list(args), kwargs, None, "internal_error")
                raise ApplicationError("wamp.error.runtime_error", f"{procedure} failed: {err}") from err
            rows, value = result
            self.audit.record(authid, authrole, procedure, list(args), kwargs, rows)
            return value

        return handle

    def _answer(self, procedure: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                progress: Callable[..., Any] | None) -> tuple[int | None, Any]:
        """On a worker thread: compute the answer; stream chunks through ``progress`` when asked."""
        if procedure == uris.GET_AUDIT:
            entries = self.audit.read(list(args), kwargs)
            return len(entries), entries
        streaming = progress is not None and procedure.startswith("iot.fetch_")
        result = self.service.call(procedure, args, kwargs, progressive=streaming)
        if not streaming:
            return (len(result) if isinstance(result, list) else None), result
        rows, last = 0, list[Any]()
        for chunk in result:
            if last:
                self.reactor.callFromThread(progress, last)
            rows += len(chunk)
            last = chunk
        return rows, last

    def flush_audit(self) -> Any:
        """Write buffered audit entries (on a worker thread)."""
        d = threads.deferToThread(self.audit.flush)
        d.addErrback(lambda f: log.warn("audit write failed, will retry: {err}", err=f.value))
        return d


def run(settings: Settings, authid: str = "query") -> int:
    """``python -m components query``: register and answer until SIGTERM/SIGINT."""
    try:
        reactor, keys, ticket = start_service(settings, authid)
        store = LazyStore(lambda: open_store(settings.storage))
        store.max_ts()  # fail early on a wrong setting; a backend that is merely down is retried per call
    except StorageUnavailable as err:
        log.warn("storage backend unavailable at start ({err}); answering storage_unavailable until it is back",
                 err=err)
    except (ConfigError, IotError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tune_gc()
    reactor.suggestThreadPoolSize(THREADS[settings.storage.backend])
    service = QueryService(settings.query, store, keys)
    audit = AuditLog(store, keys, f"{socket.gethostname()}:{os.getpid()}", settings.query.max_results)
    component = make_component(settings.router, ticket_auth(authid, ticket))
    adapter = QueryAdapter(component, service, audit, reactor)
    flusher = task.LoopingCall(adapter.flush_audit)
    flusher.start(settings.query.audit_flush_s, now=False)

    @defer.inlineCallbacks
    def shutdown() -> Any:
        if flusher.running:
            flusher.stop()
        yield adapter.flush_audit()
        if component._done_f is not None:
            yield component.stop()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    component.start(reactor)
    reactor.run()
    store.close()
    return 0
