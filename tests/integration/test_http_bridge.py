"""Bad input through the HTTP bridge (``POST /call``, ``POST /publish``), in both router layouts: the router
worker holding the web transport (``router.proxy_workers`` 0) and two proxy workers holding it. Each refusal
comes with its answer, and a good request beside it is still answered."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from components.core.settings import Settings
from components.ops import router_config
from components.wamp import uris
from tests.support.harness import ComponentProcess, RouterProcess, python_process, stack_settings

_PATHS = router_config.load_template()["workers"][0]["transports"][0]["paths"]
CALL_BODY_LIMIT = _PATHS["call"]["options"]["post_body_limit"]
PUBLISH_BODY_LIMIT = _PATHS["publish"]["options"]["post_body_limit"]


@dataclass
class Bridge:
    """A router of one layout with a query callee behind it."""

    settings: Settings

    def post(self, path: str, body: bytes) -> tuple[int, Any]:
        """POST ``body`` (as JSON) to ``path``; the status and the decoded answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.settings.router.listen_port, timeout=30)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def call(self, request: dict[str, Any]) -> tuple[int, Any]:
        """``POST /call`` of ``request``."""
        return self.post("/call", json.dumps(request).encode())


@pytest.fixture(scope="module", params=[0, 2], ids=["router_worker", "two_proxy_workers"])
def bridge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """A router (of each layout in turn) and a query callee on an empty store."""
    root: Path = tmp_path_factory.mktemp(f"bridge{request.param}")
    settings = stack_settings(root, overrides={"router": {"proxy_workers": request.param}})
    router = RouterProcess(settings).start()
    query: ComponentProcess | None = None
    try:
        query = python_process(settings, "query", "components", "query").start()
        query.child.wait_ready(60)
        yield Bridge(settings)
    finally:
        if query is not None:
            query.stop()
        router.stop()


def test_a_body_that_is_not_json_gets_400_with_a_message(bridge: Bridge) -> None:
    status, answer = bridge.post("/call", b'{"procedure": ')
    assert status == 400 and "invalid JSON" in answer["error"]
    status, answer = bridge.post("/publish", b"[1, 2")
    assert status == 400 and "invalid JSON" in answer["error"]
    assert bridge.call({"procedure": uris.GET_MAX_REL_TIME}) == (200, {"args": [None]})  # the good neighbour


def test_a_wrong_argument_gets_the_query_error_with_its_message(bridge: Bridge) -> None:
    status, answer = bridge.call({"procedure": uris.FETCH_BETWEEN_WINDOW, "args": ["a", 1]})
    assert status == 200 and answer["error"] == uris.ERROR_INVALID_ARGUMENT
    assert "start must be a number" in answer["args"][0]
    status, answer = bridge.call({"procedure": uris.FETCH_BETWEEN_WINDOW, "args": [0, 1], "kwargs": {"colour": 1}})
    assert answer["error"] == uris.ERROR_INVALID_ARGUMENT and "no keyword argument 'colour'" in answer["args"][0]
    status, answer = bridge.call({"procedure": uris.FETCH_BETWEEN_WINDOW, "args": [0, 10]})
    assert (status, answer) == (200, {"args": [[]]})


def test_a_wrong_procedure_gets_the_wamp_error(bridge: Bridge) -> None:
    status, answer = bridge.call({"procedure": "iot.fetch_everything"})  # callable by the reader, served by nobody
    assert status == 200 and answer["error"] == "wamp.error.no_such_procedure"
    status, answer = bridge.call({"procedure": "iot.drop_table"})  # outside what the reader may call
    assert status == 200 and answer["error"] == "wamp.error.not_authorized"
    status, answer = bridge.call({"procedure": uris.GET_AUDIT})  # admin only
    assert status == 200 and answer["error"] == "wamp.error.not_authorized"


def test_an_oversized_body_is_refused_with_a_message_naming_the_limit(bridge: Bridge) -> None:
    padded = {"procedure": uris.FETCH_ALL, "kwargs": {"pad": "x" * CALL_BODY_LIMIT}}
    status, answer = bridge.call(padded)
    assert status == 413 and f"longer than accepted {CALL_BODY_LIMIT}" in answer["error"]
    reading = {"value": 1, "ts": 1, "data": {"pad": "x" * PUBLISH_BODY_LIMIT}}
    status, answer = bridge.post("/publish", json.dumps({"topic": uris.sensor_topic("1", "humidity"),
                                                         "args": [reading]}).encode())
    assert status == 413 and f"longer than accepted {PUBLISH_BODY_LIMIT}" in answer["error"]
    status, answer = bridge.post("/publish", json.dumps({"topic": uris.sensor_topic("1", "humidity"),
                                                         "args": [{"value": 1, "ts": 1}]}).encode())
    assert status == 200 and isinstance(answer["id"], int)
