"""``make run``: the whole local stack under one supervisor, restarted when a service dies, stopped on Ctrl-C.

The router starts first (its log in ``run_dir/logs/router.log``); once it listens, storage and query start, and
once both answer ready on their health endpoints (``/health/ready``: WAMP session up, store answering), the
simulated devices; their output is shown here with their names in front (and kept in ``run_dir/logs``).
A service that dies is started again after a backoff and the restart is logged; the delivery guarantees
mean nothing is lost meanwhile (devices keep their readings until storage acknowledges them). A service that
fails again at once, several times in a row, is reported with its last log lines and the stack stops.
Ctrl-C stops every service in reverse order (devices, query, storage, router), so storage commits its open
batches before the router goes away.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from components.core.settings import Settings
from components.ops import dynamodb_local, router_config
from components.ops.credentials import CredentialStore
from components.ops.supervisor import Child, Event, ServiceSpec, Supervisor
from components.ops.waiting import accepts, wait_until

SERVICES: tuple[str, ...] = ("storage", "query")
"""Service components started between the router and the devices (``python -m components <name>``)."""
ROUTER_START_TIMEOUT_S = 90.0
SERVICE_START_TIMEOUT_S = 120.0
"""How long storage and query may take to be ready (storage waits for its backend: DynamoDB Local starts slowly)."""
POLL_S = 0.2


def crossbar_executable() -> str:
    """The crossbar command installed next to this Python."""
    return str(Path(sys.executable).with_name("crossbar"))


def crossbar_argv(node_dir: Path, loglevel: str = "info") -> list[str]:
    """Command line that starts the router from a rendered node directory."""
    return [crossbar_executable(), "start", "--cbdir", str(node_dir), "--config", "config.json",
            "--loglevel", loglevel, "--color", "false"]


def _python(module: str, settings: Settings, *args: str) -> list[str]:
    return [sys.executable, "-m", module, "--config", settings.config_path, *args]


def health_url(settings: Settings, service: str, check: str = "ready") -> str | None:
    """The URL of a service's health check on this host (None when its monitoring port is 0)."""
    port = settings.monitoring.port(service)
    if not port:
        return None
    host = settings.monitoring.listen_host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host  # noqa: S104 - a check
    return f"http://{host}:{port}/health/{check}"


def _service_spec(settings: Settings, name: str, logs: Path) -> ServiceSpec:
    """Storage or query: ready once its health endpoint says so (or, with the endpoint off, once it says so)."""
    url = health_url(settings, name)
    return ServiceSpec(name, _python("components", settings, name), logs / f"{name}.log", echo=True,
                       ready_url=url, announces=None if url else name)


def _local_dynamodb(settings: Settings, supervisor: Supervisor, logs: Path) -> None:
    """With the DynamoDB backend on a loopback endpoint nobody serves yet, start DynamoDB Local there."""
    port = dynamodb_local.loopback_port(settings.storage.dynamodb_endpoint_url)
    if settings.storage.backend != "dynamodb" or port is None:
        return
    # DynamoDB Local takes any credentials, boto3 insists on some
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    if accepts("127.0.0.1", port):
        print(f"using the DynamoDB already listening on 127.0.0.1:{port}", flush=True)
        return
    jar = dynamodb_local.find_jar()
    if jar is None:
        raise RuntimeError("the DynamoDB backend needs DynamoDB Local on this machine: run "
                           "'make dynamodb-local' (it needs Java), or point storage.dynamodb_endpoint_url elsewhere")
    data = Path(settings.paths.run_dir).parent / "dynamodb"
    data.mkdir(parents=True, exist_ok=True)
    print(f"starting DynamoDB Local on 127.0.0.1:{port} (data in {data}) ...", flush=True)
    child = supervisor.start(ServiceSpec("dynamodb", dynamodb_local.command(jar, port, data), logs / "dynamodb.log",
                                         cwd=jar.parent, ready_port=port))
    child.wait_ready(60)


def _wait_ready(supervisor: Supervisor, services: list[Child], stopping: Callable[[], bool]) -> bool:
    """Wait until every service is ready (or Ctrl-C); False when the supervisor gave one up meanwhile (it restarts
    a service that dies while starting, as later)."""
    gave_up = False

    def ready() -> bool:
        nonlocal gave_up
        gave_up = gave_up or any(_report(event) for event in supervisor.poll())
        return stopping() or gave_up or all(child.is_ready() for child in services)

    wait_until(ready, SERVICE_START_TIMEOUT_S, f"{' and '.join(c.name for c in services)} to be ready",
               interval=POLL_S)
    return not gave_up


def _report(event: Event) -> bool:
    """Print what the supervisor noticed; True when the stack must stop (a service was given up)."""
    name = event.child.name
    if event.kind == "exited":
        print(f"{name} {event.detail}", flush=True)
    elif event.kind == "restarted":
        print(f"restarted {name} ({event.detail})", flush=True)
    elif event.kind == "done":
        print(f"{name} finished ({event.detail})", flush=True)
    else:
        lines = "\n".join(f"    {line}" for line in event.child.tail) or "    (it printed nothing)"
        log = f" (log: {event.child.spec.log_path})" if event.child.spec.log_path else ""
        print(f"error: {name} keeps failing ({event.detail}); not restarting it. Its last lines{log}:\n{lines}",
              file=sys.stderr, flush=True)
        return True
    return False


def run_stack(settings: Settings, with_devices: bool = True) -> int:
    """Start router, storage, query and simulated devices; supervise them until Ctrl-C; stop everything."""
    sim_ids = settings.simulator.device_ids()
    for item in CredentialStore(settings.paths.secrets_dir).ensure_local(sim_ids):
        print(f"{item} in {settings.paths.secrets_dir}", flush=True)
    node_dir = router_config.write_node_dir(settings)
    logs = Path(settings.paths.run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    supervisor = Supervisor()
    code = 0
    try:
        _local_dynamodb(settings, supervisor, logs)
        # Crossbar exits 0 on SIGINT (1 on SIGTERM).
        router = supervisor.start(ServiceSpec("router", crossbar_argv(node_dir), logs / "router.log", signal.SIGINT,
                                              ready_port=settings.router.listen_port,
                                              ready_host=router_config.local_host(settings),
                                              ready_marker=router_config.ready_marker(settings)))
        print(f"starting router on {settings.router.listen_host}:{settings.router.listen_port} "
              f"(log: {logs / 'router.log'}) ...", flush=True)
        router.wait_ready(ROUTER_START_TIMEOUT_S)
        services = [supervisor.start(_service_spec(settings, name, logs)) for name in SERVICES]
        if not _wait_ready(supervisor, services, lambda: stopping):
            return 1
        if with_devices and not stopping:
            supervisor.start(ServiceSpec("devices", _python("devices", settings, "simulate"), logs / "devices.log",
                                         echo=True))
        _banner(settings)
        while not stopping:
            if any(_report(event) for event in supervisor.poll()):
                code = 1
                break
            time.sleep(POLL_S)  # the supervisor's own pace: a few looks a second at its children
    except (TimeoutError, RuntimeError) as err:
        print(f"error: {err} (logs in {logs})", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping ...", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        supervisor.stop()
    return code


def _banner(settings: Settings) -> None:
    ticket = CredentialStore(settings.paths.secrets_dir).ticket("dashboard")
    base = router_config.http_base(settings)
    print("\n" + "=" * 72, flush=True)
    print(f"  Dashboard:  {base}/#ticket={ticket}", flush=True)
    print(f"  WebSocket:  {settings.router.url}   HTTP bridge: {base}/call  {base}/publish", flush=True)
    print("  Press Ctrl-C to stop.", flush=True)
    print("=" * 72 + "\n", flush=True)
