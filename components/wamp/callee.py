"""The query callee: registers every query procedure (shared registration, round robin) and answers from
:class:`components.core.query.QueryService` on a worker thread; records each call in the audit log.

:data:`PROCEDURES` maps each URI to its method and the shape of its WAMP arguments; :func:`answer` decodes
positional and keyword arguments into that method's typed arguments.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import txaio
from autobahn.twisted.component import Component
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import RegisterOptions
from twisted.internet import defer, task, threads

from components.core.audit import AuditLog
from components.core.errors import ConfigError, InvalidArgument, IotError, StorageUnavailable
from components.core.metrics import Exposition, Histogram
from components.core.query import QueryService
from components.core.settings import Settings
from components.storage.backends import LazyStore, open_store
from components.wamp import uris
from components.wamp.connection import (
    announce_ready,
    make_component,
    start_service,
    ticket_auth,
    tune_gc,
    wamp_errors,
)
from components.wamp.monitoring import Health, serve

log = txaio.make_logger()

THREADS = {"sqlite": 1, "dynamodb": 8}
"""Worker threads per backend: SQLite work holds the GIL (more threads only contend for it, measured with
``python -m bench http``); DynamoDB calls wait on the network, so several overlap."""


@dataclass(frozen=True)
class Procedure:
    """How a procedure's WAMP arguments map to its method (of the QueryService, or the AuditLog for audit)."""

    method: str
    positional: tuple[str, ...] = ()
    filters: frozenset[str] = frozenset()
    optional: tuple[str, ...] = ()
    streams: bool = False


FETCH_FILTERS = frozenset({"device_id", "sensor_type", "limit"})
SUMMARY_FILTERS = frozenset({"device_id", "sensor_type"})
PROCEDURES = {
    uris.FETCH_BETWEEN_WINDOW: Procedure("fetch_between_window", ("start", "end"), FETCH_FILTERS, streams=True),
    uris.FETCH_SINCE: Procedure("fetch_since", ("start",), FETCH_FILTERS, streams=True),
    uris.FETCH_LAST_N_SEC: Procedure("fetch_last_n_sec", ("n",), FETCH_FILTERS, streams=True),
    uris.FETCH_LAST_WINDOW: Procedure("fetch_last_window", ("n",), FETCH_FILTERS, streams=True),
    uris.FETCH_ALL: Procedure("fetch_all", (), FETCH_FILTERS, streams=True),
    uris.GET_MAX_REL_TIME: Procedure("get_max_rel_time", (), SUMMARY_FILTERS),
    uris.LIST_DEVICES: Procedure("list_devices", (), frozenset({"device_id"})),
    uris.GET_LATEST: Procedure("get_latest", (), SUMMARY_FILTERS),
    uris.AGGREGATE: Procedure("aggregate", ("start", "end", "bucket"), SUMMARY_FILTERS),
    uris.GET_AUDIT: Procedure("read", ("since",), frozenset({"limit"}), optional=("since",)),
    uris.GET_STATS: Procedure("get_stats"),
}


def decode(procedure: str, args: list[Any] | tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The method's keyword arguments: positional ones (also accepted by name), then the allowed filters."""
    spec = PROCEDURES[procedure]
    kwargs = dict(kwargs)
    values = list(args)
    for name in spec.positional[len(values):]:
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif name in spec.optional:
            values.append(None)
    if len(values) != len(spec.positional):
        short = procedure.rsplit(".", 1)[-1]
        raise InvalidArgument(f"{short} takes {len(spec.positional)} argument(s) "
                              f"({', '.join(spec.positional) or 'none'}), got {len(args)}")
    for key in sorted(set(kwargs) - spec.filters):
        known = ", ".join(sorted(spec.filters)) or "none"
        raise InvalidArgument(f"{procedure} has no keyword argument {key!r} (accepted: {known})")
    return dict(zip(spec.positional, values, strict=True)) | kwargs


def answer(target: QueryService | AuditLog, procedure: str, args: list[Any] | tuple[Any, ...],
           kwargs: dict[str, Any], progressive: bool = False) -> Any:
    """Call ``procedure``'s method of ``target``; fetches with ``progressive`` return an iterator of chunks."""
    spec = PROCEDURES[procedure]
    call = decode(procedure, args, kwargs)
    if progressive and spec.streams:
        call["progressive"] = True
    return getattr(target, spec.method)(**call)


class QueryAdapter:
    """Connects a QueryService and an AuditLog to a WAMP session."""

    def __init__(self, component: Component, service: QueryService, audit: AuditLog, reactor: Any) -> None:
        """Register on join, answer on ``reactor``'s thread pool."""
        self.component = component
        self.service = service
        self.audit = audit
        self.reactor = reactor
        self.calls = 0
        self.session: Any = None
        self.latency = {procedure: Histogram() for procedure in PROCEDURES}
        """Seconds per call (answered or failed), per procedure; a call's count is its histogram's."""
        self.errors: Counter[tuple[str, str]] = Counter()
        """Failed calls by (procedure, error URI)."""
        component.on("join", self._on_join)
        component.on("leave", self._on_leave)

    @defer.inlineCallbacks
    def _on_join(self, session: Any, details: Any) -> Any:
        options = RegisterOptions(invoke="roundrobin", details_arg="details")
        for procedure in PROCEDURES:
            yield session.register(self._handler(procedure), procedure, options=options)
        log.info("query callee registered {n} procedures as {authid}", n=len(PROCEDURES), authid=details.authid)
        self.session = session
        announce_ready("query")

    def _on_leave(self, session: Any, details: Any) -> None:
        self.session = None

    def _handler(self, procedure: str) -> Callable[..., Any]:
        @wamp_errors
        @defer.inlineCallbacks
        def handle(*args: Any, details: Any = None, **kwargs: Any) -> Any:
            self.calls += 1
            started = time.perf_counter()
            progress = getattr(details, "progress", None)
            authid, authrole = getattr(details, "caller_authid", None), getattr(details, "caller_authrole", None)
            try:
                result = yield threads.deferToThread(self._answer, procedure, args, kwargs, progress)
            except IotError as err:
                self._count(procedure, started, uris.error_uri(err))
                self.audit.record(authid, authrole, procedure, list(args), kwargs, None, uris.error_uri(err))
                raise
            except Exception as err:
                log.failure("query {procedure} failed", procedure=procedure)
                self._count(procedure, started, "wamp.error.runtime_error")
                self.audit.record(authid, authrole, procedure, list(args), kwargs, None, "internal_error")
                raise ApplicationError("wamp.error.runtime_error", f"{procedure} failed: {err}") from err
            self._count(procedure, started)
            rows, value = result
            self.audit.record(authid, authrole, procedure, list(args), kwargs, rows)
            return value

        return handle

    def _count(self, procedure: str, started: float, error: str | None = None) -> None:
        self.latency[procedure].observe(time.perf_counter() - started)
        if error is not None:
            self.errors[procedure, error] += 1

    def metrics(self) -> str:
        """The callee's metrics: calls and latency per procedure, errors by URI, the process."""
        out = Exposition()
        out.counter("iot_query_calls_total", "Calls answered or failed, per procedure.",
                    [({"procedure": p}, h.snapshot()[2]) for p, h in self.latency.items()])
        out.counter("iot_query_errors_total", "Failed calls, per procedure and error URI.",
                    [({"procedure": p, "error": e}, n) for (p, e), n in sorted(self.errors.items())])
        out.histogram("iot_query_seconds", "Time to answer a call, per procedure.",
                      [({"procedure": p}, h) for p, h in self.latency.items()])
        out.process()
        return out.text()

    def _answer(self, procedure: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                progress: Callable[..., Any] | None) -> tuple[int | None, Any]:
        """On a worker thread: compute the answer; stream chunks through ``progress`` when asked."""
        target = self.audit if procedure == uris.GET_AUDIT else self.service
        result = answer(target, procedure, args, kwargs, progressive=progress is not None)
        if not isinstance(result, Iterator):
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
    service = QueryService(settings.query, store, keys, tag_bits=settings.storage.device_tag_bits)
    audit = AuditLog(store, keys, f"{socket.gethostname()}:{os.getpid()}", settings.query.max_results)
    component = make_component(settings.router, ticket_auth(authid, ticket))
    adapter = QueryAdapter(component, service, audit, reactor)
    serve(reactor, settings.monitoring.listen_host, settings.monitoring.query_port, adapter.metrics,
          Health("query", lambda: adapter.session is not None, lambda: store.max_ts(), reactor))  # opened when asked
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
