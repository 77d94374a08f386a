"""`make run`'s launcher: starts the whole stack, prints the dashboard URL, stops everything on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from components.ops.waiting import free_port, wait_until
from tests.support.harness import REPO, write_config


def http_call(config: Path, procedure: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "components", "--config", str(config), "http-call", procedure],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    if not out.stdout:  # the router does not answer (yet): one line on stderr says so
        assert out.returncode != 0 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        return {"error": out.stderr}
    answer: dict = json.loads(out.stdout)
    assert (out.returncode == 0) == ("error" not in answer), out.stdout + out.stderr
    return answer


def start_launcher(tmp_path: Path, overrides: dict, env: dict | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """``python -m components run`` (what ``make run`` starts) on a test config; returns (process, config, log)."""
    port = free_port()
    config = write_config(tmp_path, port, {"simulator": {"devices": 2, "rate": 5.0},
                                           "batching": {"max_age_s": 0.2}, **overrides})
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "components", "--config", str(config), "run"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                    env=None if env is None else {**os.environ, **env})
    return launcher, config, log_path


def stored(config: Path) -> int:
    """Readings stored so far, through the HTTP bridge (0 until the query callee has registered)."""
    answer = http_call(config, "iot.get_stats")
    return int(answer["args"][0]["stored"]) if "args" in answer and "error" not in answer else 0


def child_named(launcher: subprocess.Popen, command: str) -> psutil.Process:
    """The launcher's child that runs ``python -m components <command>``."""
    for child in psutil.Process(launcher.pid).children():
        if child.cmdline()[-1:] == [command]:
            return child
    raise AssertionError(f"no {command} child")


def ctrl_c(launcher: subprocess.Popen) -> int:
    """Stop the launcher as Ctrl-C does; its exit code."""
    launcher.send_signal(signal.SIGINT)
    return launcher.wait(120)


def assert_stopped_cleanly(code: int, log_path: Path) -> str:
    """The launcher exited 0 with every service stopped cleanly; its output."""
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output
    for child in ("devices", "query", "storage", "router"):
        assert f"stopped {child} (exit 0)" in output, output[-2000:]
    return output


def run_stack(tmp_path: Path, overrides: dict) -> None:
    launcher, config, log_path = start_launcher(tmp_path, overrides)
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: "Dashboard:" in log_path.read_text(), 120, "the dashboard URL")
        port = json.loads(config.read_text())["router"]["listen_port"]
        assert f"http://127.0.0.1:{port}/#ticket=" in log_path.read_text()
        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) >= 4  # router (and its worker), storage, query, devices
        wait_until(lambda: stored(config) >= 10, 90, "readings stored through the whole stack")
        latest = http_call(config, "iot.get_latest")["args"][0]
        assert {r["device_id"] for r in latest} == {"0", "1"}
    finally:
        code = ctrl_c(launcher)
    assert_stopped_cleanly(code, log_path)
    survivors = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], survivors


def test_make_run_starts_the_stack_prints_the_dashboard_url_and_stops_everything_on_ctrl_c(tmp_path) -> None:
    run_stack(tmp_path, {})


def test_one_setting_runs_the_whole_stack_behind_two_proxy_workers(tmp_path) -> None:
    run_stack(tmp_path, {"router": {"proxy_workers": 2}})  # devices, storage, query and /call through the proxies


@pytest.mark.dynamodb
def test_one_setting_runs_the_whole_stack_on_dynamodb(tmp_path) -> None:
    port = free_port()  # the launcher starts DynamoDB Local there
    run_stack(tmp_path, {"storage": {"backend": "dynamodb", "dynamodb_endpoint_url": f"http://127.0.0.1:{port}"}})
    assert "starting DynamoDB Local" in (tmp_path / "launcher.log").read_text()


def test_storage_killed_under_make_run_comes_back_and_device_0_keeps_every_seq_once(tmp_path) -> None:
    launcher, config, log_path = start_launcher(tmp_path, {"device": {"ack_timeout_s": 2.0}})
    try:
        wait_until(lambda: "Dashboard:" in log_path.read_text(), 120, "the dashboard URL")
        wait_until(lambda: stored(config) >= 20, 120, "readings stored")
        storage = child_named(launcher, "storage")
        storage.kill()  # SIGKILL: what it held uncommitted is lost, and was never acknowledged
        killed_at = time.monotonic()
        before = stored(config)
        wait_until(lambda: "restarted storage" in log_path.read_text(), 30, "the launcher to restart storage")
        wait_until(lambda: child_named(launcher, "storage").pid != storage.pid, 5, "a new storage process")
        wait_until(lambda: stored(config) >= before + 20, 60, "readings stored by the new storage process")
        back_in = time.monotonic() - killed_at
        readings = http_call(config, "iot.fetch_all")["args"][0]
    finally:
        code = ctrl_c(launcher)
    output = assert_stopped_cleanly(code, log_path)
    assert back_in < 30, back_in
    assert "storage killed by SIGKILL" in output, output[-3000:]
    seqs = sorted(r["seq"] for r in readings if r["device_id"] == "0")
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 10  # no gap, no duplicate


def test_a_service_that_keeps_failing_at_once_is_reported_with_its_last_lines_and_the_stack_stops(tmp_path) -> None:
    # keys.source=env without IOT_KEYS: storage and query exit at once with a message, every time
    launcher, _, log_path = start_launcher(tmp_path, {"keys": {"source": "env"}})
    try:
        code = launcher.wait(120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = log_path.read_text()
    assert code == 1, output[-3000:]
    assert "keeps failing" in output and "times in a row" in output, output[-3000:]
    assert "IOT_KEYS is not set" in output.split("keeps failing", 1)[1]  # its last lines, with the reason
    assert output.count("restarted storage") >= 3  # with a backoff in between, not given up at the first exit
    assert "Traceback" not in output, output
    assert "stopped router (exit 0)" in output
