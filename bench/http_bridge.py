"""HTTP bridge: 100 concurrent clients calling ``iot.fetch_between_window`` for one device through ``POST /call``.

The store holds the classic data model (51 devices, humidity and temperature, 5,000 readings over
2017-07-04 to 2018-07-04), filled through the real IngestService; a real router and query callee serve
it. ``ab`` (Debian's apache2-utils, installed with apt-get when missing unless ``--no-install``; else a
bounded Python client, bench/_httpclient.py) posts ``{"procedure": "iot.fetch_between_window", "args":
[start, end], "kwargs": {"device_id": "1"}}`` with 100 requests in flight, a bounded number of times
(and seconds) after a warm-up: once with a new connection per request, and (ab only) once with every
client keeping its connection alive, as HTTP client libraries do. The router-only baseline in the same
run: the same requests answered by a callee that returns the same answer without doing anything
(bench/_echo_callee.py), in the order ceiling, stored, stored, ceiling (stored, ceiling in quick mode).
Figures: requests per second, p50, p99, failures; CPU seconds per process over the run; the query
callee's peak RSS; and the kernel's ListenDrops over each run (connections the router's listen queue had
no room for: each costs the client a SYN retransmission, a second or more of latency).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.entry import Options, run_main
from bench.fill import classic_events, fill
from bench.results import emit, latency_figures, note, ratio, target
from bench.stack import (
    COMPONENT_START_S,
    Procs,
    provision,
    python_module,
    read_json,
    start_component,
    start_router,
    workspace,
    write_settings,
)
from bench.usage import MemorySampler, cpu_seconds, machine_busy_seconds
from components.core.query import QueryService
from components.core.sealing import KeyFile
from components.core.settings import Settings
from components.ops import router_config
from components.ops.supervisor import Child
from components.ops.waiting import free_port
from components.storage.sqlite import SqliteBatchStore
from components.wamp import uris
from components.wamp.callee import answer
from devices.simulator import CLASSIC_END, CLASSIC_START

DEVICE = "1"
CONCURRENCY = 100
REQUESTS, REQUESTS_QUICK = 10_000, 3_000
SECONDS, SECONDS_QUICK = 25, 6
"""Each load run ends at its request count or after this many seconds, whichever comes first."""
WARMUP, WARMUP_SECONDS = 300, 3
TARGET_REQ_PER_S, TARGET_P99_MS = 1150.0, 250.0
RUN_TIMEOUT_S = 180.0
COLUMNS = {"http": ["rows", "requests", "req_per_s", "ceiling_req_per_s", "ratio", "p50_ms", "p99_ms",
                    "ceiling_p99_ms", "failures", "listen_drops", "target", "meets_target", "cpu_s_router",
                    "cpu_s_callee", "cpu_s_client", "query_rss_peak_mb"]}


def find_ab(opts: Options) -> str | None:
    """The ``ab`` executable; installed from Debian's apache2-utils when missing (unless ``--no-install``)."""
    found = shutil.which("ab")
    if found or not opts.install_tools or shutil.which("apt-get") is None:
        return found
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        return None
    note("http: installing apache2-utils (ab) with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "apache2-utils"]):
        try:
            subprocess.run([*sudo, *argv], env=env, check=True, timeout=300, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        except (subprocess.SubprocessError, OSError) as err:
            note(f"http: could not install apache2-utils ({err}); using the Python client")
            return None
    return shutil.which("ab")


@dataclass
class Load:
    """What one load run measured."""

    req_per_s: float | None
    latencies: dict[str, float]
    complete: int
    failures: int
    seconds: float
    cpu: dict[str, float]
    listen_drops: int | None = None


_AB_FIELDS = {"complete": r"Complete requests:\s+(\d+)", "failed": r"Failed requests:\s+(\d+)",
              "non_2xx": r"Non-2xx responses:\s+(\d+)", "rps": r"Requests per second:\s+([\d.]+)",
              "seconds": r"Time taken for tests:\s+([\d.]+)"}


def parse_ab(text: str) -> dict[str, Any]:
    """Counts, rate and the percentile table (ms) of ``ab``'s report."""
    out: dict[str, Any] = {}
    for key, pattern in _AB_FIELDS.items():
        m = re.search(pattern, text)
        out[key] = float(m.group(1)) if m else 0.0
    out["percentiles"] = {int(p): float(ms) for p, ms in re.findall(r"^\s+(\d+)%\s+(\d+)", text, re.M)}
    return out


def listen_drops() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt ListenDrops)."""
    try:
        lines = [line.split() for line in open("/proc/net/netstat", encoding="ascii").read().splitlines()]
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names and names[0] == "TcpExt:" and "ListenDrops" in names:
            return int(values[names.index("ListenDrops")])
    return None


class Client:
    """Runs one bounded load: ``ab`` if available, else bench/_httpclient.py."""

    def __init__(self, procs: Procs, root: Path, url: str, body: Path, ab: str | None) -> None:
        """Post ``body`` to ``url``."""
        self.procs, self.root, self.url, self.body, self.ab = procs, root, url, body, ab
        self.runs = 0

    @property
    def name(self) -> str:
        """Which client it is."""
        return "ab" if self.ab else "python"

    def run(self, total: int, seconds: int, watched: dict[str, Child], keep_alive: bool = False) -> Load:
        """``total`` requests (at most ``seconds``), CONCURRENCY at a time; CPU of ``watched`` and the client.

        ``keep_alive`` (ab only): each client sends its requests on one connection, as an HTTP library does."""
        self.runs += 1
        tag = f"client{self.runs}"
        report = self.root / f"{tag}.json"
        if self.ab:
            # -t before -n: ab stops at the time limit or the count, whichever comes first
            argv = [self.ab, "-q", *(["-k"] if keep_alive else []), "-t", str(seconds), "-n", str(total),
                    "-c", str(CONCURRENCY), "-s", "30", "-p", str(self.body), "-T", "application/json", self.url]
        else:
            argv = python_module("bench._httpclient", "--url", self.url, "--body", str(self.body), "-n", str(total),
                                 "-c", str(CONCURRENCY), "--max-seconds", str(seconds), "--report", str(report))
        before = {name: cpu_seconds(c.pid) for name, c in watched.items()}
        machine0 = machine_busy_seconds()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        drops0 = listen_drops()
        child = self.procs.start(tag, argv)
        try:
            code = child.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{tag} did not finish within {RUN_TIMEOUT_S:.0f}s") from None
        finally:
            self.procs.stop(child)
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        drops1 = listen_drops()
        drops = None if drops0 is None or drops1 is None else drops1 - drops0
        cpu = {name: cpu_seconds(c.pid) - before[name] for name, c in watched.items()}
        cpu["client"] = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        cpu["other"] = max(0.0, machine_busy_seconds() - machine0 - sum(cpu.values()))
        if code != 0:
            raise RuntimeError(f"{tag} failed ({code}):\n{child.log()[-3000:]}")
        if self.ab:
            ab = parse_ab(child.log())
            pct = ab["percentiles"]
            return Load(ab["rps"], {"p50_ms": pct.get(50, float("nan")), "p99_ms": pct.get(99, float("nan"))},
                        int(ab["complete"]), int(ab["failed"] + ab["non_2xx"]), ab["seconds"], cpu, drops)
        data = read_json(report) or {}
        lat = data.get("latencies_ms", [])
        took = float(data.get("seconds", 0.0))
        return Load(ratio(len(lat), took), latency_figures(lat), int(data.get("complete", 0)),
                    int(data.get("failures", 0)), took, cpu, drops)


def _combine(loads: list[Load]) -> Load:
    """Several runs: mean rate, the worse percentiles, summed counts and CPU."""
    rates = [x.req_per_s for x in loads if x.req_per_s is not None]
    return Load(sum(rates) / len(rates) if rates else None,
                {k: max(x.latencies[k] for x in loads) for k in loads[0].latencies},
                sum(x.complete for x in loads), sum(x.failures for x in loads), sum(x.seconds for x in loads),
                {k: sum(x.cpu[k] for x in loads) for k in loads[0].cpu},
                sum(x.listen_drops or 0 for x in loads) if all(x.listen_drops is not None for x in loads) else None)


def _expected_answer(settings: Settings, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The answer the query service gives for the request (computed in process, for the echo callee)."""
    store = SqliteBatchStore(settings.storage.sqlite_path)
    try:
        service = QueryService(settings.query, store, lambda: KeyFile(settings.keys.file).load())
        result: list[dict[str, Any]] = answer(service, body["procedure"], body["args"], body["kwargs"])
        return result
    finally:
        store.close()


def _check_bridge(url: str, body: bytes, rows: int) -> None:
    """One request by hand: the bridge answers 200 with ``rows`` readings."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        got = json.loads(resp.read())
    answer = got.get("args", [None])[0]
    if not isinstance(answer, list) or len(answer) != rows:
        raise RuntimeError(f"POST /call answered {str(got)[:300]}, expected {rows} readings")


def run(opts: Options) -> list[dict[str, Any]]:
    """Fill the classic store, then ceiling and stored load runs on one router; one result line."""
    total, seconds = (REQUESTS_QUICK, SECONDS_QUICK) if opts.quick else (REQUESTS, SECONDS)
    order = ["stored", "ceiling"] if opts.quick else ["ceiling", "stored", "stored", "ceiling"]
    with workspace("http", opts) as root, Procs(root / "logs") as procs, MemorySampler() as mem:
        port = free_port()
        settings = write_settings(root, "http", port)
        provision(settings)
        store = SqliteBatchStore(settings.storage.sqlite_path)
        try:
            report = fill(store, KeyFile(settings.keys.file).load(), classic_events())
        finally:
            store.close()
        request = {"procedure": uris.FETCH_BETWEEN_WINDOW, "args": [CLASSIC_START, CLASSIC_END],
                   "kwargs": {"device_id": DEVICE}}
        answer = _expected_answer(settings, request)
        body_path, answer_path = root / "body.json", root / "answer.json"
        body_path.write_text(json.dumps(request), encoding="utf-8")
        answer_path.write_text(json.dumps(answer), encoding="utf-8")
        url = router_config.http_base(settings) + "/call"
        router = start_router(procs, settings)
        client = Client(procs, root, url, body_path, find_ab(opts))
        note(f"http: {report.readings:,} classic readings stored; device {DEVICE} has {len(answer)} in the year; "
             f"client: {client.name}")
        lines = []
        for keep_alive in (False, True) if client.ab else (False,):
            lines.append(emit(_load_case(procs, mem, settings, router, client, body_path, answer_path, url, answer,
                                         order, total, seconds, keep_alive, report.readings)))
        return lines


def _load_case(procs: Procs, mem: MemorySampler, settings: Settings, router: Child, client: Client, body_path: Path,
               answer_path: Path, url: str, answer: list[dict[str, Any]], order: list[str], total: int,
               seconds: int, keep_alive: bool, store_readings: int) -> dict[str, Any]:
    """Ceiling and stored runs of one kind of client (a connection per request, or kept alive): one line."""
    how = "keep-alive" if keep_alive else "a connection per request"
    tag = "-keepalive" if keep_alive else ""  # log names: each process of the benchmark has its own log
    loads: dict[str, list[Load]] = {"ceiling": [], "stored": []}
    rss: list[float] = []
    for i, mode in enumerate(order):
        if mode == "stored":
            callee = start_component(procs, settings, "query", name=f"query{tag}{i}")
        else:
            callee = procs.start(f"echo{tag}{i}", python_module(
                "bench._echo_callee", "--config", settings.config_path, "--procedure", uris.FETCH_BETWEEN_WINDOW,
                "--answer", str(answer_path)), announces="echo")
            callee.wait_ready(COMPONENT_START_S)
        trace = mem.watch(f"{mode}{i}", callee.pid)
        _check_bridge(url, body_path.read_bytes(), len(answer))
        note(f"http ({how}): {mode} run {i + 1}/{len(order)}: {WARMUP} warm-up, then {total:,} requests or "
             f"{seconds}s, {CONCURRENCY} at once")
        client.run(WARMUP, WARMUP_SECONDS, {}, keep_alive)
        loads[mode].append(client.run(total, seconds, {"router": router, "callee": callee}, keep_alive))
        procs.stop(callee)
        peak = trace.peak_mb()
        if mode == "stored" and peak is not None:
            rss.append(peak)
    stored, ceiling = _combine(loads["stored"]), _combine(loads["ceiling"])
    rate_ok = target(stored.req_per_s, TARGET_REQ_PER_S, prefix="req_per_s_")
    p99_ok = target(stored.latencies["p99_ms"], TARGET_P99_MS, at_most=True, prefix="p99_")
    line = {
        "bench": "http", "case": f"device {DEVICE}, a year, {CONCURRENCY} clients, {how}", "client": client.name,
        "keep_alive": keep_alive, "rows": len(answer), "concurrency": CONCURRENCY, "requests": stored.complete,
        "runs_per_mode": len(loads["stored"]), "max_requests_per_run": total, "max_seconds_per_run": seconds,
        "req_per_s": stored.req_per_s, "ceiling_req_per_s": ceiling.req_per_s,
        "ratio": ratio(stored.req_per_s, ceiling.req_per_s),
        **stored.latencies, **{f"ceiling_{k}": v for k, v in ceiling.latencies.items()},
        "failures": stored.failures, "ceiling_failures": ceiling.failures,
        "listen_drops": stored.listen_drops, "ceiling_listen_drops": ceiling.listen_drops,
        "target": f">= {TARGET_REQ_PER_S:g} req/s and p99 <= {TARGET_P99_MS:g} ms",
        "meets_target": bool(rate_ok["req_per_s_meets_target"] and p99_ok["p99_meets_target"]),
        **rate_ok, **p99_ok,
        "req_per_s_runs": [x.req_per_s for x in loads["stored"]],
        "ceiling_req_per_s_runs": [x.req_per_s for x in loads["ceiling"]],
        **{f"cpu_s_{k}": v for k, v in stored.cpu.items()},
        **{f"ceiling_cpu_s_{k}": v for k, v in ceiling.cpu.items()},
        "load_seconds": stored.seconds, "ceiling_load_seconds": ceiling.seconds,
        "router_us_per_request": ratio(stored.cpu["router"] * 1e6, stored.complete),
        "ceiling_router_us_per_request": ratio(ceiling.cpu["router"] * 1e6, ceiling.complete),
        "callee_us_per_request": ratio(stored.cpu["callee"] * 1e6, stored.complete),
        "query_rss_peak_mb": max(rss, default=None), "store_readings": store_readings,
    }
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.http_bridge [--quick] [--no-install]``."""
    return run_main("http", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
