"""Property-based tests: arbitrary JSON fed to the storage subscriber and to every query procedure.

No crash, every bad input answered with the documented error, good readings beside bad ones still stored.
The core is fuzzed directly with many examples; a shorter run goes through the real router and processes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.core import readings as rd
from components.core.batches import iter_readings, open_groups
from components.core.errors import InvalidArgument, TooManyResults
from components.core.query import QueryService
from components.core.sealing import KeyFile
from components.storage.sqlite import SqliteBatchStore
from components.wamp import uris
from components.wamp.callee import answer
from components.wamp.subscriber import deliver
from tests.support.corefill import QUERY, dataset, fill, ingest, new_ring
from tests.support.harness import REPO, derive_settings, python_process

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
readingish = st.fixed_dictionaries({}, optional={
    "value": json_values, "ts": json_values, "seq": json_values, "data": json_values,
    "device_id": st.sampled_from(["0", "1", "x"]) | scalars, "sensor_type": st.sampled_from(["humidity"]) | scalars,
    "unit": scalars})
payloads = readingish | json_values | st.lists(readingish | json_values, max_size=8)
segment = st.text(alphabet=st.characters(blacklist_characters=".# \t\r\n\x0b\x0c",
                                         blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
                  min_size=1, max_size=10)
# lighter values for the end-to-end run, which draws many of them in one example
wire_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))  # what msgpack can carry
small_values = st.recursive(wire_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=4)
small_payloads = st.fixed_dictionaries({"value": small_values, "ts": small_values}) | small_values | \
    st.lists(st.fixed_dictionaries({"value": small_values, "ts": small_values}), max_size=3)
topics = st.sampled_from([uris.sensor_topic("0", "humidity"), uris.sensor_topic("0", "temperature")]) | \
    segment.map(lambda t: f"iot.sensor.0.{t}")

GOOD_TYPE = "goodreadings"


def good(i: int) -> dict:
    return {"value": float(i), "ts": 1_000_000.0 + i}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(topics, payloads), max_size=12))
def test_the_ingest_service_survives_any_event_and_keeps_the_good_readings(tmp_path_factory, events) -> None:
    store = SqliteBatchStore(tmp_path_factory.mktemp("fuzz") / "db.sqlite3")
    ring = new_ring()
    ing = ingest(store, ring)
    for i, (topic, payload) in enumerate(events):
        deliver(ing.service, topic, payload, 1.0)
        ing.service.ingest("0", GOOD_TYPE, [good(i), {"value": "bad", "ts": 1.0}, good(-i)], 1.0)
    ing.flush()
    stats = ing.service.stats()
    assert set(stats["rejected"]) <= set(rd.REASONS)
    stored = [r for b in store.batches_by_ts(-math.inf, math.inf) for r in iter_readings(open_groups(ring, b))]
    assert len(stored) == stats["stored"]
    assert stats["received"] == stats["stored"] + sum(stats["rejected"].values()) + stats["duplicates"] + \
        stats["out_of_order"] + stats["shed"]
    goods = sorted(r[4] for r in stored if r[1] == GOOD_TYPE)
    assert goods == sorted([float(i) for i in range(len(events))] + [float(-i) for i in range(len(events))])
    store.close()


def jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


@pytest.fixture(scope="module")
def filled_service(tmp_path_factory) -> QueryService:
    store = SqliteBatchStore(tmp_path_factory.mktemp("fuzzq") / "db.sqlite3")
    ring = new_ring()
    fill(store, ring, dataset(), max_readings=7)
    return QueryService(QUERY, store, lambda: ring)


@settings(max_examples=400, deadline=None)
@given(procedure=st.sampled_from([p for p in uris.PROCEDURES if p != uris.GET_AUDIT]),
       args=st.lists(json_values, max_size=4),
       kwargs=st.dictionaries(st.sampled_from(["device_id", "sensor_type", "limit", "start", "end", "n", "bucket",
                                               "since", "x"]) | st.text(max_size=6), json_values, max_size=3))
def test_every_query_procedure_answers_any_arguments_or_refuses_them_with_a_documented_error(
        filled_service, procedure, args, kwargs) -> None:
    try:
        result = answer(filled_service, procedure, args, kwargs)
    except (InvalidArgument, TooManyResults) as err:
        assert uris.error_uri(err) in uris.ERRORS and str(err)
        return
    assert jsonable(result) or result is None


FUZZ_CLIENT = """
import sys, json, msgpack, txaio
txaio.use_twisted()
from twisted.internet import defer, task
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import PublishOptions
from components.core.settings import load_settings
from tests.support.harness import as_device, as_principal

@defer.inlineCallbacks
def main(reactor):
    s = load_settings(sys.argv[1])
    work = msgpack.unpackb(open(sys.argv[2], "rb").read(), strict_map_key=False)
    device = yield as_device(s, "0", serializer="msgpack")
    for topic, payload in work["events"]:
        try:
            yield device.publish(topic, payload, options=PublishOptions(acknowledge=True))
        except ApplicationError as err:
            print("publish-refused", err.error, flush=True)
    reader = yield as_principal(s, "dashboard", serializer="msgpack")
    for procedure, args, kwargs in work["calls"]:
        try:
            yield reader.call(procedure, *args, **kwargs)
            print("call-ok", flush=True)
        except ApplicationError as err:
            print("call-error", err.error, flush=True)
    yield device.close()
    yield reader.close()

task.react(main)
"""


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                               HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=st.lists(st.tuples(topics, small_payloads), min_size=15, max_size=25),
       calls=st.lists(st.tuples(st.sampled_from([p for p in uris.PROCEDURES if p != uris.GET_AUDIT]),
                                st.lists(small_values, max_size=3),
                                st.dictionaries(st.sampled_from(["device_id", "limit", "bogus"]), small_values,
                                                max_size=2)), min_size=10, max_size=20))
def test_arbitrary_json_through_the_router_leaves_storage_and_query_running(router, router_settings,
                                                                            tmp_path_factory, events, calls) -> None:
    s = derive_settings(router_settings, tmp_path_factory.mktemp("fuzzwamp"))
    storage = python_process(s, "storage", "components", "storage").start()
    query = python_process(s, "query", "components", "query").start()
    storage.child.wait_ready(60)
    query.child.wait_ready(60)
    work_events = []
    for i, event in enumerate(events):
        work_events.append(list(event))
        work_events.append([uris.sensor_topic("0", GOOD_TYPE), [good(i), {"value": math.nan, "ts": 1.0}]])
    work = Path(s.paths.run_dir) / "work.msgpack"
    work.write_bytes(msgpack.packb({"events": work_events, "calls": [list(c) for c in calls]}))
    try:
        result = subprocess.run([sys.executable, "-c", FUZZ_CLIENT, s.config_path, str(work)], capture_output=True,
                                text=True, timeout=180, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        out = result.stdout.splitlines()
        errors = {line.split()[1] for line in out if line.startswith("call-error")}
        assert errors <= {uris.ERROR_INVALID_ARGUMENT, uris.ERROR_TOO_MANY_RESULTS}, errors
        assert sum(1 for line in out if line.startswith("call-")) == len(calls)
        assert not [line for line in out if line.startswith("publish-refused")]
        assert storage.proc.poll() is None and query.proc.poll() is None  # nothing crashed
    finally:
        storage.stop()
        query.stop()
    store = SqliteBatchStore(s.storage.sqlite_path)
    ring = KeyFile(s.keys.file).load()
    stored = [r for b in store.batches_by_ts(-math.inf, math.inf) for r in iter_readings(open_groups(ring, b))]
    store.close()
    assert sorted(r[4] for r in stored if r[1] == GOOD_TYPE) == [float(i) for i in range(len(events))]
    assert "Traceback" not in storage.log() and "Traceback" not in query.log()

