"""``make run``: the whole local stack as child processes, stopped in order on Ctrl-C.

Children run in sessions of their own, so Ctrl-C reaches only this launcher, which then stops them in
reverse order (devices, query, storage, router) and waits for each: storage gets to commit its open
batches before the router goes away. Children also get SIGTERM if the launcher itself dies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from components import dynamolocal, routercfg
from components.credentials import CredentialStore
from components.settings import Settings
from devices.simulator import device_ids

SERVICES: tuple[str, ...] = ("storage", "query")
"""Service components started between the router and the devices (``python -m components <name>``)."""
_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 20.0
ROUTER_START_TIMEOUT_S = 90.0


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the launcher dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def crossbar_executable() -> str:
    """The crossbar command installed next to this Python."""
    return str(Path(sys.executable).with_name("crossbar"))


def crossbar_argv(node_dir: Path, loglevel: str = "info") -> list[str]:
    """Command line that starts the router from a rendered node directory."""
    return [crossbar_executable(), "start", "--cbdir", str(node_dir), "--config", "config.json",
            "--loglevel", loglevel, "--color", "false"]


def wait_for_port(host: str, port: int, deadline: float, alive: subprocess.Popen[bytes] | None = None) -> None:
    """Block until ``host:port`` accepts connections; raise TimeoutError at the deadline."""
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process exited with code {alive.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on {host}:{port} in time")


@dataclass
class Child:
    """A process the launcher started; ``stop_signal`` asks it to stop cleanly."""

    name: str
    proc: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM


@dataclass
class Stack:
    """Starts children, watches them, stops them in reverse order."""

    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], log_path: Path | None = None,
              stop_signal: int = signal.SIGTERM, cwd: Path | None = None) -> Child:
        """Start a child; its output goes to ``log_path`` when given, else to this terminal."""
        out = open(log_path, "ab") if log_path else None
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
                                cwd=cwd)
        if out:
            out.close()
        child = Child(name, proc, stop_signal)
        self.children.append(child)
        return child

    def first_exited(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self) -> None:
        """Signal each child to stop, newest first, and wait for it (SIGKILL after a timeout)."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(child.stop_signal)
                try:
                    child.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"  {child.name} did not stop in {STOP_TIMEOUT_S:.0f}s; killing it", flush=True)
                    child.proc.kill()
                    child.proc.wait()
            print(f"  stopped {child.name} (exit {child.proc.returncode})", flush=True)


def _python(module: str, settings: Settings, *args: str) -> list[str]:
    return [sys.executable, "-m", module, "--config", settings.config_path, *args]


def _local_dynamodb(settings: Settings, stack: Stack, logs: Path) -> None:
    """With the DynamoDB backend on a loopback endpoint nobody serves yet, start DynamoDB Local there."""
    port = dynamolocal.loopback_port(settings.storage.dynamodb_endpoint_url)
    if settings.storage.backend != "dynamodb" or port is None:
        return
    # DynamoDB Local takes any credentials, boto3 insists on some
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    try:
        wait_for_port("127.0.0.1", port, time.monotonic() + 0.5)
        print(f"using the DynamoDB already listening on 127.0.0.1:{port}", flush=True)
        return
    except TimeoutError:
        pass
    jar = dynamolocal.find_jar()
    if jar is None:
        raise RuntimeError("the DynamoDB backend needs DynamoDB Local on this machine: run "
                           "'make dynamodb-local' (it needs Java), or point storage.dynamodb_endpoint_url elsewhere")
    data = Path(settings.paths.run_dir).parent / "dynamodb"
    data.mkdir(parents=True, exist_ok=True)
    print(f"starting DynamoDB Local on 127.0.0.1:{port} (data in {data}) ...", flush=True)
    proc = stack.start("dynamodb", dynamolocal.command(jar, port, data), logs / "dynamodb.log", cwd=jar.parent)
    wait_for_port("127.0.0.1", port, time.monotonic() + 60, proc.proc)


def run_stack(settings: Settings, with_devices: bool = True) -> int:
    """Start router, storage, query and simulated devices; run until Ctrl-C; stop everything."""
    sim_ids = device_ids(settings.simulator.devices, settings.simulator.first_device)
    created = CredentialStore(settings.paths.secrets_dir).ensure_local(sim_ids)
    for item in created:
        print(f"created {item} in {settings.paths.secrets_dir}", flush=True)
    node_dir = routercfg.write_node_dir(settings)
    logs = Path(settings.paths.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    stack = Stack()
    code = 0
    try:
        _local_dynamodb(settings, stack, logs)
        # Crossbar exits 0 on SIGINT (1 on SIGTERM).
        router = stack.start("router", crossbar_argv(node_dir), logs / "router.log", signal.SIGINT)
        host = "127.0.0.1" if settings.router.listen_host in ("0.0.0.0", "::") else settings.router.listen_host  # noqa: S104
        print(f"starting router on {settings.router.listen_host}:{settings.router.listen_port} "
              f"(log: {logs / 'router.log'}) ...", flush=True)
        wait_for_port(host, settings.router.listen_port, time.monotonic() + ROUTER_START_TIMEOUT_S, router.proc)
        for name in SERVICES:
            stack.start(name, _python("components", settings, name))
        if with_devices:
            stack.start("devices", _python("devices", settings, "simulate"))
        ticket = CredentialStore(settings.paths.secrets_dir).ticket("dashboard")
        base = routercfg.http_base(settings)
        print("\n" + "=" * 72, flush=True)
        print(f"  Dashboard:  {base}/#ticket={ticket}", flush=True)
        print(f"  WebSocket:  {settings.router.url}   HTTP bridge: {base}/call  {base}/publish", flush=True)
        print("  Press Ctrl-C to stop.", flush=True)
        print("=" * 72 + "\n", flush=True)
        while not stopping:
            exited = stack.first_exited()
            if exited is not None:
                print(f"{exited.name} exited with code {exited.proc.returncode}; stopping the stack", flush=True)
                code = 1
                break
            time.sleep(0.2)
    except (TimeoutError, RuntimeError) as err:
        print(f"error: {err} (see {logs / 'router.log'})", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping ...", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
    return code
