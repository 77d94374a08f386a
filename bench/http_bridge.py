"""HTTP bridge: 100 concurrent clients calling ``iot.fetch_between_window`` for one device through ``POST /call``.

The store holds the classic data model (51 devices, humidity and temperature, 5,000 readings over 2017-07-04
to 2018-07-04), filled through the real IngestService and compacted by the real Compactor, as the storage
process compacts it once those windows have closed (hour segments, then rolled up); a real router and query
callee serve it. ``ab`` (Debian's apache2-utils, installed with apt-get when missing unless ``--no-install``;
else a bounded Python client, bench/_httpclient.py) posts ``{"procedure": "iot.fetch_between_window", "args":
[start, end], "kwargs": {"device_id": "1"}}`` with 100 requests in flight, a bounded number of times (and
seconds) after a warm-up: once with a new connection per request, and (ab only) once with every client keeping
its connection alive, as HTTP client libraries do. The router-only baseline in the same run: the same requests
answered by a callee that returns the same answer without doing anything (bench/_echo_callee.py), in the order
ceiling, stored, stored, ceiling (stored, ceiling in quick mode). All of it in each router layout in turn: the
router worker holding the web transport (``router.proxy_workers`` 0), then 1 and 2 proxy workers holding it.
Figures: requests per second, p50, p99, failures; CPU seconds per process over the run (router worker, proxy
workers, node controller, callee, client) and per request, and each one's share of a core (``busy_*``); the
query callee's peak RSS; how many records the query reads (those of device 1's group, which other devices may
share: the index key is random per run); and the kernel's ListenDrops over each run (connections a listen
queue had no room for: each costs the client a SYN retransmission, a second or more of latency). Then, over
WAMP and one call at a time in the default layout, p50 and p99 of a 10-reading ``fetch_between_window`` next
to an echo callee answering the same 10 readings.
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
    run_caller,
    start_component,
    start_router,
    workspace,
    write_settings,
)
from bench.usage import MemorySampler, crossbar_processes, machine_busy_seconds, own_cpu_seconds
from components.core.compactor import CompactionReport, Compactor
from components.core.query import QueryService
from components.core.sealing import KeyFile
from components.core.settings import RouterSettings, Settings
from components.ops import router_config
from components.ops.supervisor import Child
from components.ops.waiting import free_port
from components.storage.interface import BATCH, SEGMENT
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
TARGET_REQ_PER_S, TARGET_P99_MS, TARGET_RATIO = 1150.0, 250.0, 0.8
LAYOUTS = (0, 1, 2)
"""Proxy workers of the router layouts measured side by side (0: the router worker holds the web transport)."""
DEFAULT_LAYOUT = RouterSettings.proxy_workers
ECHO_PROCEDURE = "iot.fetch_echo"
"""What the echo callee registers for the WAMP latencies (the query role may register it, a reader call it)."""
RUN_TIMEOUT_S = 180.0
COLUMNS = {"http": ["rows", "requests", "req_per_s", "ceiling_req_per_s", "ratio", "p50_ms", "p99_ms",
                    "ceiling_p99_ms", "failures", "listen_drops", "meets_target", "router_us_per_request",
                    "proxies_us_per_request", "callee_us_per_request", "busy_router", "busy_proxies", "busy_callee",
                    "query_rss_peak_mb"],
           "http_wamp": ["rows", "calls", "p50_ms", "p99_ms", "echo_p50_ms", "echo_p99_ms", "p50_ratio", "errors"],
           "http_layouts": ["req_per_s_proxies0", "req_per_s_proxies1", "req_per_s_proxies2",
                            "stack_us_per_request_proxies0", "stack_us_per_request_proxies1",
                            "stack_us_per_request_proxies2", "fastest_proxy_workers", "leanest_proxy_workers",
                            "default_proxy_workers"]}


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

    def run(self, total: int, seconds: int, watched: dict[str, list[int]], keep_alive: bool = False) -> Load:
        """``total`` requests (at most ``seconds``), CONCURRENCY at a time; CPU of the processes ``watched`` (by
        name, their pids) and of the client.

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
        before = {name: sum(map(own_cpu_seconds, pids)) for name, pids in watched.items()}
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
        cpu = {name: sum(map(own_cpu_seconds, pids)) - before[name] for name, pids in watched.items()}
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


def _compact(store: SqliteBatchStore, settings: Settings) -> CompactionReport:
    """Compact every closed window, as the storage process does (the classic year has long ended)."""
    ring = KeyFile(settings.keys.file).load()
    index = QueryService(settings.query, store, lambda: ring).index
    return Compactor(store, lambda: ring, lambda: index, settings.storage.segment_seconds,
                     settings.storage.compact_after_s, retention_s=settings.storage.retention_days * 86400.0).run_once()


def _records_read(settings: Settings, device: str, start: float, end: float) -> int:
    """How many records (write batches and segments) a one-device query of [start, end] reads: those of the
    device's group. Which other devices share that group depends on the store's index key (random per run)."""
    store = SqliteBatchStore(settings.storage.sqlite_path)
    try:
        service = QueryService(settings.query, store, lambda: KeyFile(settings.keys.file).load())
        groups = service.index.groups_of(device)
        return sum(len(store.batches_by_ts(start, end, kind, groups)) for kind in (BATCH, SEGMENT))
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
    """Fill the classic store, then for each router layout ceiling and stored load runs; one line per layout and
    kind of client, and one line of WAMP latencies."""
    total, seconds = (REQUESTS_QUICK, SECONDS_QUICK) if opts.quick else (REQUESTS, SECONDS)
    order = ["stored", "ceiling"] if opts.quick else ["ceiling", "stored", "stored", "ceiling"]
    with workspace("http", opts) as root, Procs(root / "logs") as procs, MemorySampler() as mem:
        base = write_settings(root, "http", free_port())
        provision(base)
        store = SqliteBatchStore(base.storage.sqlite_path)
        try:
            report = fill(store, KeyFile(base.keys.file).load(), classic_events())
            compacted = _compact(store, base)
        finally:
            store.close()
        request = {"procedure": uris.FETCH_BETWEEN_WINDOW, "args": [CLASSIC_START, CLASSIC_END],
                   "kwargs": {"device_id": DEVICE}}
        answer = _expected_answer(base, request)
        records = _records_read(base, DEVICE, CLASSIC_START, CLASSIC_END)
        body_path, answer_path = root / "body.json", root / "answer.json"
        body_path.write_text(json.dumps(request), encoding="utf-8")
        answer_path.write_text(json.dumps(answer), encoding="utf-8")
        client = Client(procs, root, "", body_path, find_ab(opts))
        note(f"http: {report.readings:,} classic readings stored; device {DEVICE} has {len(answer)} in the year; "
             f"they are in {records} records of its group (compaction: {compacted.records_in:,} write batches into "
             f"{compacted.segments_out:,} segments, {compacted.rollups:,} rollups merging {compacted.rolled_in:,}); "
             f"client: {client.name}; "
             f"router layouts (proxy workers): {', '.join(map(str, LAYOUTS))}")
        lines = []
        for workers in LAYOUTS:
            settings = write_settings(root, f"http-proxies{workers}", free_port(), {
                "router": {"proxy_workers": workers}, "storage": {"sqlite_path": base.storage.sqlite_path},
                "paths": {"run_dir": str(root / f"run-proxies{workers}")}},
                secrets_dir=Path(base.paths.secrets_dir))
            router = start_router(procs, settings, name=f"router-proxies{workers}")
            client.url = router_config.http_base(settings) + "/call"
            for keep_alive in (False, True) if client.ab else (False,):
                lines.append(emit(_load_case(procs, mem, settings, router, client, body_path, answer_path, answer,
                                             order, total, seconds, keep_alive, report.readings) | {
                                                 "records_read": records}))
            if workers == DEFAULT_LAYOUT:
                lines.append(emit(_wamp_latencies(procs, settings, root, answer, opts.quick)))
            procs.stop(router)
        lines.append(emit(_layouts_line(lines)))
        return lines


def _layouts_line(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The layouts side by side (a connection per request): which one the figures favour.

    Rates move with whatever else the machine runs; the CPU the stack spends per request (router worker,
    proxies, controller and callee) moves much less, and on a machine whose cores the stack shares it is what
    bounds the rate: ``leanest_proxy_workers`` is the layout that spends least."""
    rows = [x for x in lines if x.get("bench") == "http" and not x["keep_alive"]]
    cpu = {x["proxy_workers"]: sum(x[f"{k}_us_per_request"] or 0.0 for k in ("router", "proxies", "controller",
                                                                             "callee")) for x in rows}
    fastest = max(rows, key=lambda x: x["req_per_s"] or 0.0)
    return {"bench": "http_layouts", "case": "router layouts, a connection per request",
            **{f"req_per_s_proxies{x['proxy_workers']}": x["req_per_s"] for x in rows},
            **{f"p99_ms_proxies{x['proxy_workers']}": x["p99_ms"] for x in rows},
            **{f"ratio_proxies{x['proxy_workers']}": x["ratio"] for x in rows},
            **{f"stack_us_per_request_proxies{n}": v for n, v in cpu.items()},
            "fastest_proxy_workers": fastest["proxy_workers"], "leanest_proxy_workers": min(cpu, key=cpu.__getitem__),
            "default_proxy_workers": DEFAULT_LAYOUT}


def _watched(router: Child, callee: Child) -> dict[str, list[int]]:
    """The processes whose CPU a load run reports: the node's controller, router worker and proxies, the callee."""
    node = crossbar_processes(router.pid)
    return {"router": node["router"], "proxies": node["proxy"], "controller": node["controller"],
            "callee": [callee.pid]}


def _start_callee(procs: Procs, settings: Settings, mode: str, name: str, answer_path: Path,
                  procedure: str = uris.FETCH_BETWEEN_WINDOW) -> Child:
    """The query callee (``stored``) or the echo callee answering ``procedure`` with the fixed answer (``ceiling``)."""
    if mode == "stored":
        return start_component(procs, settings, "query", name=name)
    callee = procs.start(name, python_module(
        "bench._echo_callee", "--config", settings.config_path, "--procedure", procedure,
        "--answer", str(answer_path)), announces="echo")
    return callee.wait_ready(COMPONENT_START_S)


def _load_case(procs: Procs, mem: MemorySampler, settings: Settings, router: Child, client: Client, body_path: Path,
               answer_path: Path, answer: list[dict[str, Any]], order: list[str], total: int, seconds: int,
               keep_alive: bool, store_readings: int) -> dict[str, Any]:
    """Ceiling and stored runs of one layout and kind of client (a connection per request, or kept alive)."""
    workers = settings.router.proxy_workers
    how = "keep-alive" if keep_alive else "a connection per request"
    tag = f"-proxies{workers}" + ("-keepalive" if keep_alive else "")  # each process of the run has its own log
    loads: dict[str, list[Load]] = {"ceiling": [], "stored": []}
    rss: list[float] = []
    for i, mode in enumerate(order):
        callee = _start_callee(procs, settings, mode, f"{'query' if mode == 'stored' else 'echo'}{tag}{i}",
                               answer_path)
        trace = mem.watch(f"{mode}{tag}{i}", callee.pid)
        _check_bridge(client.url, body_path.read_bytes(), len(answer))
        note(f"http ({workers} proxy workers, {how}): {mode} run {i + 1}/{len(order)}: {WARMUP} warm-up, then "
             f"{total:,} requests or {seconds}s, {CONCURRENCY} at once")
        client.run(WARMUP, WARMUP_SECONDS, {}, keep_alive)
        loads[mode].append(client.run(total, seconds, _watched(router, callee), keep_alive))
        procs.stop(callee)
        peak = trace.peak_mb()
        if mode == "stored" and peak is not None:
            rss.append(peak)
    stored, ceiling = _combine(loads["stored"]), _combine(loads["ceiling"])
    rate_ok = target(stored.req_per_s, TARGET_REQ_PER_S, prefix="req_per_s_")
    p99_ok = target(stored.latencies["p99_ms"], TARGET_P99_MS, at_most=True, prefix="p99_")
    ratio_ok = target(ratio(stored.req_per_s, ceiling.req_per_s), TARGET_RATIO, prefix="ratio_")
    per_request = {f"{k}_us_per_request": ratio(stored.cpu[k] * 1e6, stored.complete)
                   for k in ("router", "proxies", "controller", "callee", "client")}
    ceiling_per_request = {f"ceiling_{k}_us_per_request": ratio(ceiling.cpu[k] * 1e6, ceiling.complete)
                           for k in ("router", "proxies", "callee")}
    busy = {f"busy_{k}": ratio(v, stored.seconds) for k, v in stored.cpu.items()}
    return {
        "bench": "http", "case": f"device {DEVICE}, a year, {CONCURRENCY} clients, {how}, {workers} proxy workers",
        "client": client.name, "keep_alive": keep_alive, "proxy_workers": workers, "rows": len(answer),
        "concurrency": CONCURRENCY, "requests": stored.complete,
        "runs_per_mode": len(loads["stored"]), "max_requests_per_run": total, "max_seconds_per_run": seconds,
        "req_per_s": stored.req_per_s, "ceiling_req_per_s": ceiling.req_per_s,
        "ratio": ratio(stored.req_per_s, ceiling.req_per_s), **ratio_ok,
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
        **per_request, **ceiling_per_request, **busy,
        "load_seconds": stored.seconds, "ceiling_load_seconds": ceiling.seconds,
        "query_rss_peak_mb": max(rss, default=None), "store_readings": store_readings,
    }


WAMP_ROWS = 10
WAMP_CALLS, WAMP_CALLS_QUICK = 2000, 500
WAMP_ROUNDS = 2
"""Fetch and echo calls alternate in rounds, so both see the same machine."""


def _wamp_latencies(procs: Procs, settings: Settings, root: Path, year: list[dict[str, Any]], quick: bool
                    ) -> dict[str, Any]:
    """p50/p99 of a 10-reading ``fetch_between_window`` over WAMP (one call at a time) next to an echo call: a
    callee that answers the same 10 readings without work, in the same run."""
    end = year[WAMP_ROWS - 1]["ts"]
    request = {"procedure": uris.FETCH_BETWEEN_WINDOW, "args": [CLASSIC_START, end], "kwargs": {"device_id": DEVICE}}
    ten = _expected_answer(settings, request)
    path = root / "answer10.json"
    path.write_text(json.dumps(ten), encoding="utf-8")
    query = _start_callee(procs, settings, "stored", "query-wamp", path)
    echo = _start_callee(procs, settings, "ceiling", "echo-wamp", path, procedure=ECHO_PROCEDURE)
    calls = (WAMP_CALLS_QUICK if quick else WAMP_CALLS) // WAMP_ROUNDS
    cases: list[dict[str, Any]] = []
    for r in range(WAMP_ROUNDS):
        for name, procedure in (("fetch", uris.FETCH_BETWEEN_WINDOW), ("echo", ECHO_PROCEDURE)):
            cases.append({"name": f"{name}{r}", "procedure": procedure, "args": request["args"],
                          "kwargs": request["kwargs"], "calls": calls, "warmup": 50, "max_seconds": 60.0})
    note(f"http: WAMP latencies, {WAMP_ROWS}-reading fetch_between_window next to an echo call, one at a time")
    try:
        got = run_caller(procs, settings, root, "caller-wamp", cases, timeout=300.0)
    finally:
        procs.stop(echo)
        procs.stop(query)
    fetch = [ms for r in range(WAMP_ROUNDS) for ms in got[f"fetch{r}"]["latencies_ms"]]
    echoed = [ms for r in range(WAMP_ROUNDS) for ms in got[f"echo{r}"]["latencies_ms"]]
    rows = {got[c["name"]]["rows"] for c in cases}
    if rows != {len(ten)} or len(ten) != WAMP_ROWS:
        raise RuntimeError(f"WAMP calls answered {rows} readings, expected {WAMP_ROWS}")
    errors = sum(got[c["name"]]["errors"] for c in cases)
    fig, echo_fig = latency_figures(fetch), latency_figures(echoed, "echo_")
    return {"bench": "http_wamp", "case": f"fetch_between_window, {WAMP_ROWS} readings, over WAMP, one call at a time",
            "proxy_workers": settings.router.proxy_workers, "rows": WAMP_ROWS, "calls": len(fetch),
            **fig, **echo_fig, "p50_ratio": ratio(fig["p50_ms"], echo_fig["echo_p50_ms"]), "errors": errors}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.http_bridge [--quick] [--no-install]``."""
    return run_main("http", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
