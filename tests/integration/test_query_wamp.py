"""The query procedures over WAMP and over the router's HTTP bridge, on a store filled through the real ingest
path (devices -> router -> storage process -> SQLite), answered by two query callee processes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallOptions, PublishOptions
from twisted.internet import threads

from components.core.settings import Settings
from components.ops.credentials import CredentialStore
from components.wamp import uris
from tests.support.corefill import dataset
from tests.support.harness import (
    REPO,
    ComponentProcess,
    as_device,
    as_principal,
    derive_settings,
    start_query,
    start_storage,
    wait_until,
)

ACK = PublishOptions(acknowledge=True)
MAX_RESULTS, CHUNK = 15, 4


@dataclass
class Stack:
    settings: Settings
    storage: ComponentProcess
    queries: list[ComponentProcess]
    reader: Any
    admin: Any


@pytest_twisted.async_yield_fixture(scope="module")
async def stack(router, router_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("query_stack")
    s = derive_settings(router_settings, root, {"query": {"max_results": MAX_RESULTS, "chunk_size": CHUNK},
                                                "batching": {"max_readings": 7}})
    CredentialStore(s.paths.secrets_dir).add_device("43")  # provisioned while the router runs
    storage = await start_storage(s)
    queries = [await start_query(s, "query-a"), await start_query(s, "query-b")]
    for topic, payload, _ in dataset():
        device = await as_device(s, uris.parse_sensor_topic(topic)[0])
        await device.publish(topic, payload, options=ACK)
        await device.close()
    reader = await as_principal(s, "dashboard")
    admin = await as_principal(s, "admin")
    await wait_until(lambda: reader.call(uris.GET_STATS).addCallback(lambda st: st["stored"] == 23), 30,
                     message="23 readings stored")
    try:
        yield Stack(s, storage, queries, reader, admin)
    finally:
        await reader.close()
        await admin.close()
        for q in queries:
            q.stop()
        storage.stop()


def keys(readings: list[dict]) -> list[tuple[str, str, float]]:
    return [(r["device_id"], r["sensor_type"], r["ts"]) for r in readings]


@pytest_twisted.inlineCallbacks
def test_every_procedure_answers_over_wamp(stack) -> None:
    r = stack.reader
    window = yield r.call(uris.FETCH_BETWEEN_WINDOW, 1003, 1004)
    assert keys(window) == [("1", "humidity", 1003.0), ("1", "temperature", 1003.0), ("1", "temperature", 1003.0),
                            ("1", "humidity", 1004.0)]
    assert window[0]["received_at"] > 0 and window[0]["seq"] == 4
    since = yield r.call(uris.FETCH_SINCE, 1014, device_id="43")
    assert keys(since) == [("43", "humidity", 2000.25)] and since[0]["data"] == {"fw": "1.0"}
    last = yield r.call(uris.FETCH_LAST_N_SEC, 3600, sensor_type="temperature", limit=3)
    assert keys(last) == [("1", "temperature", 1003.0), ("1", "temperature", 1003.0), ("2", "temperature", 1005.0)]
    latest_two = yield r.call(uris.FETCH_LAST_WINDOW, 2)
    assert keys(latest_two) == [("2", "temperature", 1014.0), ("43", "humidity", 2000.25)]
    assert len((yield r.call(uris.FETCH_ALL, device_id="2"))) == 10
    assert (yield r.call(uris.GET_MAX_REL_TIME)) == 2000.25
    devices = yield r.call(uris.LIST_DEVICES)
    assert [(d["device_id"], d["count"]) for d in devices] == [("1", 12), ("2", 10), ("43", 1)]
    latest = yield r.call(uris.GET_LATEST, device_id="1")
    assert [(x["sensor_type"], x["ts"]) for x in latest] == [("humidity", 1009.0), ("temperature", 1003.0)]
    agg = yield r.call(uris.AGGREGATE, 1000, 1004.5, 5, device_id="1", sensor_type="humidity")
    assert agg == [{"bucket_start": 1000.0, "device_id": "1", "sensor_type": "humidity", "count": 5, "min": 0.0,
                    "max": 4.0, "mean": 2.0}]
    stats = yield r.call(uris.GET_STATS)
    assert stats["stored"] == 23 and stats["received"] == 23
    audit = yield stack.admin.call(uris.GET_AUDIT, limit=MAX_RESULTS)
    assert {"dashboard"} <= {e["authid"] for e in audit}
    fetches = [e for e in audit if e["procedure"] == uris.FETCH_SINCE and e["authid"] == "dashboard"]
    assert fetches[-1]["args"] == [1014] and fetches[-1]["kwargs"] == {"device_id": "43"} and fetches[-1]["rows"] == 1
    assert fetches[-1]["authrole"] == "reader"


@pytest.mark.parametrize("procedure,args,kwargs,uri,fragment", [
    (uris.FETCH_BETWEEN_WINDOW, [10, 1], {}, uris.ERROR_INVALID_ARGUMENT, "start (10.0) is after end (1.0)"),
    (uris.FETCH_BETWEEN_WINDOW, ["x", 1], {}, uris.ERROR_INVALID_ARGUMENT, "start must be a number"),
    (uris.FETCH_LAST_N_SEC, [-1], {}, uris.ERROR_INVALID_ARGUMENT, "n must be a non-negative integer"),
    (uris.FETCH_ALL, [], {"colour": "red"}, uris.ERROR_INVALID_ARGUMENT, "no keyword argument 'colour'"),
    (uris.FETCH_ALL, [], {}, uris.ERROR_TOO_MANY_RESULTS, "more than query.max_results (15)"),
    (uris.GET_AUDIT, [], {}, "wamp.error.not_authorized", "get_audit"),
])
@pytest_twisted.inlineCallbacks
def test_each_error_reaches_the_caller_as_its_uri_with_a_message(stack, procedure, args, kwargs, uri, fragment):
    with pytest.raises(ApplicationError) as err:
        yield stack.reader.call(procedure, *args, **kwargs)
    assert err.value.error == uri
    assert fragment in err.value.args[0]


@pytest_twisted.inlineCallbacks
def test_progressive_results_stream_the_whole_answer_in_chunks(stack) -> None:
    chunks: list[list[dict]] = []
    final = yield stack.reader.call(uris.FETCH_ALL, options=CallOptions(on_progress=chunks.append))
    everything = [r for c in chunks for r in c] + final
    assert [len(c) for c in chunks] == [CHUNK] * 5 and len(final) == 3
    assert len(everything) == 23 and [r["ts"] for r in everything] == sorted(r["ts"] for r in everything)
    limited = yield stack.reader.call(uris.FETCH_ALL, limit=15)
    assert limited == everything[:15]


@pytest_twisted.inlineCallbacks
def test_two_callees_share_the_load(stack) -> None:
    t0 = time.time()
    for _ in range(10):
        yield stack.reader.call(uris.FETCH_LAST_WINDOW, 1, device_id="2")

    def served_by(entries: list[dict]) -> set[str]:
        return {e["served_by"] for e in entries if e["procedure"] == uris.FETCH_LAST_WINDOW}

    # each callee writes its audit entries within a second; poll slowly so the polls do not crowd them out
    yield wait_until(lambda: stack.admin.call(uris.GET_AUDIT, since=t0, limit=MAX_RESULTS).addCallback(
        lambda entries: len(served_by(entries)) == 2), 15, interval=1.0, message="calls served by both callees")


@pytest_twisted.inlineCallbacks
def test_a_broken_database_gives_storage_unavailable(stack, tmp_path) -> None:
    broken = derive_settings(stack.settings, tmp_path)
    # a third callee shares the registration; its database is overwritten under it once it runs
    callee = yield start_query(broken, "query-broken")
    for path in tmp_path.glob("iot.sqlite3*"):
        path.write_bytes(b"this is not a database" * 1000)
    errors = []
    try:
        for _ in range(6):
            try:
                yield stack.reader.call(uris.GET_MAX_REL_TIME)
            except ApplicationError as err:
                errors.append(err)
    finally:
        callee.stop()
    assert errors and {e.error for e in errors} == {uris.ERROR_STORAGE_UNAVAILABLE}
    assert "file is not a database" in errors[0].args[0] and "SQLite" in errors[0].args[0]


def readme_curl_commands(port: int) -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme.split("### HTTP bridge", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = re.sub(r"\\\n\s*", "", block)
    return [line.replace(":8080/", f":{port}/") for line in commands.splitlines() if line.startswith("curl ")]


def run_curl(command: str) -> Any:
    out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


@pytest_twisted.inlineCallbacks
def test_the_readme_curl_commands_work_against_the_http_bridge(stack) -> None:
    commands = readme_curl_commands(stack.settings.router.listen_port)
    assert len(commands) == 3 and "/publish" in commands[2]
    published = yield threads.deferToThread(run_curl, commands[2])
    assert isinstance(published["id"], int)
    yield wait_until(lambda: stack.reader.call(uris.FETCH_ALL, device_id="14").addCallback(bool), 20,
                     message="the reading published over HTTP")
    device_1 = yield threads.deferToThread(run_curl, commands[0])
    device_43 = yield threads.deferToThread(run_curl, commands[1])
    assert device_1 == {"args": [[]]} and device_43 == {"args": [[]]}  # the dataset lies before that window
    stored = yield stack.reader.call(uris.FETCH_BETWEEN_WINDOW, 1500052521, 1500052521, device_id="14")
    assert [(r["sensor_type"], r["value"], r["ts"]) for r in stored] == [("humidity", 99, 1500052521)]


@pytest_twisted.inlineCallbacks
def test_the_http_bridge_answers_errors_as_json(stack) -> None:
    port = stack.settings.router.listen_port
    body = json.dumps({"procedure": uris.FETCH_BETWEEN_WINDOW, "args": [5, 1]})
    command = f"curl -s -H 'Content-Type: application/json' -d '{body}' http://127.0.0.1:{port}/call"
    answer = yield threads.deferToThread(run_curl, command)
    assert answer["error"] == uris.ERROR_INVALID_ARGUMENT and "start (5.0) is after end (1.0)" in answer["args"][0]


@pytest_twisted.inlineCallbacks
def test_the_analytics_example_prints_a_summary_and_plots_the_series(stack, tmp_path) -> None:
    chart = tmp_path / "chart.png"
    result = yield threads.deferToThread(
        subprocess.run, [sys.executable, str(REPO / "examples" / "analytics.py"), "--config",
                         stack.settings.config_path, "--start", "1000", "--end", "1010", "--bucket", "5",
                         "--plot", str(chart)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "18 readings between 1000 and 1010"
    assert any(re.match(r"\s+1 humidity\s+10\s+0\.00\s+9\.00\s+4\.50", line) for line in lines), result.stdout
    assert any(re.match(r"\s+2 temperature\s+6\s+100\.00\s+105\.00\s+102\.50", line) for line in lines)
    assert chart.stat().st_size > 10_000 and chart.read_bytes()[:4] == b"\x89PNG"
