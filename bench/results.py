"""Benchmark results: JSON lines on stdout as soon as they are measured, figures and ratios, the summary table.

Progress for the person watching goes to stderr (:func:`note`), so stdout stays JSON lines only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

RESULTS: list[dict[str, Any]] = []
"""Every result emitted by this process, for the summary table."""


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(value, 4) if abs(value) < 1000 else round(value, 1)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def emit(result: dict[str, Any]) -> dict[str, Any]:
    """Print one result as a JSON line on stdout (at once) and keep it for the table."""
    clean = _clean(result)
    print(json.dumps(clean, separators=(", ", ": ")), flush=True)
    RESULTS.append(clean)
    return clean


def note(message: str) -> None:
    """Progress for the person watching (stderr, so stdout stays JSON lines only)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation."""
    if not values:
        return math.nan
    data = sorted(values)
    k = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def target(value: float | None, limit: float, at_most: bool = False, prefix: str = "") -> dict[str, Any]:
    """``target`` and ``meets_target`` fields for a performance target (``>= limit``, or ``<=``)."""
    meets = None if value is None else (value <= limit if at_most else value >= limit)
    return {f"{prefix}target": f"{'<=' if at_most else '>='} {limit:g}", f"{prefix}meets_target": meets}


def latency_figures(latencies_ms: Sequence[float], prefix: str = "") -> dict[str, float]:
    """p50 and p99 (and the count) of a list of milliseconds."""
    return {f"{prefix}p50_ms": percentile(latencies_ms, 50), f"{prefix}p99_ms": percentile(latencies_ms, 99)}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: Sequence[dict[str, Any]], columns: Mapping[str, Sequence[str]]) -> str:
    """A plain-text table per benchmark: its rows with the columns ``columns[bench]``."""
    out: list[str] = []
    for bench, cols in columns.items():
        rows = [r for r in results if r.get("bench") == bench]
        if not rows:
            continue
        header = ["case", *cols]
        cells = [[_fmt(r.get("case", "")), *(_fmt(r.get(c)) for c in cols)] for r in rows]
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
        out.append(f"== {bench}")
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        out.extend("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                   for row in cells)
        out.append("")
    return "\n".join(out)
