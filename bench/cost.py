"""Cost growth: the same 10,000-reading window on a store of 100,000 readings and on one of 10,000,000.

Both stores are filled through the real IngestService (bench/fill.py: sealed batches of 5,000 readings
in SQLite, laid out as storage lays them out); the big store holds the small one's readings and many
more, so the window (readings 45,000 to 54,999) and its answer are the same in both. A real router and
a real query callee per store serve ``iot.fetch_between_window`` over WAMP (msgpack) to a caller making
sequential calls, in the order small, big, big, small (small, big in quick mode) so that drift of a
shared machine falls on both. ``ratio`` is the big store's p50 over the small one's (target: at most
1.5). Two variants: the callee as configured (decrypted batches cached) and with the cache off
(``query.cache_readings`` = 0: every call reads and opens its batches). Quick mode fills a big store of
2,000,000 readings (the line says so in ``big_store_readings``) and runs the cached variant only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.entry import Options, run_main
from bench.fill import FillReport, fill, synthetic_events
from bench.query import window_cases
from bench.results import emit, latency_figures, note, ratio, target
from bench.stack import Procs, provision, run_caller, start_component, start_router, workspace, write_settings
from bench.usage import MemorySampler
from components.core.sealing import KeyFile
from components.core.settings import Settings
from components.ops.waiting import free_port
from components.storage.sqlite import SqliteBatchStore

SMALL = 100_000
BIG, BIG_QUICK = 10_000_000, 2_000_000
WINDOW = 10_000
FIRST = 45_000
"""The window holds readings FIRST .. FIRST + WINDOW - 1: the middle of the small store, in both stores."""
TARGET_RATIO = 1.5
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (("cache on", {}), ("cache off", {"cache_readings": 0}))
COLUMNS = {"cost": ["small_store_readings", "big_store_readings", "small_p50_ms", "big_p50_ms", "small_p99_ms",
                    "big_p99_ms", "ratio", "ratio_p99", "target", "meets_target", "big_fill_per_s",
                    "query_rss_peak_mb"]}


def _fill(settings: Settings, readings: int) -> FillReport:
    store = SqliteBatchStore(settings.storage.sqlite_path)
    try:
        return fill(store, KeyFile(settings.keys.file).load(), synthetic_events(readings), timeout=600.0)
    finally:
        store.close()


def run(opts: Options) -> list[dict[str, Any]]:
    """Fill both stores, then time the window on each, per variant; one line per variant."""
    big = BIG_QUICK if opts.quick else BIG
    order = ["small", "big"] if opts.quick else ["small", "big", "big", "small"]
    lines: list[dict[str, Any]] = []
    with workspace("cost", opts) as root, Procs(root / "logs") as procs, MemorySampler() as mem:
        port = free_port()
        stores = {"small": write_settings(root, "small", port), "big": write_settings(root, "big", port)}
        provision(stores["small"])
        sizes = {"small": SMALL, "big": big}
        fills: dict[str, FillReport] = {}
        for name in ("small", "big"):
            note(f"cost: filling the {name} store ({sizes[name]:,} readings) through the IngestService")
            fills[name] = _fill(stores[name], sizes[name])
            note(f"cost: {fills[name].readings:,} readings in {fills[name].seconds:.1f}s "
                 f"({fills[name].per_s:,.0f}/s)")
        start_router(procs, stores["small"])
        for variant, query_overrides in VARIANTS[:1] if opts.quick else VARIANTS:
            latencies: dict[str, list[float]] = {"small": [], "big": []}
            errors = {"small": 0, "big": 0}
            rss: list[float] = []
            for leg, name in enumerate(order):
                settings = write_settings(root, f"{name}-{len(lines)}-{leg}", port, {
                    "storage": {"sqlite_path": stores[name].storage.sqlite_path}, "query": query_overrides})
                note(f"cost ({variant}): {WINDOW:,}-reading window on the {name} store, leg {leg + 1}/{len(order)}")
                callee = start_component(procs, settings, "query", name=f"query-{variant.replace(' ', '-')}-{leg}")
                trace = mem.watch(f"query-{leg}", callee.pid)
                cases = window_cases([WINDOW], SMALL, opts.quick, first=FIRST)
                got = run_caller(procs, settings, root, f"caller-{len(lines)}-{leg}", cases, timeout=300.0)
                procs.stop(callee)
                latencies[name] += got[str(WINDOW)]["latencies_ms"]
                errors[name] += got[str(WINDOW)]["errors"]
                peak = trace.peak_mb()
                if peak is not None:
                    rss.append(peak)
            small, big_f = latency_figures(latencies["small"], "small_"), latency_figures(latencies["big"], "big_")
            p50_ratio = ratio(big_f["big_p50_ms"], small["small_p50_ms"])
            line: dict[str, Any] = {
                "bench": "cost", "case": f"{WINDOW:,} readings, {variant}", "rows": WINDOW,
                "small_store_readings": fills["small"].readings, "big_store_readings": fills["big"].readings,
                "big_store_mb": os.path.getsize(Path(stores["big"].storage.sqlite_path)) / 2**20,
                "calls_per_store": len(latencies["small"]), "errors": errors["small"] + errors["big"],
                "order": order, **small, **big_f, "ratio": p50_ratio,
                "ratio_p99": ratio(big_f["big_p99_ms"], small["small_p99_ms"]),
                **target(p50_ratio, TARGET_RATIO, at_most=True),
                "big_fill_per_s": fills["big"].per_s, "big_fill_s": fills["big"].seconds,
                "small_fill_per_s": fills["small"].per_s, "query_rss_peak_mb": max(rss, default=None),
                "query_cache_readings": query_overrides.get("cache_readings", "default"),
            }
            if big != BIG:
                line["note"] = f"quick mode: big store of {big:,} readings, not the {BIG:,} of the target"
            lines.append(emit(line))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.cost [--quick]``."""
    return run_main("cost", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
