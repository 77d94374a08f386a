"""``python -m bench [--quick] [NAME ...]``: every benchmark in turn (or the ones named), JSON lines on stdout.

The machine line comes first, then each benchmark's result lines as they are measured, then a ``memory``
line (peak RSS of storage and of the query callees over the benchmarks that ran); the summary tables and
the performance targets go to stderr at the end. A benchmark that fails prints a line with its
error and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from bench import codec, cost, dynamo, fleet, http_bridge, ingest, metrics, query, retention
from bench.entry import Interrupted, add_options, install_signal_handlers, machine_line, options_from
from bench.results import RESULTS, emit, note, table, target

BENCHES: dict[str, ModuleType] = {"ingest": ingest, "query": query, "cost": cost, "http": http_bridge,
                                  "dynamo": dynamo, "fleet": fleet, "codec": codec, "metrics": metrics,
                                  "retention": retention}
"""Benchmark name -> module (each has ``run(opts)`` and ``COLUMNS``), in the order ``make bench`` runs them."""
"""Storage memory is "flat" when no run's second-half peak exceeds its first-half peak by more than 10%."""
MEMORY_COLUMNS = {"memory": ["storage_rss_peak_mb", "storage_flat", "query_rss_peak_mb", "target", "meets_target"]}
TARGET_COLUMNS = ["bench", "case", "value", "target", "meets_target"]


def _max(values: list[Any]) -> float | None:
    known = [v for v in values if isinstance(v, int | float)]
    return max(known) if known else None


def memory_line(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Peak RSS of storage (ingest) and of the query callees (query, cost, http, dynamo), from the lines so far."""
    ingest_lines = [r for r in results if r.get("bench") in ("ingest", "overload")]
    query_lines = [r for r in results if r.get("bench") in ("query", "cost", "http", "dynamo_query")]
    if not ingest_lines and not query_lines:
        return None
    line: dict[str, Any] = {"bench": "memory", "case": "peak RSS"}
    if ingest_lines:
        peak = _max([r.get("storage_rss_peak_mb") for r in ingest_lines])
        # one rule for every line (ingest.FLAT_RULE); a line without samples in both halves does not count
        flat = all(ingest.is_flat(r.get("storage_rss_first_half_peak_mb"), r.get("storage_rss_second_half_peak_mb"))
                   is not False for r in ingest_lines)
        overloaded = sum(r.get("shed") or 0 for r in ingest_lines)
        line.update(storage_rss_peak_mb=peak, storage_flat=flat,
                    storage_rss_by_case={r["case"]: r.get("storage_rss_peak_mb") for r in ingest_lines},
                    storage_readings_shed=overloaded, **target(peak, ingest.STORAGE_RSS_TARGET_MB, at_most=True))
        line["target"] = f"storage <= {ingest.STORAGE_RSS_TARGET_MB:g} MB and flat"
        line["meets_target"] = bool(line["meets_target"] and flat)
        overload = [r for r in ingest_lines if r.get("bench") == "overload"]
        line["storage_overloaded"] = any(r.get("overloaded") for r in overload)
        line["note"] = ("storage measured during the ingest runs at the highest rate the publishers reach and in "
                        "the overload case (writer made the bottleneck); overload is sustained only where "
                        "readings were shed (storage_readings_shed, storage_overloaded)")
    if query_lines:
        line.update(query_rss_peak_mb=_max([r.get("query_rss_peak_mb") for r in query_lines]),
                    query_rss_by_bench={b: _max([r.get("query_rss_peak_mb") for r in query_lines
                                                 if r["bench"] == b]) for b in dict.fromkeys(
                                                     r["bench"] for r in query_lines)})
    return line


def target_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target in the results: its bench, case, the measured value, the target, met or not."""
    rows = []
    for r in results:
        for key in [k for k in r if k.endswith("meets_target")]:
            prefix = key[: -len("meets_target")]
            if prefix == "" and r.get("bench") == "http":
                continue  # the http line's overall verdict: its two parts are listed instead
            value_key = {"": "ratio", "stored_per_s_": "stored_per_s", "req_per_s_": "req_per_s",
                         "p99_": "p99_ms"}.get(prefix, "ratio")
            if r.get("bench") in ("memory", "overload"):
                value_key = "storage_rss_peak_mb"
            rows.append({"bench": r.get("bench"), "case": r.get("case"), "value": r.get(value_key),
                         "measure": value_key, "target": r.get(f"{prefix}target"), "meets_target": r.get(key)})
    return rows


def target_table(rows: Sequence[dict[str, Any]]) -> str:
    """The targets as a plain-text table."""
    if not rows:
        return ""
    cells = [[str(r["bench"]), str(r["case"]), f"{r['measure']} = {table_value(r['value'])}", str(r["target"]),
              "yes" if r["meets_target"] else "no"] for r in rows]
    header = ["bench", "case", "measured", "target", "met"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    out = ["== performance targets", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out) + "\n"


def table_value(value: Any) -> str:
    """A figure for the targets table."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def run_benches(names: Sequence[str], runner: Callable[[ModuleType], object]) -> list[str]:
    """Run the named benchmarks in order; the names of those that failed (each failure is a result line)."""
    failed = []
    for name in names:
        started = time.monotonic()
        note(f"=== {name}")
        try:
            runner(BENCHES[name])
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as err:  # reported as a result line; the other benchmarks still run
            failed.append(name)
            emit({"bench": name, "case": "failed", "error": f"{type(err).__name__}: {err}"[:2000]})
        note(f"=== {name}: {time.monotonic() - started:.0f}s")
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make bench`` / ``make bench-quick``."""
    parser = add_options(argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the benchmarks (all, or the ones named): JSON lines on stdout, tables on stderr."))
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(BENCHES)}")
    opts = options_from(args)
    names = list(dict.fromkeys(args.names)) or list(BENCHES)
    install_signal_handlers()
    emit(machine_line(opts, names))
    started = time.monotonic()
    columns: dict[str, Sequence[str]] = {}
    for name in names:
        columns.update(BENCHES[name].COLUMNS)
    failed: list[str] = []
    code = 0
    try:
        failed = run_benches(names, lambda module: module.run(opts))
        memory = memory_line(RESULTS)
        if memory is not None:
            emit(memory)
    except (KeyboardInterrupt, Interrupted) as err:
        note(f"interrupted ({err or 'Ctrl-C'}); every process it started has been stopped")
        code = 130
    finally:
        print("\n" + table(RESULTS, {**columns, **MEMORY_COLUMNS}), file=sys.stderr, flush=True)
        print(target_table(target_rows(RESULTS)), file=sys.stderr, flush=True)
        note(f"bench {' '.join(names)}{' --quick' if opts.quick else ''}: {time.monotonic() - started:.0f}s"
             + (f"; failed: {', '.join(failed)}" if failed else ""))
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
