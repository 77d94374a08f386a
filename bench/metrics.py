"""Metrics: what storage's monitoring endpoint costs ingest, with a scraper asking for /metrics every second.

The same storage runs the same traffic (the ingest benchmark's publishers, runs and measurement window) with
its endpoint off (``monitoring.storage_port`` 0) and on, scraped once a second by this process (fifteen times
Prometheus' default rate), in ABBA order on one router. The endpoint reads counters storage keeps anyway and
observes one histogram per commit, so nothing is done per reading: ``ratio`` (stored readings per second, on
÷ off) should be about 1, and ``storage_us_per_reading`` the same in both.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from bench import ingest
from bench.entry import Options, run_main
from bench.results import emit, note, ratio
from bench.stack import Procs, provision, start_router, workspace, write_settings
from bench.usage import MemorySampler
from components.ops.waiting import free_port

CASES: tuple[tuple[str, int], ...] = (("msgpack", 100), ("msgpack", 1))
SCRAPE_S = 1.0
COLUMNS = {"metrics": ["stored_per_s_off", "stored_per_s_on", "ratio", "storage_us_per_reading_off",
                       "storage_us_per_reading_on", "scrapes", "scrape_ms_mean"]}


class Scraper:
    """GET /metrics every :data:`SCRAPE_S` seconds until stopped; counts the scrapes that answered."""

    def __init__(self, url: str) -> None:
        """Scrape ``url``."""
        self.url = url
        self.ok = 0
        self.seconds = 0.0
        self.last = ""
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_S):
            started = time.perf_counter()
            try:
                with self._opener.open(self.url, timeout=5) as response:
                    self.last = response.read().decode()
            except OSError:
                continue  # not listening yet (storage starting) or gone (stopping)
            self.seconds += time.perf_counter() - started
            self.ok += 1


def _one(procs: Procs, mem: MemorySampler, root: Any, port: int, router: Any, serializer: str, batch: int,
         mode: str, t: ingest.Timing, rep: int) -> tuple[ingest.RunResult, Scraper | None]:
    if mode == "off":
        return ingest._run(procs, mem, root, port, router, serializer, batch, "stored", t, rep,
                           {"monitoring": {"storage_port": 0}}, "metrics-off-"), None
    metrics_port = free_port()
    with Scraper(f"http://127.0.0.1:{metrics_port}/metrics") as scraper:
        result = ingest._run(procs, mem, root, port, router, serializer, batch, "stored", t, rep,
                             {"monitoring": {"storage_port": metrics_port}}, "metrics-on-")
    return result, scraper


def run(opts: Options) -> list[dict[str, Any]]:
    """Each case: runs with the endpoint off and on (ABBA; one pair in quick mode), one line per case."""
    t = ingest.timing(opts)
    order = ["off", "on"] if opts.quick else ["off", "on", "on", "off"]
    lines = []
    with workspace("metrics", opts) as root, Procs(root / "logs") as procs, MemorySampler() as mem:
        port = free_port()
        base = write_settings(root, "base", port)
        provision(base, [str(i) for i in range(ingest.PUBLISHERS * ingest.DEVICES_PER_PUBLISHER)])
        router = start_router(procs, base)
        for serializer, batch in CASES:
            runs: dict[str, list[ingest.RunResult]] = {"off": [], "on": []}
            scrapers: list[Scraper] = []
            for i, mode in enumerate(order):
                note(f"metrics {serializer} x{batch}: endpoint {mode}, run {i + 1}/{len(order)} ({t.duration:.0f}s)")
                result, scraper = _one(procs, mem, root, port, router, serializer, batch, mode, t, i)
                runs[mode].append(result)
                if scraper is not None:
                    scrapers.append(scraper)
            off, on = ingest._combine(runs["off"]), ingest._combine(runs["on"])
            window = t.window
            scrapes = sum(s.ok for s in scrapers)
            stored_seen = [line for s in scrapers for line in s.last.splitlines()
                           if line.startswith("iot_readings_stored_total")]
            lines.append(emit({
                "bench": "metrics", "case": f"{serializer} x{batch}", "serializer": serializer,
                "readings_per_event": batch, "runs_per_mode": len(runs["on"]), "window_s": window,
                "scrape_interval_s": SCRAPE_S,
                "stored_per_s_off": off.per_s, "stored_per_s_on": on.per_s, "ratio": ratio(on.per_s, off.per_s),
                "stored_per_s_runs_off": [r.per_s for r in runs["off"]],
                "stored_per_s_runs_on": [r.per_s for r in runs["on"]],
                "storage_us_per_reading_off": ratio(off.cpu["sub"] * 1e6, (off.per_s or 0.0) * window),
                "storage_us_per_reading_on": ratio(on.cpu["sub"] * 1e6, (on.per_s or 0.0) * window),
                "cpu_s_storage_off": off.cpu["sub"], "cpu_s_storage_on": on.cpu["sub"],
                "scrapes": scrapes, "scrape_ms_mean": ratio(sum(s.seconds for s in scrapers) * 1000, scrapes),
                "last_scrape_stored": stored_seen[-1] if stored_seen else None,
                "shed_off": off.extra.get("shed"), "shed_on": on.extra.get("shed"),
            }))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.metrics [--quick]``."""
    return run_main("metrics", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
