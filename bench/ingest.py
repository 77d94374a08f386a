"""Ingest: readings durably stored per second, beside the router-only ceiling for the same traffic.

For each case (msgpack or JSON; events of 1 or of 100 readings) two runs on one real router:

- ceiling: publisher processes (devices logging in with their own keys, a window of acknowledged
  publishes each) publish to a subscriber process that only counts what it receives;
- stored: the same publishers publish to the real storage subscriber (``python -m components storage``),
  which validates, batches, seals and commits to a fresh SQLite file.

Both rates are taken over the same steady window after a warm-up: the ceiling from the counter's
samples, the stored rate from the committed batches' clear fields (reading counts and ``received_at``
bounds, pro-rated to the window), read from the SQLite file once storage has committed everything.
CPU seconds per process tree (router, storage or counter, publishers) are taken over that window with
psutil; storage's resident memory is sampled all along.

A last case, ``overload msgpack x100``, measures the target "storage process memory under
sustained overload: <= 256 MB and flat": storage is configured so that its writer cannot keep up (see
:func:`run_overload`), publishers send as fast as the router acknowledges, and storage's RSS is compared
between the first and the second half of the overload window.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.entry import Options, run_main
from bench.results import emit, note, ratio, target
from bench.stack import (
    COMPONENT_START_S,
    Procs,
    expect_alive,
    provision,
    python_module,
    read_json,
    sleep_until,
    start_component,
    start_router,
    workspace,
    write_settings,
)
from bench.usage import MemorySampler, cpu_seconds, machine_busy_seconds
from components.core.batches import open_state
from components.core.ingest import STATE_PREFIX
from components.core.sealing import KeyFile
from components.core.settings import Settings
from components.ops.supervisor import Child
from components.ops.waiting import free_port
from components.storage.sqlite import SqliteBatchStore

CASES: tuple[tuple[str, int], ...] = (("msgpack", 1), ("msgpack", 100), ("json", 1), ("json", 100))
PUBLISHERS = 2
DEVICES_PER_PUBLISHER = 4
WINDOW = 16
"""Publishes awaiting acknowledgement per device (``device.window``'s default)."""

TARGET_RATIO = 0.8
"""Target: readings stored per second at least 0.8 of the router-only ceiling, every case."""
TARGET_STORED_CASE, TARGET_STORED_PER_S = ("msgpack", 100), 100_000.0
"""Target: at least 100,000 readings stored per second with 100-reading msgpack events."""

COLUMNS = {"ingest": ["stored_per_s", "ceiling_per_s", "ratio", "meets_target", "stored_per_s_meets_target",
                      "cpu_s_router", "cpu_s_storage", "cpu_s_publishers",
                      "ceiling_cpu_s_router", "ceiling_cpu_s_counter", "ceiling_cpu_s_publishers",
                      "storage_us_per_reading", "storage_rss_peak_mb", "shed"],
           "overload": ["stored_per_s", "received_per_s", "shed", "shed_fraction", "storage_rss_peak_mb",
                        "storage_rss_first_half_peak_mb", "storage_rss_second_half_peak_mb", "storage_rss_growth_mb",
                        "flat", "overloaded", "meets_target"]}


@dataclass(frozen=True)
class Timing:
    """Seconds of publishing, of warm-up before the measured window, and left out at its end."""

    duration: float
    warmup: float
    tail: float

    @property
    def window(self) -> float:
        """Length of the measured window."""
        return self.duration - self.warmup - self.tail


def timing(opts: Options) -> Timing:
    """Full runs measure 12 s of steady state, quick ones 3 s."""
    return Timing(5.0, 1.5, 0.5) if opts.quick else Timing(16.0, 3.0, 1.0)


def _interpolate(samples: Sequence[Sequence[float]], t: float) -> float | None:
    """Readings counted at time ``t`` from (time, events, readings) samples."""
    prev: Sequence[float] | None = None
    for s in samples:
        if s[0] >= t:
            if prev is None:
                return None
            span = s[0] - prev[0]
            return prev[2] + (s[2] - prev[2]) * ((t - prev[0]) / span if span > 0 else 1.0)
        prev = s
    return None


def counted_events(samples: Sequence[Sequence[float]], t0: float, t1: float) -> float | None:
    """Events counted between t0 and t1 (same interpolation, on the events column)."""
    swapped = [(s[0], s[2], s[1]) for s in samples]
    a, b = _interpolate(swapped, t0), _interpolate(swapped, t1)
    return None if a is None or b is None else b - a


def stored_in_window(sqlite_path: str, t0: float, t1: float) -> tuple[float, int]:
    """Readings committed whose arrival falls in [t0, t1] (batches pro-rated by their received_at span)."""
    conn = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT rec_lo, rec_hi, n FROM records WHERE kind = 'batch'").fetchall()
    finally:
        conn.close()
    total = 0.0
    for lo, hi, n in rows:
        if hi <= lo:
            total += n if t0 <= lo <= t1 else 0
        else:
            total += n * max(0.0, min(hi, t1) - max(lo, t0)) / (hi - lo)
    return total, sum(r[2] for r in rows)


def storage_counters(settings: Settings) -> dict[str, Any]:
    """Storage's own counters (from its sealed state record)."""
    store = SqliteBatchStore(settings.storage.sqlite_path)
    try:
        ring = KeyFile(settings.keys.file).load()
        states = store.states(STATE_PREFIX)
        return open_state(ring, states[0]).get("counters", {}) if states else {}
    finally:
        store.close()


@dataclass
class RunResult:
    """What one run (ceiling or stored) measured."""

    per_s: float | None
    events_per_s: float | None
    cpu: dict[str, float]
    published_per_s: float | None
    extra: dict[str, Any]


def _start_publishers(procs: Procs, settings: Settings, root: Path, tag: str, serializer: str, batch: int,
                      duration: float) -> list[tuple[Child, Path]]:
    pubs = []
    for p in range(PUBLISHERS):
        devices = ",".join(str(p * DEVICES_PER_PUBLISHER + i) for i in range(DEVICES_PER_PUBLISHER))
        report = root / f"{tag}-pub{p}.json"
        child = procs.start(f"{tag}-pub{p}", python_module(
            "bench._publisher", "--config", settings.config_path, "--devices", devices, "--serializer", serializer,
            "--batch", str(batch), "--window", str(WINDOW), "--duration", str(duration), "--report", str(report)),
            stdin=True, announces="publisher")
        pubs.append((child, report))
    return pubs


def _run(procs: Procs, mem: MemorySampler, root: Path, port: int, router: Child, serializer: str, batch: int,
         mode: str, t: Timing, rep: int, overrides: dict[str, dict[str, Any]] | None = None,
         tag_prefix: str = "") -> RunResult:
    tag = f"{tag_prefix}{serializer}-x{batch}-{mode}{rep}"
    settings = write_settings(root, tag, port, {"router": {"serializer": serializer}, **(overrides or {})})
    pubs = _start_publishers(procs, settings, root, tag, serializer, batch, t.duration)
    counter_report = root / f"{tag}-counter.json"
    if mode == "stored":
        sub = start_component(procs, settings, "storage", name=f"{tag}-storage")
    else:
        sub = procs.start(f"{tag}-counter", python_module("bench._counter", "--config", settings.config_path,
                                                          "--report", str(counter_report)), announces="counter")
        sub.wait_ready(COMPONENT_START_S)
    trace = mem.watch(mode, sub.pid)
    for child, _ in pubs:
        child.wait_ready(COMPONENT_START_S)
    alive = expect_alive(router, sub)
    t_go = time.time()
    for child, _ in pubs:
        assert child.proc is not None and child.proc.stdin is not None
        child.proc.stdin.write(b"go\n")
        child.proc.stdin.flush()
    t0, t1 = t_go + t.warmup, t_go + t.duration - t.tail
    sleep_until(t0, alive)
    m0 = time.monotonic()
    cpu0 = {"router": cpu_seconds(router.pid), "sub": cpu_seconds(sub.pid),
            "publishers": sum(cpu_seconds(c.pid) for c, _ in pubs), "machine": machine_busy_seconds()}
    sleep_until(t1, alive)
    cpu1 = {"router": cpu_seconds(router.pid), "sub": cpu_seconds(sub.pid),
            "publishers": sum(cpu_seconds(c.pid) for c, _ in pubs), "machine": machine_busy_seconds()}
    m1 = time.monotonic()
    published = resends = 0
    for child, report in pubs:
        try:
            child.wait(t.tail + 40.0)
        except subprocess.TimeoutExpired:
            note(f"{child.name} did not finish in time; stopping it")
        procs.stop(child)
        data = read_json(report) or {}
        if data.get("error"):
            note(f"{child.name}: {data['error']}")
        published += data.get("readings", 0)
        resends += data.get("resends", 0)
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    cpu["other"] = max(0.0, cpu.pop("machine") - cpu["router"] - cpu["sub"] - cpu["publishers"])
    extra: dict[str, Any] = {"rss_peak_mb": trace.peak_mb(), "rss_window_start_mb": trace.peak_mb(m0, m0 + 1.0),
                             "rss_window_end_mb": trace.peak_mb(m1 - 1.0, m1),
                             "rss_first_half_peak_mb": trace.peak_mb(m0, (m0 + m1) / 2),
                             "rss_second_half_peak_mb": trace.peak_mb((m0 + m1) / 2, m1),
                             "series_rss_mb_per_s": [trace.peak_mb(m0 + i * (m1 - m0) / n, m0 + (i + 1) * (m1 - m0) / n)
                                                     for n in [max(1, round(m1 - m0))] for i in range(n)],
                             "published_total": published, "resends": resends}
    window = t1 - t0
    per_s: float | None
    events_per_s: float | None
    if mode == "stored":
        code = procs.stop(sub, timeout=60.0)  # storage commits everything open before it exits
        if code != 0:
            note(f"storage exited with {code}")
        readings, total = stored_in_window(settings.storage.sqlite_path, t0, t1)
        counters = storage_counters(settings)
        extra.update(stored_total=total, received_total=counters.get("received"), shed=counters.get("shed", 0),
                     out_of_order=counters.get("out_of_order", 0), duplicates=counters.get("duplicates", 0),
                     batches=counters.get("batches"))
        per_s = readings / window
        events_per_s = readings / window / batch
    else:
        procs.stop(sub)
        samples = (read_json(counter_report) or {}).get("samples", [])
        a, b = _interpolate(samples, t0), _interpolate(samples, t1)
        per_s = None if a is None or b is None else (b - a) / window
        ev = counted_events(samples, t0, t1)
        events_per_s = None if ev is None else ev / window
    return RunResult(per_s, events_per_s, cpu, published / t.duration, extra)


def _combine(runs: list[RunResult]) -> RunResult:
    """Several runs of one mode: mean rates, CPU seconds per window second, the worst memory."""
    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    cpu = {k: sum(r.cpu[k] for r in runs) / len(runs) for k in runs[0].cpu}
    extra: dict[str, Any] = {}
    for key in runs[0].extra:
        values = [r.extra.get(key) for r in runs]
        if key.startswith("rss"):
            extra[key] = max((v for v in values if v is not None), default=None)
        elif all(isinstance(v, int | float) for v in values):
            extra[key] = sum(values)
        else:
            extra[key] = values[-1]
    return RunResult(mean([r.per_s for r in runs]), mean([r.events_per_s for r in runs]), cpu,
                     mean([r.published_per_s for r in runs]), extra)


OVERLOAD_CASE = ("msgpack", 100)
OVERLOAD_MAX_READINGS = 100
OVERLOAD_SETTINGS: dict[str, dict[str, Any]] = {"batching": {"max_readings": OVERLOAD_MAX_READINGS}}
"""How the overload case makes storage's writer the bottleneck, and the only setting it changes: every
100-reading event closes its own batch (``batching.max_readings`` 100 instead of 5,000), so the writer seals
and commits batches of 100 readings, at most 64 of them per transaction (its group commit), and cannot keep
up with what the router delivers. ``storage.writer_queue`` keeps its default (16 closed batches); the
router and the publishers run exactly as in the other cases."""
STORAGE_RSS_TARGET_MB = 256.0
FLAT_GROWTH_FRACTION, FLAT_GROWTH_MB = 0.10, 16.0
FLAT_RULE = (f"flat: second-half RSS peak <= first-half peak + max({FLAT_GROWTH_FRACTION:.0%} of it, "
             f"{FLAT_GROWTH_MB:g} MB)")


def overload_timing(opts: Options) -> Timing:
    """Full runs hold the overload for 30 s, quick ones 10 s (after a warm-up that fills the writer queue)."""
    return Timing(11.5, 1.0, 0.5) if opts.quick else Timing(33.0, 2.5, 0.5)


def is_flat(first_mb: float | None, second_mb: float | None) -> bool | None:
    """The flatness rule of :data:`FLAT_RULE` (None when either half has no sample)."""
    if first_mb is None or second_mb is None:
        return None
    return second_mb - first_mb <= max(FLAT_GROWTH_FRACTION * first_mb, FLAT_GROWTH_MB)


def _slope_per_min(series: Sequence[float | None]) -> float | None:
    """Least-squares slope of one-sample-per-second values, in units per minute (None under 2 points)."""
    pts = [(float(i), v) for i, v in enumerate(series) if v is not None]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return 60.0 * sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def run_overload(procs: Procs, mem: MemorySampler, root: Path, port: int, router: Child,
                 opts: Options) -> dict[str, Any]:
    """Storage under sustained overload: its RSS peak, first half vs second half, and proof that it shed.

    Publishers (the same ones, 100-reading msgpack events, a window of router-acknowledged publishes per
    device) send as fast as the router lets them for the whole run, to a storage whose writer cannot keep up
    (:data:`OVERLOAD_SETTINGS`). Storage then sheds readings (not acknowledged) and devices go back and
    resend them, so the overload lasts as long as the publishers run. The run counts as an overload only if
    storage's own counters say it shed readings (``shed`` > 0); otherwise ``overloaded`` and
    ``meets_target`` are false.
    """
    serializer, batch = OVERLOAD_CASE
    t = overload_timing(opts)
    note(f"ingest overload {serializer} x{batch}: stored run ({t.duration:.0f}s, writer made the bottleneck)")
    r = _run(procs, mem, root, port, router, serializer, batch, "stored", t, 0, OVERLOAD_SETTINGS, "overload-")
    x = r.extra
    shed, received = x.get("shed") or 0, x.get("received_total") or 0
    overloaded = shed > 0
    first, second, peak = x["rss_first_half_peak_mb"], x["rss_second_half_peak_mb"], x["rss_peak_mb"]
    flat = is_flat(first, second)
    meets = bool(overloaded and flat and peak is not None and peak <= STORAGE_RSS_TARGET_MB)
    window = t.window
    stored_n = (r.per_s or 0.0) * window
    series = x.get("series_rss_mb_per_s") or []
    return {
        "bench": "overload", "case": f"overload {serializer} x{batch}", "serializer": serializer,
        "readings_per_event": batch, "publishers": PUBLISHERS, "devices": PUBLISHERS * DEVICES_PER_PUBLISHER,
        "window_per_device": WINDOW, "run_s": t.duration, "window_s": window,
        "settings_override": OVERLOAD_SETTINGS,
        "bottleneck": (f"writer: batching.max_readings={OVERLOAD_MAX_READINGS} (each event is its own batch, "
                       "sealed and committed, group commit of at most 64 per transaction); "
                       "storage.writer_queue unchanged (default 16)"),
        "stored_per_s": r.per_s, "received_total": received, "received_per_s": received / t.duration,
        "published_total": x.get("published_total"), "published_per_s": r.published_per_s,
        "shed": shed, "shed_fraction": ratio(shed, received), "resends": x.get("resends"),
        "stored_total": x.get("stored_total"), "batches": x.get("batches"),
        "out_of_order": x.get("out_of_order"), "out_of_order_fraction": ratio(x.get("out_of_order"), received),
        "duplicates": x.get("duplicates"),
        "overloaded": overloaded,
        "storage_rss_peak_mb": peak, "storage_rss_first_half_peak_mb": first,
        "storage_rss_second_half_peak_mb": second,
        "storage_rss_growth_mb": None if first is None or second is None else second - first,
        "storage_rss_mb_per_s": series, "storage_rss_slope_mb_per_min": _slope_per_min(series),
        "flat": flat, "flat_rule": FLAT_RULE, "storage_rss_flat": flat,
        "cpu_s_router": r.cpu["router"], "cpu_s_storage": r.cpu["sub"], "cpu_s_publishers": r.cpu["publishers"],
        "cpu_s_other": r.cpu["other"], "storage_us_per_reading": ratio(r.cpu["sub"] * 1e6, stored_n),
        "target": f"<= {STORAGE_RSS_TARGET_MB:g} MB and flat", "meets_target": meets,
        "note": ("RSS halves are over the overload window (after the warm-up); stored_per_s over the same "
                 "window from the committed batches; readings after a shed one arrive as out_of_order (a gap) "
                 "and are dropped until the device goes back, so stored_per_s is the goodput under overload"
                 if overloaded else
                 "NOT an overload: storage shed nothing, so this run does not measure the target"),
    }


def run(opts: Options) -> list[dict[str, Any]]:
    """Every case on one router: ceiling and stored runs in ABBA order (one pair in quick mode), then overload."""
    t = timing(opts)
    order = ["ceiling", "stored"] if opts.quick else ["ceiling", "stored", "stored", "ceiling"]
    lines = []
    with workspace("ingest", opts) as root, Procs(root / "logs") as procs, MemorySampler() as mem:
        port = free_port()
        base = write_settings(root, "base", port)
        provision(base, [str(i) for i in range(PUBLISHERS * DEVICES_PER_PUBLISHER)])
        router = start_router(procs, base)
        for serializer, batch in CASES:
            runs: dict[str, list[RunResult]] = {"ceiling": [], "stored": []}
            for i, mode in enumerate(order):
                note(f"ingest {serializer} x{batch}: {mode} run {i + 1}/{len(order)} ({t.duration:.0f}s)")
                runs[mode].append(_run(procs, mem, root, port, router, serializer, batch, mode, t, i))
            ceiling, stored = _combine(runs["ceiling"]), _combine(runs["stored"])
            window = t.window
            stored_n = (stored.per_s or 0.0) * window
            line = {
                "bench": "ingest", "case": f"{serializer} x{batch}", "serializer": serializer,
                "readings_per_event": batch, "publishers": PUBLISHERS,
                "devices": PUBLISHERS * DEVICES_PER_PUBLISHER, "window_per_device": WINDOW, "window_s": window,
                "runs_per_mode": len(runs["stored"]),
                "stored_per_s": stored.per_s, "ceiling_per_s": ceiling.per_s,
                "ratio": ratio(stored.per_s, ceiling.per_s),
                **target(ratio(stored.per_s, ceiling.per_s), TARGET_RATIO),
                **(target(stored.per_s, TARGET_STORED_PER_S, prefix="stored_per_s_")
                   if (serializer, batch) == TARGET_STORED_CASE else {}),
                "stored_per_s_runs": [r.per_s for r in runs["stored"]],
                "ceiling_per_s_runs": [r.per_s for r in runs["ceiling"]],
                "stored_events_per_s": stored.events_per_s, "ceiling_events_per_s": ceiling.events_per_s,
                "published_per_s_stored_run": stored.published_per_s,
                "published_per_s_ceiling_run": ceiling.published_per_s,
                "cpu_s_router": stored.cpu["router"], "cpu_s_storage": stored.cpu["sub"],
                "cpu_s_publishers": stored.cpu["publishers"], "cpu_s_other": stored.cpu["other"],
                "ceiling_cpu_s_router": ceiling.cpu["router"], "ceiling_cpu_s_counter": ceiling.cpu["sub"],
                "ceiling_cpu_s_publishers": ceiling.cpu["publishers"], "ceiling_cpu_s_other": ceiling.cpu["other"],
                "storage_us_per_reading": ratio(stored.cpu["sub"] * 1e6, stored_n),
                "router_us_per_reading_stored": ratio(stored.cpu["router"] * 1e6, stored_n),
                "router_us_per_reading_ceiling": ratio(ceiling.cpu["router"] * 1e6,
                                                       (ceiling.per_s or 0.0) * window),
                "storage_rss_peak_mb": stored.extra["rss_peak_mb"],
                "storage_rss_first_half_peak_mb": stored.extra["rss_first_half_peak_mb"],
                "storage_rss_second_half_peak_mb": stored.extra["rss_second_half_peak_mb"],
                "counter_rss_peak_mb": ceiling.extra["rss_peak_mb"],
                **{k: stored.extra.get(k) for k in ("shed", "out_of_order", "duplicates", "batches",
                                                     "stored_total", "received_total")},
            }
            lines.append(emit(line))
        lines.append(emit(run_overload(procs, mem, root, port, router, opts)))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.ingest [--quick]``."""
    return run_main("ingest", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
