"""The stack a benchmark runs: a temporary folder, its settings, and routers and components as child processes.

Every child process a benchmark starts is registered with a :class:`Procs`, which runs it under the project's
supervisor (components.ops.supervisor: its own session, SIGTERM from the kernel should the benchmark process be
killed, never restarted) and stops it when the benchmark ends, fails or is interrupted. A router is ready once
its port accepts connections, a component once it printed its ready line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.entry import Options
from bench.results import note
from components.core.settings import Settings, load_settings
from components.ops import router_config
from components.ops.credentials import CredentialStore
from components.ops.launcher import crossbar_argv, crossbar_executable
from components.ops.supervisor import Child, ServiceSpec, Supervisor

REPO = Path(__file__).resolve().parent.parent
ROUTER_START_S = 90.0
COMPONENT_START_S = 60.0
STOP_TIMEOUT_S = 30.0


@contextmanager
def workspace(name: str, opts: Options) -> Iterator[Path]:
    """A temporary folder for secrets, databases and logs; removed at the end unless ``--keep``."""
    root = Path(tempfile.mkdtemp(prefix=f"sensorhub-bench-{name}-"))
    try:
        yield root
    finally:
        if opts.keep:
            note(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def write_settings(root: Path, name: str, port: int, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   secrets_dir: Path | None = None) -> Settings:
    """A config file ``root/<name>.json``: the project's config.json with every path under ``root``.

    Components started with it share the router (``port``) and the secrets folder; the database, key file
    and logs are the ones named here or in ``overrides``.
    """
    cfg = json.loads((REPO / "config.json").read_text(encoding="utf-8"))
    secrets = secrets_dir or root / "secrets"
    cfg["router"].update(url=f"ws://127.0.0.1:{port}/ws", listen_host="127.0.0.1", listen_port=port)
    cfg["paths"] = {"secrets_dir": str(secrets), "run_dir": str(root / "run")}
    cfg["storage"]["sqlite_path"] = str(root / f"{name}.sqlite3")
    cfg["keys"] = {"source": "file", "file": str(root / "keys.json"), "salt_file": str(root / "key.salt")}
    cfg["device"]["spool_dir"] = str(root / "spool")
    cfg["log_level"] = "info"
    # no monitoring endpoints unless a case turns them on (python -m bench metrics measures what they cost)
    cfg["monitoring"] = {"storage_port": 0, "query_port": 0}
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return load_settings(path, environ={})


def provision(settings: Settings, devices: Sequence[str] = ()) -> None:
    """Tickets, the device keys of ``devices`` and the bridge secret in the settings' secrets folder."""
    CredentialStore(settings.paths.secrets_dir).ensure_local(list(devices))


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: this one without ``IOT_*`` overrides (so runs are reproducible)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IOT_")} | dict(extra or {})


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class Procs:
    """The children of one benchmark, under one supervisor: logs in ``log_dir/<name>.log``, stopped newest first."""

    def __init__(self, log_dir: Path) -> None:
        """Logs go to ``log_dir/<name>.log``."""
        self.log_dir = log_dir
        self.supervisor = Supervisor(say=lambda message: None)
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              stop_signal: int = signal.SIGTERM, stdin: bool = False, cwd: Path | None = None,
              ready_port: int | None = None, announces: str | None = None, ready_marker: str | None = None
              ) -> Child:
        """Start ``argv`` (cwd: the repository unless given; environment: ``env``, else :func:`child_env`)."""
        return self.supervisor.start(ServiceSpec(
            name, argv, self.log_dir / f"{name}.log", stop_signal, restart=False, cwd=cwd or REPO,
            base_env=env if env is not None else child_env(), stdin=stdin, ready_port=ready_port,
            announces=announces, ready_marker=ready_marker))

    def stop(self, child: Child, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop one child now; its exit code."""
        return self.supervisor.stop_child(child, timeout)

    def stop_all(self) -> None:
        """Stop every child still running, newest first (a second Ctrl-C kills the rest at once)."""
        self.supervisor.stop()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def start_router(procs: Procs, settings: Settings, name: str = "router") -> Child:
    """The project's router (router/config.json with these settings), once its port accepts connections."""
    if not Path(crossbar_executable()).exists():
        raise RuntimeError(f"crossbar is not installed next to {sys.executable}: run `make install`")
    node_dir = router_config.write_node_dir(settings)
    child = procs.start(name, crossbar_argv(node_dir), stop_signal=signal.SIGINT,
                        ready_port=settings.router.listen_port, ready_marker=router_config.ready_marker(settings))
    try:
        child.wait_ready(ROUTER_START_S)
    except (TimeoutError, RuntimeError) as err:
        raise RuntimeError(f"router did not start: {err}") from None
    return child


def start_component(procs: Procs, settings: Settings, role: str, name: str | None = None,
                    env: Mapping[str, str] | None = None) -> Child:
    """``python -m components storage|query`` with these settings, once it is ready (subscribed, registered)."""
    child = procs.start(name or role, python_module("components", "--config", settings.config_path, role),
                        env=child_env(env), announces=role)
    return child.wait_ready(COMPONENT_START_S)


def read_json(path: Path) -> Any:
    """A JSON file a child wrote (None if it is missing)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def expect_alive(*children: Child) -> Callable[[], None]:
    """A check that raises if any of ``children`` has exited."""
    def check() -> None:
        for c in children:
            if not c.running:
                assert c.proc is not None
                raise RuntimeError(f"{c.name} exited early ({c.proc.returncode}):\n{c.log()[-3000:]}")
    return check


def sleep_until(deadline: float, alive: Callable[[], None] | None = None) -> None:
    """Sleep until ``deadline`` (time.time()), calling ``alive`` (which raises if a child died) on the way."""
    while True:
        left = deadline - time.time()
        if left <= 0:
            return
        if alive is not None:
            alive()
        time.sleep(min(left, 0.2))


def run_caller(procs: Procs, settings: Settings, root: Path, name: str, cases: list[dict[str, Any]],
               timeout: float) -> dict[str, Any]:
    """Run ``bench._caller`` on ``cases`` (sequential WAMP calls); its report, per case name."""
    spec, report = root / f"{name}-spec.json", root / f"{name}-report.json"
    spec.write_text(json.dumps({"cases": cases}), encoding="utf-8")
    child = procs.start(name, python_module("bench._caller", "--config", settings.config_path, "--spec", str(spec),
                                            "--report", str(report)))
    try:
        code = child.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{name} did not finish within {timeout:.0f}s:\n{child.log()[-3000:]}") from None
    finally:
        procs.stop(child)
    data = read_json(report)
    if code != 0 or data is None:
        raise RuntimeError(f"{name} failed ({code}):\n{child.log()[-3000:]}")
    cases_out: dict[str, Any] = data["cases"]
    return cases_out
