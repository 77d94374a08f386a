"""Analytics against the running stack: readings of a window and their aggregates, as a table or a chart.

    .venv/bin/python examples/analytics.py --minutes 10
    .venv/bin/python examples/analytics.py --start 1499126400 --end 1530662400 --bucket 86400 --plot year.png

It logs in as the ``dashboard`` principal (role reader) with the ticket from ``var/secrets`` (or
``IOT_TICKET``), calls ``iot.fetch_between_window`` with progressive results (so a large window streams
in chunks instead of being refused) and ``iot.aggregate``, prints a summary per device and sensor type,
and with ``--plot FILE.png`` draws a chart per sensor type: a line per device, broken where its readings stop,
and its bucket means dashed in its colour, against UTC dates and times (needs matplotlib: ``pip install .[plot]``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import txaio
from autobahn.wamp.types import CallOptions
from twisted.internet import defer, task

from components.core.errors import ConfigError
from components.core.settings import Settings, load_settings
from components.ops.credentials import CredentialStore
from components.wamp import uris
from components.wamp.connection import make_component, ticket_auth


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Summarise (and plot) the readings of a time window.")
    p.add_argument("--config", help="config file (default: $IOT_CONFIG or ./config.json)")
    p.add_argument("--start", type=float, help="window start, epoch seconds (default: now - --minutes)")
    p.add_argument("--end", type=float, help="window end, epoch seconds (default: now)")
    p.add_argument("--minutes", type=float, default=10.0, help="window length when --start is not given")
    p.add_argument("--bucket", type=float, help="aggregate bucket in seconds (default: window / 20)")
    p.add_argument("--device", help="only this device id")
    p.add_argument("--sensor-type", help="only this sensor type")
    p.add_argument("--principal", default="dashboard", help="ticket principal to log in as (role reader)")
    p.add_argument("--plot", metavar="FILE.png", help="write a chart of the series to FILE.png")
    return p


def summarise(readings: list[dict[str, Any]]) -> list[tuple[str, str, int, float, float, float, float, float]]:
    """Per (device, sensor type): count, min, max, mean, first ts, last ts."""
    series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in readings:
        series[(r["device_id"], r["sensor_type"])].append(r)
    rows = []
    for (device_id, sensor_type), rs in sorted(series.items()):
        values = [r["value"] for r in rs]
        rows.append((device_id, sensor_type, len(rs), min(values), max(values), sum(values) / len(values),
                     rs[0]["ts"], rs[-1]["ts"]))
    return rows


def print_table(rows: Sequence[tuple[Any, ...]], aggregates: list[dict[str, Any]]) -> None:
    """The summary as a fixed-width table."""
    print(f"{'device':>8} {'sensor':<12} {'count':>7} {'min':>9} {'max':>9} {'mean':>9}  first .. last (UTC)")
    for device_id, sensor_type, n, lo, hi, mean, first, last in rows:
        span = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(first))} .. " \
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(last))}"
        print(f"{device_id:>8} {sensor_type:<12} {n:>7} {lo:>9.2f} {hi:>9.2f} {mean:>9.2f}  {span}")
    print(f"\n{len(aggregates)} aggregate buckets (device x sensor type x bucket) from iot.aggregate")


def with_gaps(xs: list[float], ys: list[float], gap: float) -> tuple[list[float], list[float]]:
    """``xs``, ``ys`` with a NaN between two points more than ``gap`` apart, so a plotted line breaks there."""
    out_x: list[float] = []
    out_y: list[float] = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if i and x - xs[i - 1] > gap:
            out_x.append((x + xs[i - 1]) / 2)
            out_y.append(math.nan)
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def usual_gap(ts: list[float]) -> float:
    """What counts as a gap in readings at times ``ts``: three times their median step, at least 15 s."""
    steps = sorted(b - a for a, b in itertools.pairwise(ts))
    return max(15.0, 3 * steps[len(steps) // 2]) if steps else math.inf


def duration(seconds: float) -> str:
    """``seconds`` in the largest unit that divides it: 86400 -> "1 d", 900 -> "15 min", 2.5 -> "2.5 s"."""
    for unit, name in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= unit and seconds % unit == 0:
            return f"{seconds / unit:g} {name}"
    return f"{seconds:g} s"


def plot(path: str, readings: list[dict[str, Any]], aggregates: list[dict[str, Any]], bucket: float) -> None:
    """One chart per sensor type: a line per device, broken where readings stop, and its bucket means dashed in
    the same colour; times in UTC."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: .venv/bin/pip install '.[plot]'") from None
    when = lambda xs: [datetime.fromtimestamp(x, UTC) for x in xs]  # noqa: E731
    sensor_types = sorted({r["sensor_type"] for r in readings} | {a["sensor_type"] for a in aggregates}) or ["(none)"]
    fig, axes = plt.subplots(len(sensor_types), 1, figsize=(10, 3.2 * len(sensor_types)), squeeze=False)
    for ax, sensor_type in zip(axes[:, 0], sensor_types, strict=True):
        raw: dict[str, list[dict[str, Any]]] = defaultdict(list)
        means: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in readings:
            if r["sensor_type"] == sensor_type:
                raw[r["device_id"]].append(r)
        for a in aggregates:
            if a["sensor_type"] == sensor_type:
                means[a["device_id"]].append(a)
        for k, device_id in enumerate(sorted(raw.keys() | means.keys())):
            color = f"C{k % 10}"
            ts = [r["ts"] for r in raw[device_id]]
            xs, ys = with_gaps(ts, [r["value"] for r in raw[device_id]], usual_gap(ts))
            ax.plot(when(xs), ys, color=color, linewidth=0.8, label=f"device {device_id}")
            centres = [a["bucket_start"] + bucket / 2 for a in means[device_id]]
            xs, ys = with_gaps(centres, [a["mean"] for a in means[device_id]], max(1.5 * bucket, usual_gap(centres)))
            ax.plot(when(xs), ys, color=color, linestyle="--", linewidth=1.2, alpha=0.8)
        locator = mdates.AutoDateLocator(tz=UTC)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
        ax.set_title(sensor_type)
        ax.set_xlabel("time (UTC)")
        ax.plot([], [], color="grey", linestyle="--", label=f"(dashed) mean per {duration(bucket)}")
        entries = len(ax.get_legend_handles_labels()[1])
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=math.ceil(entries / 12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart written to {path}")


@defer.inlineCallbacks
def analyse(reactor: Any, args: argparse.Namespace, settings: Settings, ticket: str) -> Any:
    """Connect, fetch, aggregate, print (and plot)."""
    component = make_component(settings.router, ticket_auth(args.principal, ticket), max_retries=0)
    joined: defer.Deferred[Any] = defer.Deferred()
    component.on("join", lambda session, details: joined.callback(session))
    component.start(reactor)
    session = yield joined
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.minutes * 60
    bucket = args.bucket or max(1.0, (end - start) / 20)
    filters = {k: v for k, v in (("device_id", args.device), ("sensor_type", args.sensor_type)) if v}
    chunks: list[list[dict[str, Any]]] = []
    last = yield session.call(uris.FETCH_BETWEEN_WINDOW, start, end, options=CallOptions(on_progress=chunks.append),
                              **filters)
    readings = [r for c in chunks for r in c] + last
    aggregates = yield session.call(uris.AGGREGATE, start, end, bucket, **filters)
    print(f"{len(readings)} readings between {start:.0f} and {end:.0f}\n")
    print_table(summarise(readings), aggregates)
    if args.plot:
        plot(args.plot, readings, aggregates, bucket)
    yield component.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    # txaio logging is not started: Twisted would capture print() into its log, and stdout is the table
    txaio.use_twisted()
    try:
        settings = load_settings(args.config)
        ticket = os.environ.get("IOT_TICKET") or CredentialStore(settings.paths.secrets_dir).ticket(args.principal)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    def run(reactor: Any) -> Any:
        d = analyse(reactor, args, settings, ticket)
        d.addErrback(lambda f: (print(f"error: {f.getErrorMessage()}", file=sys.stderr), f)[1])
        return d

    task.react(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
