"""CPU seconds and resident memory of process trees (psutil), sampled while a benchmark runs."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import psutil

SAMPLE_INTERVAL_S = 0.2


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the process and its (living) descendants."""
    total = 0.0
    for p in _tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the process alone (not its descendants); 0 once it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(t.user + t.system)


def crossbar_processes(pid: int) -> dict[str, list[int]]:
    """The processes of a Crossbar node started as ``pid``: ``controller``, ``router`` and ``proxy`` workers."""
    out: dict[str, list[int]] = {"controller": [pid], "router": [], "proxy": []}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "RouterController" in title:
            out["router"].append(child.pid)
        elif "ProxyController" in title:
            out["proxy"].append(child.pid)
    return out


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (anything but idle and iowait)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def rss_bytes(pid: int) -> int:
    """Resident memory of the process and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


@dataclass
class MemoryTrace:
    """RSS samples of one process tree: (monotonic time, bytes)."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def peak_mb(self, start: float = -math.inf, end: float = math.inf) -> float | None:
        """Peak RSS in MB between ``start`` and ``end`` (monotonic)."""
        values = [b for t, b in self.samples if start <= t <= end]
        return max(values) / 2**20 if values else None

    def last_mb(self) -> float | None:
        """The last sample in MB."""
        return self.samples[-1][1] / 2**20 if self.samples else None


class MemorySampler:
    """A thread sampling the RSS of registered processes every ``SAMPLE_INTERVAL_S`` (bounded by their life)."""

    def __init__(self) -> None:
        """Nothing is watched until :meth:`watch`."""
        self._watched: dict[str, tuple[int, MemoryTrace]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> MemoryTrace:
        """Start sampling ``pid`` under ``name`` (a new trace)."""
        trace = MemoryTrace()
        with self._lock:
            self._watched[name] = (pid, trace)
        return trace

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            with self._lock:
                items = list(self._watched.values())
            now = time.monotonic()
            for pid, trace in items:
                rss = rss_bytes(pid)
                if rss:
                    trace.samples.append((now, rss))

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
