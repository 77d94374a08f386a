"""Metrics and health of the real storage and query processes behind the real router."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import pytest_twisted
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import PublishOptions
from twisted.internet import threads

from components.ops.launcher import health_url
from components.ops.waiting import free_port, http_json, http_ready
from components.wamp import uris
from tests.support.harness import REPO, derive_settings, start_query, wait_until

ACK = PublishOptions(acknowledge=True)
SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def scrape(url: str) -> dict[str, float]:
    """Samples of a /metrics page by name and labels (``name{a="b"}``), after checking its shape."""
    import urllib.request

    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as response:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ \S", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def metrics_url(settings, service: str) -> str:
    return f"http://127.0.0.1:{settings.monitoring.port(service)}/metrics"


def health(settings, service: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "components", "--config", settings.config_path, "health", service],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest_twisted.inlineCallbacks
def test_storage_and_query_are_ready_from_their_own_process_and_count_what_they_did(running_stack):
    s = running_stack.settings
    for service, proc in (("storage", running_stack.storage), ("query", running_stack.query)):
        doc = yield threads.deferToThread(http_ready, health_url(s, service), proc.proc.pid)
        assert doc == {"service": service, "pid": proc.proc.pid, "live": True, "ready": True, "session": True,
                       "store": True}
        assert (yield threads.deferToThread(http_ready, health_url(s, service), proc.proc.pid + 1)) is None
    device = yield running_stack.device("0")
    topic = uris.sensor_topic("0", "humidity")
    yield device.publish(topic, [{"value": float(i), "ts": 1000.0 + i, "seq": i + 1} for i in range(30)],
                         options=ACK)
    yield device.publish(topic, {"value": "warm", "ts": 1031.0}, options=ACK)
    reader = running_stack.reader
    yield wait_until(lambda: reader.call(uris.GET_STATS).addCallback(lambda st: st["stored"] == 30), 30,
                     message="30 readings stored")
    got = yield threads.deferToThread(scrape, metrics_url(s, "storage"))
    one = '{shard="0-of-1"}'
    assert got[f"iot_readings_received_total{one}"] == 31
    assert got[f"iot_readings_stored_total{one}"] == 30
    assert got['iot_readings_rejected_total{shard="0-of-1",reason="value_not_number"}'] == 1
    assert got[f"iot_readings_shed_total{one}"] == 0 and got[f"iot_readings_duplicates_total{one}"] == 0
    assert got[f"iot_commit_seconds_count{one}"] >= 1
    assert got['iot_commit_seconds_bucket{shard="0-of-1",le="+Inf"}'] == got[f"iot_commit_seconds_count{one}"]
    assert got[f"iot_writer_queue_depth{one}"] == 0 and got[f"iot_compaction_lag_seconds{one}"] == 0
    assert got["process_resident_memory_bytes"] > 10_000_000

    rows = yield reader.call(uris.FETCH_BETWEEN_WINDOW, 1000.0, 1010.0)
    assert len(rows) == 11
    with pytest.raises(ApplicationError):
        yield reader.call(uris.FETCH_BETWEEN_WINDOW, 10.0, 1.0)
    got = yield threads.deferToThread(scrape, metrics_url(s, "query"))
    fetch = 'procedure="iot.fetch_between_window"'
    assert got[f"iot_query_calls_total{{{fetch}}}"] == 2
    assert got[f'iot_query_errors_total{{{fetch},error="iot.error.invalid_argument"}}'] == 1
    assert got[f"iot_query_seconds_count{{{fetch}}}"] == 2
    assert got[f'iot_query_seconds_bucket{{{fetch},le="+Inf"}}'] == 2
    assert got['iot_query_calls_total{procedure="iot.get_stats"}'] >= 1

    checked = yield threads.deferToThread(health, s, "storage")
    assert checked.returncode == 0, checked.stderr
    running_stack.storage.stop()
    checked = yield threads.deferToThread(health, s, "storage")
    assert checked.returncode == 1 and "storage is not ready" in checked.stderr and "nothing answers" in checked.stderr


@pytest_twisted.inlineCallbacks
def test_a_query_callee_whose_store_does_not_answer_is_live_but_not_ready_and_says_why(router, router_settings,
                                                                                     tmp_path):
    s = derive_settings(router_settings, tmp_path, {"storage": {
        "backend": "dynamodb", "dynamodb_endpoint_url": f"http://127.0.0.1:{free_port()}"}})
    env = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
    query = yield start_query(s, env=env)
    try:
        status, doc = yield threads.deferToThread(http_json, health_url(s, "query"))
        assert status == 503
        assert doc["ready"] is False and doc["session"] is True and doc["store"] is False
        assert doc["detail"].startswith("store: ") and "DynamoDB" in doc["detail"]
        status, doc = yield threads.deferToThread(http_json, health_url(s, "query", "live"))
        assert (status, doc["live"], doc["pid"]) == (200, True, query.proc.pid)
    finally:
        query.stop()
