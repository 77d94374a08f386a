"""`make run`'s launcher: starts the whole stack, prints the dashboard URL, stops everything on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import REPO, free_port, write_config


def http_call(config: Path, procedure: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "components", "--config", str(config), "http-call", procedure],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    answer: dict = json.loads(out.stdout)
    assert (out.returncode == 0) == ("error" not in answer), out.stdout + out.stderr
    return answer


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)  # polling a child process against a deadline (this test drives processes, no reactor)


def run_stack(tmp_path: Path, overrides: dict) -> None:
    port = free_port()
    config = write_config(tmp_path, port, {"simulator": {"devices": 2, "rate": 5.0},
                                           "batching": {"max_age_s": 0.2}, **overrides})
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "components", "--config", str(config), "run"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: "Dashboard:" in log_path.read_text(), 120, "the dashboard URL")
        text = log_path.read_text()
        assert f"http://127.0.0.1:{port}/#ticket=" in text
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 4  # router (and its worker), storage, query, devices

        def stored() -> int:
            answer = http_call(config, "iot.get_stats")  # no_such_procedure until the query callee registered
            return int(answer["args"][0]["stored"]) if "args" in answer and "error" not in answer else 0

        wait_for(lambda: stored() >= 10, 90, "readings stored through the whole stack")
        latest = http_call(config, "iot.get_latest")["args"][0]
        assert {r["device_id"] for r in latest} == {"0", "1"}
    finally:
        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        code = launcher.wait(120)
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output
    for child in ("devices", "query", "storage", "router"):
        assert f"stopped {child} (exit 0)" in output, output[-2000:]
    survivors = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], survivors


def test_make_run_starts_the_stack_prints_the_dashboard_url_and_stops_everything_on_ctrl_c(tmp_path) -> None:
    run_stack(tmp_path, {})


@pytest.mark.dynamodb
def test_one_setting_runs_the_whole_stack_on_dynamodb(tmp_path) -> None:
    port = free_port()  # the launcher starts DynamoDB Local there
    run_stack(tmp_path, {"storage": {"backend": "dynamodb", "dynamodb_endpoint_url": f"http://127.0.0.1:{port}"}})
    assert "starting DynamoDB Local" in (tmp_path / "launcher.log").read_text()
