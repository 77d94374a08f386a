"""Fleet scale: what a commit and a one-device query cost as the fleet grows, through the core without a router.

Each figure is a ratio of two runs of the same work in one process, on SQLite, through the real
IngestService (validation, batching per device group, device rows, sealing, commits), Compactor and
QueryService. Time is driven by a clock the benchmark advances, so a "second" of batching costs no waiting.

- ``commit_ratio``: storage time per commit (ingest of the events + writer until the acks: CPU time of the
  process, which a shared machine disturbs less than wall time; the wall-time ratio is printed beside it), the
  same traffic (1,000 readings a commit: 100 devices, 10 readings each, a different 100 each time) in a fleet
  of 100,000 devices that have all been seen ÷ in a fleet of 100. It is what the devices that did not send cost.
  The measured commits span folds of SQLite's log of device rows (three, one with ``--quick``).
- ``commit_spread_ratio`` (no target): the same 1,000 readings from 1,000 of the 100,000 devices, one each ÷
  from 100 devices: what each device in a commit costs (its event, its row, its group's batch).
- ``query_cold_ratio``: one device's day (a reading a minute) from a new QueryService, in a compacted store of
  10,000 devices (1,000 with ``--quick``) ÷ of 10 devices, with the same answer.
- ``live_vs_compacted_ratio``: one device's hour, store written live (ten devices, a reading a second each,
  a batch a second, two hours) and then compacted ÷ the same readings bulk-loaded (big batches).
- ``bytes_per_reading``: that live store after compaction, file size ÷ readings.
- ``storage_rss_mb_1m_devices``: peak RSS of a storage process (the core and the WAMP libraries loaded) after
  1,000,000 distinct devices have each sent a reading (200,000 with ``--quick``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.entry import Options, run_main
from bench.results import emit, note, ratio, target
from bench.stack import workspace
from components.core.compactor import Compactor
from components.core.ingest import IngestService
from components.core.query import QueryService
from components.core.sealing import KeyRing
from components.core.settings import BatchingSettings, QuerySettings, StorageSettings
from components.storage.sqlite import LOG_FOLD_ROWS, SqliteBatchStore
from devices.simulator import SensorSeries

DAY0 = 1_700_006_400  # 2023-11-15T00:00:00Z
SENSOR = "temperature"
COMMIT_READINGS = 1_000
TARGETS = {"commit_ratio": 1.5, "query_cold_ratio": 2.0, "live_vs_compacted_ratio": 1.2, "bytes_per_reading": 8.0,
           "storage_rss_mb_1m_devices": 256.0}
COLUMNS = {"fleet": ["case", "value", "baseline", "measured", "target", "meets_target", "note"]}
STORAGE = StorageSettings(backend="sqlite", writer_queue=64)
QUERY = QuerySettings()


class Driver:
    """An ingest service on a store, driven by a clock of its own: ``commit(events)`` returns when acknowledged."""

    def __init__(self, store: SqliteBatchStore, ring: KeyRing, storage: StorageSettings = STORAGE,
                 batching: BatchingSettings | None = None, now: float = DAY0) -> None:
        self.now = now
        self.cpu = 0.0
        self._acked = threading.Event()
        self.service = IngestService(storage, batching or BatchingSettings(max_readings=100_000, max_bytes=1 << 26),
                                     store, lambda: ring, lambda acks: self._acked.set(), clock=lambda: self.now)
        self.service.start(compact=False)

    def commit(self, events: Iterable[tuple[str, str, list[dict[str, Any]], float]], step: float = 1.0) -> float:
        """Ingest events (whose readings carry seqs), close the batches, wait for the acks; the seconds it took
        (and in ``self.cpu``, the CPU seconds of the process)."""
        started, cpu = time.perf_counter(), time.process_time()
        self._acked.clear()
        for device, sensor, payload, received_at in events:
            self.service.ingest(device, sensor, payload, received_at)
        self.now += max(step, 1.0)
        self.service.tick()
        if not self._acked.wait(120):
            raise RuntimeError("a commit was not acknowledged within 120 s")
        self.cpu = time.process_time() - cpu
        return time.perf_counter() - started

    def close(self) -> None:
        if not self.service.flush(120):
            raise RuntimeError("storage did not commit everything it was given")


def new_ring() -> KeyRing:
    return KeyRing.of([os.urandom(32)], os.urandom(32))


# -- commit_ratio ------------------------------------------------------------------------------------------

def fold_cycle_commits(cycles: int) -> int:
    """Commits to run so that the measured ones (all but the first fifth) span ``cycles`` folds of SQLite's
    log of device rows at 100 devices a commit: the folds are part of what a commit costs."""
    cycle = LOG_FOLD_ROWS // (COMMIT_READINGS // 10 + 1) + 1
    return -(-cycles * cycle * 5 // 4)


def commit_seconds(root: Path, fleet: int, per_device: int, commits: int) -> tuple[float, float]:
    """Storage time of a commit of 1,000 readings, from devices of a fleet that has all been seen: (mean CPU
    seconds, so that checkpoints and other periodic work count, and median wall seconds)."""
    store = SqliteBatchStore(root / f"commit-{fleet}-{per_device}.sqlite3")
    driver = Driver(store, new_ring())
    seq = array("q", bytes(8 * fleet))  # not a list: the garbage collector would walk it, and the time counts
    chunk = 10_000
    for first in range(0, fleet, chunk):  # every device of the fleet sends once, so every one has a row
        events = []
        for d in range(first, min(fleet, first + chunk)):
            seq[d] += 1
            events.append((f"d{d}", SENSOR, [{"value": 20.0, "ts": driver.now, "seq": seq[d]}], driver.now))
        driver.commit(events)
    times, cpus = [], []
    devices_per_commit = COMMIT_READINGS // per_device
    for c in range(commits):
        events = []
        for k in range(devices_per_commit):
            d = (c * devices_per_commit + k) * 7919 % fleet  # spread over the fleet, a different set each commit
            payload = []
            for _ in range(per_device):
                seq[d] += 1
                payload.append({"value": 20.0 + seq[d] % 10, "ts": driver.now, "seq": seq[d]})
            events.append((f"d{d}", SENSOR, payload, driver.now))
        times.append(driver.commit(events))
        cpus.append(driver.cpu)
    driver.close()
    store.close()
    warm = len(times) // 5  # the first commits warm the caches
    return statistics.mean(cpus[warm:]), statistics.median(times[warm:])


# -- query_cold_ratio --------------------------------------------------------------------------------------

def day_store(root: Path, devices: int) -> tuple[SqliteBatchStore, KeyRing, Driver]:
    """A compacted store of one day of ``devices`` devices, a reading a minute each."""
    store, ring = SqliteBatchStore(root / f"day-{devices}.sqlite3"), new_ring()
    driver = Driver(store, ring, now=DAY0 + 86_400 + 600)
    per_commit = max(1, 200_000 // 1440)
    for first in range(0, devices, per_commit):
        events = []
        for d in range(first, min(devices, first + per_commit)):
            values = SensorSeries(1, f"d{d}", SENSOR).take(1440)
            events.append((f"d{d}", SENSOR, [{"value": v, "ts": DAY0 + 60 * i, "seq": i + 1}
                                              for i, v in enumerate(values)], DAY0 + 86_400.0))
        driver.commit(events)
    driver.close()
    Compactor(store, lambda: ring, lambda: driver.service.index, STORAGE.segment_seconds, 0.0,
              clock=lambda: 1e12).run_once()
    return store, ring, driver


def cold_day_ms(store: SqliteBatchStore, ring: KeyRing, calls: int) -> tuple[float, list[Any]]:
    """Median ms of one device's day from a new query service (nothing cached), and the answer."""
    times: list[float] = []
    answer: Any = []
    for _ in range(calls):
        service = QueryService(QUERY, store, lambda: ring)
        started = time.perf_counter()
        answer = service.fetch_between_window(DAY0, DAY0 + 86_399, device_id="d7")
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), answer


# -- live_vs_compacted_ratio and bytes_per_reading ---------------------------------------------------------

LIVE_DEVICES, LIVE_SECONDS = 10, 7200


def live_values() -> dict[str, list[float]]:
    return {f"d{d}": SensorSeries(1, f"d{d}", SENSOR).take(LIVE_SECONDS) for d in range(LIVE_DEVICES)}


def live_store(root: Path, values: dict[str, list[float]]) -> tuple[SqliteBatchStore, KeyRing, int]:
    """Ten devices, a reading a second each, a batch a second for two hours, then compacted."""
    store, ring = SqliteBatchStore(root / "live.sqlite3"), new_ring()
    driver = Driver(store, ring, now=DAY0)
    for s in range(LIVE_SECONDS):
        ts = DAY0 + s
        driver.commit([(d, SENSOR, [{"value": v[s], "ts": ts, "seq": s + 1}], ts + 0.003 * k)
                       for k, (d, v) in enumerate(values.items())])
    driver.close()
    Compactor(store, lambda: ring, lambda: driver.service.index, STORAGE.segment_seconds, 0.0,
              clock=lambda: 1e12).run_once()
    batches = len(store.batches_by_ts(-1e18, 1e18))
    store.close()
    return SqliteBatchStore(root / "live.sqlite3"), ring, batches


def bulk_store(root: Path, values: dict[str, list[float]]) -> tuple[SqliteBatchStore, KeyRing]:
    """The same readings in big batches, uncompacted."""
    store, ring = SqliteBatchStore(root / "bulk.sqlite3"), new_ring()
    driver = Driver(store, ring, now=DAY0 + LIVE_SECONDS)
    driver.commit([(d, SENSOR, [{"value": x, "ts": DAY0 + s, "seq": s + 1} for s, x in enumerate(v)],
                    DAY0 + LIVE_SECONDS) for d, v in values.items()])
    driver.close()
    return store, ring


def hour_ms(store: SqliteBatchStore, ring: KeyRing, calls: int) -> tuple[float, list[Any]]:
    """Median ms of one device's hour (warm: the same service answers each call)."""
    service = QueryService(QUERY, store, lambda: ring)
    start = DAY0 + 1800
    answer: Any = service.fetch_between_window(start, start + 3599, device_id="d3")
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        answer = service.fetch_between_window(start, start + 3599, device_id="d3")
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), answer


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


# -- storage_rss_mb_1m_devices -----------------------------------------------------------------------------

def rss_child(path: str, devices: int) -> None:
    """In a process of its own: every device sends one reading; print the peak RSS in MB."""
    import components.wamp.subscriber  # noqa: F401  (the storage process has the WAMP libraries loaded)

    store = SqliteBatchStore(path)
    driver = Driver(store, new_ring())
    chunk = 10_000
    for first in range(0, devices, chunk):
        driver.commit([(f"device_{d:07d}", SENSOR, [{"value": 1.5, "ts": driver.now, "seq": 1}], driver.now)
                       for d in range(first, min(devices, first + chunk))])
        driver.service.tick()
    driver.close()
    # VmHWM, the peak of this process's own memory: ru_maxrss would also count the parent's resident size at
    # the fork (Linux keeps it across exec), and the benchmark's parent has large stores in memory by then
    status = Path("/proc/self/status").read_text()
    print(int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024)


def storage_rss_mb(root: Path, devices: int) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.fleet", "_rss", str(root / "rss.sqlite3"), str(devices)],
                         capture_output=True, text=True, timeout=1800, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# -- the run -----------------------------------------------------------------------------------------------

def line(case: str, value: float | None, baseline: Any, measured: Any, key: str, **extra: Any) -> dict[str, Any]:
    limit = TARGETS.get(key)
    return emit({"bench": "fleet", "case": case, key: value, "value": value, "baseline": baseline,
                 "measured": measured, **(target(value, limit, at_most=True) if limit else {}), **extra})


def run(opts: Options) -> list[dict[str, Any]]:
    """Every fleet figure, one line each."""
    lines = []
    with workspace("fleet", opts) as root:
        note("commit cost: 100 devices, then 100,000")
        commits = fold_cycle_commits(1 if opts.quick else 3)
        small, small_wall = commit_seconds(root, 100, 10, commits)
        same, same_wall = commit_seconds(root, 100_000, 10, commits)
        spread, spread_wall = commit_seconds(root, 100_000, 1, commits)
        lines.append(line("commit, 1,000 readings from 100 devices, fleet of 100,000 vs 100", ratio(same, small),
                          f"{small * 1000:.1f} ms CPU", f"{same * 1000:.1f} ms CPU", "commit_ratio",
                          wall_ratio=ratio(same_wall, small_wall),
                          note=f"wall {small_wall * 1000:.1f} vs {same_wall * 1000:.1f} ms"))
        lines.append(line("commit, 1,000 readings from 1,000 of 100,000 devices vs from 100", ratio(spread, small),
                          f"{small * 1000:.1f} ms CPU", f"{spread * 1000:.1f} ms CPU", "commit_spread_ratio",
                          wall_ratio=ratio(spread_wall, small_wall),
                          note=f"wall {small_wall * 1000:.1f} vs {spread_wall * 1000:.1f} ms; no target"))

        many = 1_000 if opts.quick else 10_000
        note(f"one device's day, cold: 10 devices, then {many:,}")
        few_store, few_ring, _ = day_store(root, 10)
        few_ms, few_answer = cold_day_ms(few_store, few_ring, 20)
        many_store, many_ring, _ = day_store(root, many)
        many_ms, many_answer = cold_day_ms(many_store, many_ring, 20)
        if few_answer != many_answer or len(few_answer) != 1440:
            raise RuntimeError("the two stores gave different answers for the same device's day")
        lines.append(line(f"one device's day, cold, {many:,} devices vs 10", ratio(many_ms, few_ms),
                          f"{few_ms:.2f} ms", f"{many_ms:.2f} ms", "query_cold_ratio",
                          note="quick mode: 1,000 devices" if opts.quick else ""))

        note("a live store (a batch a second for two hours) against the same readings bulk-loaded")
        values = live_values()
        live, live_ring, left = live_store(root, values)
        bulk, bulk_ring = bulk_store(root, values)
        live_ms, live_answer = hour_ms(live, live_ring, 50)
        bulk_ms, bulk_answer = hour_ms(bulk, bulk_ring, 50)
        def content(answer: list[Any]) -> list[tuple[Any, ...]]:  # arrival times differ: live vs one bulk event
            return [(r["device_id"], r["ts"], r["value"], r.get("seq")) for r in answer]

        if content(live_answer) != content(bulk_answer) or len(live_answer) != 3600:
            raise RuntimeError("the live and bulk stores gave different answers for the same hour")
        lines.append(line("one device's hour, live then compacted vs bulk-loaded", ratio(live_ms, bulk_ms),
                          f"{bulk_ms:.2f} ms", f"{live_ms:.2f} ms", "live_vs_compacted_ratio",
                          note=f"{left} write batches left after compaction"))
        live.close()
        readings = LIVE_DEVICES * LIVE_SECONDS
        size = file_bytes(root / "live.sqlite3")
        lines.append(line("live store after compaction, bytes per reading", size / readings,
                          f"{readings:,} readings", f"{size:,} bytes", "bytes_per_reading"))

        devices = 200_000 if opts.quick else 1_000_000
        note(f"storage memory after {devices:,} distinct devices")
        rss = storage_rss_mb(root, devices)
        lines.append(line(f"storage peak RSS after {devices:,} devices", rss, None, f"{rss:.0f} MB",
                          "storage_rss_mb_1m_devices",
                          note="quick mode: 200,000 devices" if opts.quick else ""))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.fleet [--quick]``."""
    return run_main("fleet", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_rss":
        rss_child(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
