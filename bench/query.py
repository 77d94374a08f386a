"""Query latency: ``iot.fetch_between_window`` over WAMP (msgpack) beside SQLite reading plain rows by index.

A store of 100,000 synthetic readings is filled through the real IngestService (sealed batches in
SQLite); a real router and query callee serve it; a caller process times sequential calls returning 10,
1,000 and 10,000 readings. In the same run, the same readings in a plain SQLite table with an index on
ts are read with ``SELECT ... WHERE ts BETWEEN ? AND ? ORDER BY ts`` + ``fetchall`` as many times: the
baseline. ``ratio`` is p50 over baseline p50 (target for 10,000 readings: at most 5). The callee's
resident memory is sampled throughout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.entry import Options, run_main
from bench.fill import fill, plain_query_ms, plain_table, synthetic_events, synthetic_rows, window_of
from bench.results import emit, latency_figures, note, ratio, target
from bench.stack import Procs, provision, run_caller, start_component, start_router, workspace, write_settings
from bench.usage import MemorySampler
from components.core.sealing import KeyFile
from components.ops.waiting import free_port
from components.storage.sqlite import SqliteBatchStore
from components.wamp import uris

STORE_READINGS = 100_000
SIZES = (10, 1_000, 10_000)
TARGET_SIZE, TARGET_RATIO = 10_000, 5.0
"""Target: a 10,000-reading window over WAMP at most 5 times SQLite reading the plain rows."""
COLUMNS = {"query": ["rows", "calls", "p50_ms", "p99_ms", "baseline_p50_ms", "baseline_p99_ms", "ratio",
                     "ratio_p99", "target", "meets_target", "query_rss_peak_mb"]}


def calls_for(size: int, quick: bool) -> int:
    """Timed calls per answer size (bounded; fewer for big answers and in quick mode)."""
    full = {10: 500, 1_000: 300, 10_000: 100}[size]
    return full // 3 if quick else full


def window_cases(sizes: Sequence[int], store_readings: int, quick: bool, first: int | None = None,
                 max_seconds: float = 90.0) -> list[dict[str, Any]]:
    """Caller cases: one ``fetch_between_window`` per size, over readings ``first`` .. (the store's middle)."""
    cases: list[dict[str, Any]] = []
    for size in sizes:
        lo = store_readings // 2 - size // 2 if first is None else first
        start, end = window_of(lo, size)
        cases.append({"name": str(size), "procedure": uris.FETCH_BETWEEN_WINDOW, "args": [start, end],
                      "calls": calls_for(size, quick), "warmup": 3, "max_seconds": max_seconds, "expect": size})
    return cases


def run(opts: Options) -> list[dict[str, Any]]:
    """Fill, serve, time the calls and the baseline; one line per answer size."""
    lines = []
    with workspace("query", opts) as root, Procs(root / "logs") as procs, MemorySampler() as mem:
        port = free_port()
        settings = write_settings(root, "query", port)
        provision(settings)
        note(f"query: filling a store of {STORE_READINGS:,} readings and the plain baseline table")
        store = SqliteBatchStore(settings.storage.sqlite_path)
        try:
            report = fill(store, KeyFile(settings.keys.file).load(), synthetic_events(STORE_READINGS))
        finally:
            store.close()
        plain = root / "plain.sqlite3"
        plain_table(plain, synthetic_rows(STORE_READINGS, time.time()))
        start_router(procs, settings)
        callee = start_component(procs, settings, "query")
        trace = mem.watch("query", callee.pid)
        cases = window_cases(SIZES, STORE_READINGS, opts.quick)
        note("query: timing fetch_between_window over WAMP")
        results = run_caller(procs, settings, root, "caller", cases, timeout=400.0)
        for case in cases:
            size = int(case["name"])
            got = results[case["name"]]
            start, end = case["args"]
            base = plain_query_ms(plain, [(start, end)], case["calls"], size)
            wamp = latency_figures(got["latencies_ms"])
            baseline = latency_figures(base, "baseline_")
            p50_ratio = ratio(wamp["p50_ms"], baseline["baseline_p50_ms"])
            lines.append(emit({
                "bench": "query", "case": f"{size:,} readings", "rows": got["rows"], "calls": len(got["latencies_ms"]),
                "errors": got["errors"], "serializer": "msgpack", "store_readings": STORE_READINGS,
                **wamp, **baseline,
                "ratio": p50_ratio, "ratio_p99": ratio(wamp["p99_ms"], baseline["baseline_p99_ms"]),
                **(target(p50_ratio, TARGET_RATIO, at_most=True) if size == TARGET_SIZE else {}),
                "query_rss_peak_mb": trace.peak_mb(), "fill_per_s": report.per_s,
            }))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.query [--quick]``."""
    return run_main("query", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
