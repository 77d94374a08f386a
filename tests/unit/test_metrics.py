"""The Prometheus text format as written by hand, the commit histogram and the compaction lag."""

from __future__ import annotations

import re
from dataclasses import replace

from components.core.compactor import Compactor
from components.core.metrics import Exposition, Histogram, storage_exposition
from components.storage.sqlite import SqliteBatchStore
from tests.support.corefill import BATCHING, STORAGE, H, ingest, new_ring, topic

LINE = re.compile(r'^(# (HELP|TYPE) [a-z_]+ .+|[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? -?[0-9.e+-]+|.*\+Inf.*)$')


def test_a_histogram_counts_each_observation_in_its_bucket_and_renders_cumulative_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    out = Exposition()
    out.histogram("x_seconds", "X.", [({"shard": 'a"b\\c'}, h)])
    out.counter("x_total", "Things.", [(None, 3), ({"reason": "bad"}, 1)])
    out.gauge("x_depth", "Depth.", [(None, 2.5)])
    text = out.text()
    assert text.splitlines() == [
        "# HELP x_seconds X.", "# TYPE x_seconds histogram",
        'x_seconds_bucket{shard="a\\"b\\\\c",le="0.1"} 2', 'x_seconds_bucket{shard="a\\"b\\\\c",le="1.0"} 3',
        'x_seconds_bucket{shard="a\\"b\\\\c",le="+Inf"} 4', 'x_seconds_sum{shard="a\\"b\\\\c"} 3.65',
        'x_seconds_count{shard="a\\"b\\\\c"} 4',
        "# HELP x_total Things.", "# TYPE x_total counter", "x_total 3", 'x_total{reason="bad"} 1',
        "# HELP x_depth Depth.", "# TYPE x_depth gauge", "x_depth 2.5"]
    assert text.endswith("\n")


def test_storage_metrics_count_commits_and_the_lag_of_a_window_left_uncompacted(tmp_path) -> None:
    ring, other = new_ring(), new_ring()
    store = SqliteBatchStore(tmp_path / "store.sqlite3")
    ingested = ingest(store, ring, replace(STORAGE, writer_queue=100), replace(BATCHING, max_readings=10))
    ingested.events([(topic("1", H), [{"value": 1.0, "ts": 100.0 + i} for i in range(10)], 200.0)
                     for _ in range(3)]).flush()
    text = storage_exposition(ingested.service, None, "0-of-1")
    assert all(LINE.match(line) for line in text.splitlines()), text
    assert 'iot_commit_seconds_count{shard="0-of-1"} ' in text
    commits = int(re.search(r'iot_commit_seconds_count\{shard="0-of-1"\} (\d+)', text).group(1))  # type: ignore[union-attr]
    assert commits >= 1
    assert 'iot_readings_stored_total{shard="0-of-1"} 30' in text
    assert re.search(r"^process_resident_memory_bytes \d+$", text, re.M)
    # a compactor whose keys do not open the window's batches leaves them: the window stays due
    now = 3600.0 * 5
    compactor = Compactor(store, lambda: other, lambda: ingested.service.index, 3600, 60.0, clock=lambda: now)
    assert compactor.lag() == 0.0
    compactor.run_once()
    assert compactor.oldest_due == 3600.0
    assert compactor.lag() == now - 60.0 - 3600.0
    Compactor(store, lambda: ring, lambda: ingested.service.index, 3600, 60.0, clock=lambda: now).run_once()
    compactor.run_once()
    assert compactor.lag() == 0.0 and compactor.oldest_due is None
