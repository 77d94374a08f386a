"""Metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Nothing here runs per reading: counters that storage keeps anyway are read when a scrape asks for them, and a
:class:`Histogram` is observed once per commit or per query call. A scrape builds the text with
:class:`Exposition`; the WAMP adapters serve it (:mod:`components.wamp.monitoring`).
"""

from __future__ import annotations

import bisect
import math
import os
import resource
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.core.ingest import IngestService
    from components.core.retention import Retention

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the latency histograms' buckets."""
_STARTED = time.time()


class Histogram:
    """Counts of observations per bucket, their sum and number (thread-safe: observed and read on any thread)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        """Buckets with these upper bounds, and +Inf."""
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one observation."""
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float, int]:
        """(cumulative count per bucket, +Inf last; sum; count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, running


def _labels(labels: Mapping[str, str] | None, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in (labels or {}).items()]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """One scrape's text: families of samples, each with its HELP and TYPE lines."""

    def __init__(self) -> None:
        """Empty."""
        self._lines: list[str] = []

    def _head(self, name: str, kind: str, doc: str) -> None:
        self._lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]

    def counter(self, name: str, doc: str, samples: Iterable[tuple[Mapping[str, str] | None, float]]) -> None:
        """A counter family (``name`` ends in ``_total``)."""
        self._head(name, "counter", doc)
        self._lines += [f"{name}{_labels(labels)} {_number(v)}" for labels, v in samples]

    def gauge(self, name: str, doc: str, samples: Iterable[tuple[Mapping[str, str] | None, float]]) -> None:
        """A gauge family."""
        self._head(name, "gauge", doc)
        self._lines += [f"{name}{_labels(labels)} {_number(v)}" for labels, v in samples]

    def histogram(self, name: str, doc: str, samples: Iterable[tuple[Mapping[str, str] | None, Histogram]]) -> None:
        """A histogram family: ``_bucket`` lines per upper bound, ``_sum`` and ``_count``."""
        self._head(name, "histogram", doc)
        for labels, h in samples:
            cumulative, total, count = h.snapshot()
            for bound, c in zip((*h.buckets, math.inf), cumulative, strict=True):
                le = f'le="{_number(bound)}"'
                self._lines.append(f"{name}_bucket{_labels(labels, le)} {c}")
            self._lines += [f"{name}_sum{_labels(labels)} {_number(total)}", f"{name}_count{_labels(labels)} {count}"]

    def process(self) -> None:
        """The process's resident memory, CPU time and start time (the names Prometheus' clients use)."""
        self.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", [(None, resident_bytes())])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                     [(None, usage.ru_utime + usage.ru_stime)])
        self.gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                   [(None, _STARTED)])

    def text(self) -> str:
        """The exposition, ending in a newline."""
        return "\n".join(self._lines) + "\n"


def resident_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; the peak where there is no /proc)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def storage_exposition(service: IngestService, retention: Retention | None, shard: str) -> str:
    """Storage's metrics: its counters (read, not counted again), commit latency, queue, compaction, retention."""
    stats = service.stats()
    one = {"shard": shard}
    out = Exposition()
    for key, doc in (("received", "Readings received (valid or not)."),
                     ("stored", "Readings durably committed."),
                     ("shed", "Readings dropped unacknowledged while the writer queue was full."),
                     ("duplicates", "Readings dropped as duplicates of committed ones."),
                     ("out_of_order", "Readings dropped after a gap in their seq (the device sends again).")):
        out.counter(f"iot_readings_{key}_total", doc, [(one, stats[key])])
    out.counter("iot_readings_rejected_total", "Readings refused, by reason.",
                [({**one, "reason": reason}, n) for reason, n in sorted(stats["rejected"].items())])
    out.counter("iot_batches_committed_total", "Write batches committed.", [(one, stats["batches"])])
    out.counter("iot_stored_bytes_total", "Sealed bytes written.", [(one, stats["bytes"])])
    out.gauge("iot_writer_queue_depth", "Closed batches waiting for the writer.", [(one, stats["queue_depth"])])
    out.histogram("iot_commit_seconds", "Time of one store commit (batches, device rows, counters).",
                  [(one, service.commit_seconds)])
    compactor = service.compactor
    out.gauge("iot_compaction_lag_seconds", "How long the oldest window due for compaction has waited "
              "(as of the latest pass; 0: none waits).", [(one, compactor.lag())])
    out.counter("iot_compaction_passes_total", "Compaction passes run.", [(one, compactor.passes)])
    if retention is not None:
        total = retention.total
        out.counter("iot_retention_removed_records_total", "Write batches and segments deleted by retention.",
                    [(one, total.records)])
        out.counter("iot_retention_removed_readings_total", "Readings in the records retention deleted.",
                    [(one, total.readings)])
        out.gauge("iot_retention_cutoff_timestamp_seconds", "Records whose newest reading is older are deleted.",
                  [(one, retention.cutoff())])
    out.process()
    return out.text()
