"""Retention on SQLite: how fast old records go, and how long storage's writer waits meanwhile.

A store holds ``OLD`` write batches past the retention (2 KiB sealed bodies, a batch a second per device group
over days) and a day of young ones. A writer thread commits as storage does (ten new batches and their device
rows in one transaction, every 20 ms) for a while alone, then while :class:`~components.core.retention.Retention`
deletes every old record in its small transactions. The figures: records deleted per second, the longest
deleting transaction, and the writer's commit latency (p50, p99, max) alone and during retention;
``ratio`` is the writer's p99 during retention ÷ alone.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.entry import Options, run_main
from bench.results import emit, note, percentile, ratio
from bench.stack import workspace
from components.core.retention import DAY_S, DELETE_CHUNK, Retention, record_name
from components.core.sealing import KeyRing
from components.storage.interface import SealedBatch, SealedState
from components.storage.sqlite import SqliteBatchStore

COLUMNS = {"retention": ["deleted", "deleted_per_s", "longest_txn_ms", "writer_p99_ms_alone",
                         "writer_p99_ms_during", "writer_max_ms_during", "ratio"]}
BODY = 2048
WRITE_EVERY_S = 0.02
NOW = 100 * DAY_S


def _batch(i: int, hi: float) -> SealedBatch:
    return SealedBatch(f"b{i:012d}", int(hi // DAY_S), hi - 1.0, hi, hi, hi + 0.5, 50, "k", os.urandom(BODY), 1,
                       1 + i % 256)


def _fill(store: SqliteBatchStore, old: int) -> None:
    """``old`` batches ending before the cutoff (retention of 10 days), then a day of young ones."""
    cutoff = NOW - 10 * DAY_S
    young = old // 10
    records = [_batch(i, cutoff - 1.0 - (old - i) * 0.25) for i in range(old)]
    records += [_batch(old + i, cutoff + 1.0 + i) for i in range(young)]
    for start in range(0, len(records), 2000):
        store.commit(records[start:start + 2000], [])


def _writer(store: SqliteBatchStore, stop: threading.Event, latencies: list[float]) -> None:
    n = 0
    while not stop.wait(WRITE_EVERY_S):
        batches = [SealedBatch(f"w{n}-{k}", 0, NOW + n, NOW + n + 1, NOW, NOW + 1, 10, "k", os.urandom(1024), 1, k)
                   for k in range(10)]
        rows = [SealedState(f"device/{n % 1000:04d}{k}", "k", os.urandom(300)) for k in range(10)]
        started = time.perf_counter()
        store.commit(batches, rows)
        latencies.append(time.perf_counter() - started)
        n += 1


def run(opts: Options) -> list[dict[str, Any]]:
    """One store, the writer alone for a few seconds, then the writer during a retention pass."""
    old = 20_000 if opts.quick else 200_000
    alone_s = 2.0 if opts.quick else 5.0
    ring = KeyRing.of([os.urandom(32)], os.urandom(32))
    with workspace("retention", opts) as root:
        store = SqliteBatchStore(root / "store.sqlite3")
        note(f"retention: filling {old} old and {old // 10} young batches")
        _fill(store, old)
        size_before = os.path.getsize(root / "store.sqlite3")
        alone: list[float] = []
        during: list[float] = []
        stop = threading.Event()
        writer = threading.Thread(target=_writer, args=(store, stop, alone))
        writer.start()
        time.sleep(alone_s)  # the writer's own pace, measured alone
        stop.set()
        writer.join()
        stop.clear()
        writer = threading.Thread(target=_writer, args=(store, stop, during))
        writer.start()
        retention = Retention(store, lambda: ring, 10.0, record_name(0, 1), clock=lambda: NOW)
        started = time.perf_counter()
        removed = retention.run_once()
        elapsed = time.perf_counter() - started
        stop.set()
        writer.join()
        remaining = len(store.batches_by_ts(-1e18, NOW - 10 * DAY_S - 0.5))
        store.close()
        size_after = os.path.getsize(root / "store.sqlite3")
    line = {
        "bench": "retention", "case": f"sqlite {old} old batches", "deleted": removed.records,
        "left_past_cutoff": remaining, "delete_s": elapsed, "deleted_per_s": removed.records / elapsed,
        "chunk": DELETE_CHUNK, "longest_txn_ms": retention.longest_s * 1000,
        "writer_commits_alone": len(alone), "writer_commits_during": len(during),
        "writer_p50_ms_alone": percentile(alone, 50) * 1000, "writer_p99_ms_alone": percentile(alone, 99) * 1000,
        "writer_max_ms_alone": max(alone) * 1000,
        "writer_p50_ms_during": percentile(during, 50) * 1000 if during else None,
        "writer_p99_ms_during": percentile(during, 99) * 1000 if during else None,
        "writer_max_ms_during": max(during) * 1000 if during else None,
        "ratio": ratio(percentile(during, 99), percentile(alone, 99)) if during else None,
        "file_mb_before": size_before / 1e6, "file_mb_after": size_after / 1e6,
    }
    return [emit(line)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.retention [--quick]``."""
    return run_main("retention", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
