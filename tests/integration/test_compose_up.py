"""The compose stacks for real: started, probed from the host over loopback, scaled, crashed, stopped, started.

Run by ``make compose-test`` (docker/compose-test.sh), which gets a Docker engine and builds the images first and
names them in SENSORHUB_TAG and DYNAMODB_IMAGE; a plain ``pytest`` run deselects these tests (marker
``containers``). Each stack runs as a compose project of its own, from an env file made from .env.example,
publishes the router on a free loopback port only, and is removed with its volumes at the end (the images stay,
as the cache of the next run).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_twisted
from twisted.internet import defer

from components.core.ingest import shard_of
from components.core.settings import load_settings
from components.ops import waiting
from components.ops.waiting import free_port
from tests.support.harness import REPO, Session, as_principal, wait_until

pytestmark = [pytest.mark.containers, pytest.mark.timeout(900)]

COMPOSE = Path(sys.executable).with_name("docker-compose")
PROJECT = "sensorhub-compose-test"


@dataclass(frozen=True)
class Variant:
    files: tuple[str, ...]
    shards: int
    services: frozenset[str]  # the long-running ones (init runs once)


VARIANTS = {
    "sqlite": Variant(("docker-compose.yml", "docker-compose.sqlite.yml"), 1,
                      frozenset({"router", "storage_0", "query", "devices"})),
    "dynamodb": Variant(("docker-compose.yml",), 2,
                        frozenset({"router", "storage_0", "storage_1", "query", "devices", "dynamodb"})),
}
UP_TIMEOUT = 300
DEVICES = 6  # IOT_SIMULATOR_DEVICES of .env.example


@dataclass
class Stack:
    """One running compose project and what the host needs to talk to it."""

    variant: str
    env_file: Path
    port: int
    secrets: Path  # on the host: copies of the bridge secret and the admin ticket

    # -- compose and docker
    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(COMPOSE), "-p", PROJECT, "--project-directory", str(REPO), "--env-file", str(self.env_file)]
        for name in VARIANTS[self.variant].files:
            argv += ["-f", str(REPO / name)]
        # a clean environment: only the env file sets the stack's variables
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONTEXT")}
        result = subprocess.run([*argv, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        if check:
            assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stderr[-3000:]}"
        return result

    def up(self, *args: str) -> float:
        """``up --wait`` (nothing built, nothing pulled); seconds until every service was healthy."""
        start = time.monotonic()
        result = self.compose("up", "-d", "--wait", "--wait-timeout", str(UP_TIMEOUT), "--no-build",
                              "--pull", "never", *args, timeout=UP_TIMEOUT + 60, check=False)
        assert result.returncode == 0, f"{result.stderr[-3000:]}\n{self.logs()}"
        return time.monotonic() - start

    def logs(self, tail: int = 15) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), check=False).stdout[-6000:]

    def ps(self) -> list[dict[str, Any]]:
        out = self.compose("ps", "-a", "--format", "json").stdout.strip()
        if out.startswith("["):
            rows: list[dict[str, Any]] = json.loads(out)
            return rows
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def containers(self, service: str) -> list[dict[str, Any]]:
        """``docker inspect`` of the service's containers."""
        ids = self.compose("ps", "-q", service).stdout.split()
        return [inspect(i) for i in ids]

    def read_secret(self, relative: str) -> str:
        return self.compose("exec", "-T", "query", "cat", f"/app/var/secrets/{relative}").stdout

    # -- the host's view
    def host_env(self, bridge: str = "signed") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_")}
        env.update(IOT_ROUTER_URL=f"ws://127.0.0.1:{self.port}/ws", IOT_ROUTER_HTTP_BRIDGE=bridge,
                   IOT_PATHS_SECRETS_DIR=str(self.secrets))
        return env

    def http_call(self, procedure: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None,
                  bridge: str = "signed") -> subprocess.CompletedProcess[str]:
        """The host's ``python -m components http-call`` against the published port."""
        return subprocess.run([sys.executable, "-m", "components", "http-call", procedure, json.dumps(args or []),
                               json.dumps(kwargs or {})], capture_output=True, text=True, cwd=REPO, timeout=60,
                              env=self.host_env(bridge))

    def call(self, procedure: str, args: list[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Any:
        """The answer of a signed call from the host (fails the test on an error)."""
        out = self.http_call(procedure, args, kwargs)
        assert out.returncode == 0 and "Traceback" not in out.stderr, f"{procedure}: {out.stdout}{out.stderr}"
        return json.loads(out.stdout)["args"][0]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.call("iot.get_stats")
        return stats

    def device_0_seqs(self) -> list[int]:
        readings = self.call("iot.fetch_all", [], {"device_id": "0"})
        return sorted(r["seq"] for r in readings)

    def admin(self) -> defer.Deferred[Session]:
        """A WAMP session from the host as admin (the ticket copied out of the secrets volume)."""
        return as_principal(load_settings(REPO / "config.json", environ=self.host_env()), "admin")


def inspect(container: str) -> dict[str, Any]:
    out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, timeout=30, check=True)
    info: dict[str, Any] = json.loads(out.stdout)[0]
    return info


def write_env_file(path: Path, port: int) -> None:
    """.env.example with fresh storage and index keys, a free loopback port, the images built for the test."""
    text = (REPO / ".env.example").read_text()
    values = {
        "IOT_KEYS": base64.b64encode(os.urandom(32)).decode(),
        "IOT_INDEX_KEY": base64.b64encode(os.urandom(32)).decode(),
        "SENSORHUB_BIND": "127.0.0.1",
        "SENSORHUB_PORT": str(port),
        "SENSORHUB_TAG": os.environ["SENSORHUB_TAG"],
        "DYNAMODB_IMAGE": os.environ["DYNAMODB_IMAGE"],
        "SENSORHUB_HEALTH_INTERVAL": "2s",
    }
    for name, value in values.items():
        text, found = re.subn(rf"^#?\s*{name}=.*$", f"{name}={value}", text, flags=re.MULTILINE)
        assert found == 1, f"{name} is not in .env.example"
    path.write_text(text)
    path.chmod(0o600)


def report(config: pytest.Config, line: str) -> None:
    """One line on the terminal, past output capturing (the timings of the run)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}", end="", flush=True)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (os.environ.get("SENSORHUB_TAG") and os.environ.get("DYNAMODB_IMAGE")):
        pytest.skip("run by make compose-test, which builds the images and names them")
    variant = request.param
    root = tmp_path_factory.mktemp(f"compose-{variant}")
    secrets = root / "secrets"
    (secrets / "tickets").mkdir(parents=True, mode=0o700)
    secrets.chmod(0o700)
    s = Stack(variant, root / ".env", free_port(), secrets)
    write_env_file(s.env_file, s.port)
    s.compose("down", "-v", "--remove-orphans")  # what an interrupted earlier run left
    try:
        took = s.up()
        report(request.config, f"{variant}: up to every service healthy in {took:.0f}s")
        for relative in ("http_bridge.json", "tickets/admin.ticket"):
            (secrets / relative).write_text(s.read_secret(relative))
            (secrets / relative).chmod(0o600)
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", "--timeout", "60", check=False)
    for kind in (["container", "ls", "-a"], ["volume", "ls"], ["network", "ls"]):
        left = subprocess.run(["docker", *kind, "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                              capture_output=True, text=True, timeout=30).stdout.split()
        assert left == [], f"{kind[0]}s left: {left}"


# -- the stack as started ------------------------------------------------------------------------------------

def test_every_service_runs_and_is_healthy_and_init_completed(stack: Stack) -> None:
    rows = stack.ps()
    running = {r["Service"]: r for r in rows if r["State"] == "running"}
    assert set(running) == VARIANTS[stack.variant].services, rows
    unhealthy = {name: r["Health"] for name, r in running.items() if r["Health"] != "healthy"}
    assert not unhealthy, unhealthy
    (init,) = [r for r in rows if r["Service"] == "init"]
    assert (init["State"], init["ExitCode"]) == ("exited", 0), init


def test_only_the_router_is_published_on_loopback_and_every_container_is_on_the_project_network(
        stack: Stack) -> None:
    for row in stack.ps():
        info = inspect(row["ID"])
        assert set(info["NetworkSettings"]["Networks"]) == {f"{PROJECT}_default"}, row["Service"]
        bindings = {port: b for port, b in (info["HostConfig"]["PortBindings"] or {}).items() if b}
        if row["Service"] == "router":
            assert bindings == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(stack.port)}]}, bindings
        else:
            assert bindings == {}, f"{row['Service']}: {bindings}"


def test_the_dashboard_is_served(stack: Stack) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/", timeout=10) as response:
        status, page = response.status, response.read().decode()
    assert status == 200
    assert "<title>Sensor hub</title>" in page, page[:500]


def test_every_simulated_device_has_readings_stored_by_every_shard(stack: Stack) -> None:
    def all_devices() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = stack.call("iot.list_devices")
        return rows if {r["device_id"] for r in rows} == {str(d) for d in range(DEVICES)} else None

    rows = waiting.wait_until(all_devices, 120, f"readings of devices 0 to {DEVICES - 1}", interval=1.0)
    assert all(r["count"] > 0 for r in rows), rows
    stats = stack.stats()
    shards = stats["shards"]
    assert len(shards) == VARIANTS[stack.variant].shards, shards
    assert all(s["stored"] > 0 for s in shards), shards
    assert stats["rejected"] == {}, stats


# -- the HTTP bridge -----------------------------------------------------------------------------------------

def test_the_host_calls_through_the_bridge_only_when_signed_and_only_as_reader(stack: Stack) -> None:
    assert stack.stats()["stored"] > 0
    unsigned = stack.http_call("iot.get_stats", bridge="loopback")  # loopback: the client does not sign
    assert unsigned.returncode == 1 and "Traceback" not in unsigned.stderr, unsigned.stdout + unsigned.stderr
    assert "signature" in json.loads(unsigned.stdout)["error"], unsigned.stdout
    # /call runs as the reader role: the audit log is for admin sessions over /ws
    audit = stack.http_call("iot.get_audit")
    assert audit.returncode == 1 and json.loads(audit.stdout)["error"] == "wamp.error.not_authorized", audit.stdout


def test_http_call_inside_a_container_reaches_the_router_by_its_service_name_and_signs(stack: Stack) -> None:
    out = stack.compose("exec", "-T", "query", "python", "-m", "components", "http-call", "iot.get_stats", "[]",
                        check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["args"][0]["stored"] > 0, out.stdout


# -- scale-out, crash, restart -------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_three_query_callees_share_the_calls(stack: Stack) -> Any:
    stack.up("--scale", "query=3")
    callees = stack.containers("query")
    assert len(callees) == 3 and all(c["State"]["Health"]["Status"] == "healthy" for c in callees)
    hosts = {c["Config"]["Hostname"] for c in callees}  # served_by in the audit log is <hostname>:<pid>
    since = time.time() - 1
    served: set[str] = set()

    @defer.inlineCallbacks
    def every_callee_served() -> Any:
        nonlocal served
        for _ in range(6):
            yield session.call("iot.get_max_rel_time")
        entries = yield session.call("iot.get_audit", since)
        served = {e["served_by"].split(":")[0] for e in entries
                  if e["procedure"] == "iot.get_max_rel_time" and e["authid"] == "admin"}
        return served == hosts

    session = yield stack.admin()
    try:
        # a callee that just became healthy may still be registering; audit entries are written once a second
        yield wait_until(every_callee_served, 60, 1.5, "calls answered by each of the three callees")
    finally:
        yield session.close()
    assert served == hosts


def test_storage_killed_is_restarted_and_loses_no_reading(stack: Stack) -> None:
    service = f"storage_{shard_of('0', VARIANTS[stack.variant].shards)}"  # the one that stores device 0
    (before,) = stack.containers(service)
    # with init: true the container's first process is the init; storage is its child
    (storage,) = psutil.Process(before["State"]["Pid"]).children()
    assert storage.cmdline()[-3:] == ["-m", "components", "storage"], storage.cmdline()
    seqs_before = stack.device_0_seqs()
    assert seqs_before, "device 0 has nothing stored yet"
    os.kill(storage.pid, signal.SIGKILL)

    def restarted_and_healthy() -> dict[str, Any] | None:
        (now,) = stack.containers(service)
        up = now["RestartCount"] > before["RestartCount"] and now["State"]["Running"]
        return now if up and now["State"]["Health"]["Status"] == "healthy" else None

    after = waiting.wait_until(restarted_and_healthy, 120, f"{service} restarted and healthy", interval=1.0)
    assert after["Id"] == before["Id"] and after["State"]["Pid"] != before["State"]["Pid"]

    def grown() -> list[int] | None:
        # device 0 sends 4 readings a second: 20 more is a few seconds of the new storage process at work
        seqs = stack.device_0_seqs()
        return seqs if len(seqs) >= len(seqs_before) + 20 else None

    seqs = waiting.wait_until(grown, 120, "device 0's readings stored by the restarted storage", interval=1.0)
    assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate in device 0's seqs"


def test_down_and_up_keep_the_stored_readings(stack: Stack, pytestconfig: pytest.Config) -> None:
    stored = stack.stats()["stored"]
    seqs = stack.device_0_seqs()
    stack.compose("down", "--timeout", "60")
    assert stack.ps() == []
    took = stack.up()
    report(pytestconfig, f"{stack.variant}: up again (volumes kept) in {took:.0f}s")
    assert stack.stats()["stored"] >= stored
    after = stack.device_0_seqs()
    assert len(after) >= len(seqs) and after == list(range(1, len(after) + 1))
    waiting.wait_until(lambda: stack.stats()["stored"] > stored, 120, "new readings after the restart", interval=1.0)
