"""The stack on DynamoDB Local: nothing is lost while DynamoDB is briefly down, callers hear why."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallOptions
from twisted.internet import threads

from components.ops import dynamodb_local
from components.ops.waiting import wait_for_port
from components.wamp import uris
from devices.simulator import SensorSeries
from tests.support.harness import (
    as_principal,
    derive_settings,
    free_port,
    python_process,
    start_query,
    start_storage,
    wait_until,
)

pytestmark = [pytest.mark.dynamodb, pytest.mark.slow]
SEED = 5


class DynamoLocal:
    """DynamoDB Local with its data on disk, so it can be killed and started again."""

    def __init__(self, root: Path) -> None:
        jar = dynamodb_local.find_jar()
        assert jar is not None, "DynamoDB Local is not installed: run make test-deps"
        self.jar, self.port, self.data = jar, free_port(), root / "dynamodb-data"
        self.data.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(dynamodb_local.command(self.jar, self.port, self.data), cwd=self.jar.parent,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, time.monotonic() + 60, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest_twisted.inlineCallbacks
def test_readings_are_kept_and_retried_while_dynamodb_is_down_and_stored_once_when_it_is_back(
        router, router_settings, tmp_path, monkeypatch) -> None:
    dynamo = DynamoLocal(tmp_path)
    dynamo.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")  # DynamoDB Local takes any credentials; the processes
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")  # started below inherit them
    s = derive_settings(router_settings, tmp_path / "stack", {
        "storage": {"backend": "dynamodb", "dynamodb_endpoint_url": f"http://127.0.0.1:{dynamo.port}",
                    "dynamodb_table": "outage_test"},
        "device": {"ack_timeout_s": 2.0}, "batching": {"max_age_s": 0.3}})
    storage = yield start_storage(s)
    query = yield start_query(s)
    reader = yield as_principal(s, "dashboard")
    sim = python_process(s, "devices", "devices", "simulate", "--device-ids", "0,1", "--count", "150",
                         "--rate", "30", "--batch", "5", "--seed", str(SEED)).start()

    def stored_at_least(n: int):
        d = reader.call(uris.GET_STATS)
        d.addCallbacks(lambda st: st["stored"] >= n, lambda f: False)
        return d

    try:
        yield wait_until(lambda: stored_at_least(60), 60, 0.2, "60 readings stored")
        dynamo.kill()  # DynamoDB goes away mid-stream
        with pytest.raises(ApplicationError) as err:
            yield reader.call(uris.FETCH_ALL, limit=1)
        assert err.value.error == uris.ERROR_STORAGE_UNAVAILABLE
        yield storage.wait_for_log("storage write failed", 30)
        dynamo.start()  # back, with its data
        code = yield threads.deferToThread(sim.wait, 180)  # exits once storage acknowledged every reading
        assert code == 0, sim.log()[-3000:]
        chunks: list[list[dict]] = []
        last = yield reader.call(uris.FETCH_ALL, options=CallOptions(on_progress=chunks.append))
        got = [r for c in chunks for r in c] + last
    finally:
        sim.kill()
        yield reader.close()
        query.stop()
        storage.stop()
        dynamo.kill()
    assert len(got) == 600
    for device_id in ("0", "1"):
        mine = [r for r in got if r["device_id"] == device_id]
        assert sorted(r["seq"] for r in mine) == list(range(1, 301))
        for sensor_type in ("humidity", "temperature"):
            series = sorted((r for r in mine if r["sensor_type"] == sensor_type), key=lambda r: r["seq"])
            assert [r["value"] for r in series] == SensorSeries(SEED, device_id, sensor_type).take(150)
    assert "storage write succeeded after" in storage.log()
