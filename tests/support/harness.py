"""Test harness: real routers and real component processes on free loopback ports, WAMP sessions to them.

Nothing here sleeps for a fixed time: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autobahn.wamp.types import SubscribeOptions
from twisted.internet import defer, reactor, task

from components.core.settings import Settings, load_settings
from components.ops import router_config
from components.ops.credentials import CredentialStore
from components.ops.launcher import crossbar_argv
from components.ops.supervisor import Child, ServiceSpec
from components.ops.waiting import Deadline, free_port
from components.wamp.connection import device_auth, make_component, ticket_auth

REPO = Path(__file__).resolve().parents[2]
ROUTER_START_S = 60.0
COMPONENT_START_S = 60.0


def write_config(root: Path, port: int, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """A config.json for a test stack under ``root``: the project's config with paths and port moved there."""
    cfg = json.loads((REPO / "config.json").read_text())
    cfg["router"].update(url=f"ws://127.0.0.1:{port}/ws", listen_port=port)
    cfg["paths"] = {"secrets_dir": str(root / "secrets"), "run_dir": str(root / "run")}
    cfg["storage"]["sqlite_path"] = str(root / "iot.sqlite3")
    cfg["keys"]["file"] = str(root / "secrets" / "keys.json")
    cfg["device"]["spool_dir"] = str(root / "spool")
    cfg["monitoring"] = monitoring_ports()
    return _write(cfg, root, overrides)


def monitoring_ports() -> dict[str, int]:
    """Free loopback ports for storage's and query's metrics and health endpoints (a test stack's own)."""
    return {"storage_port": free_port(), "query_port": free_port()}


def _write(cfg: dict[str, Any], root: Path, overrides: Mapping[str, Any] | None) -> Path:
    """Apply per-section overrides and write ``root/config.json``."""
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = root / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def stack_settings(root: Path, port: int | None = None, overrides: Mapping[str, Any] | None = None,
                   devices: tuple[str, ...] = ("0", "1", "2")) -> Settings:
    """Settings for a test stack under ``root``, with local secrets created (tickets, device keys)."""
    root.mkdir(parents=True, exist_ok=True)
    path = write_config(root, port or free_port(), overrides)
    settings = load_settings(path, environ={})
    CredentialStore(settings.paths.secrets_dir).ensure_local(devices)
    return settings


def derive_settings(base: Settings, root: Path, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings for components of one test: ``base``'s router and secrets, their own database, keys, spool."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(Path(base.config_path).read_text())
    cfg["storage"]["sqlite_path"] = str(root / "iot.sqlite3")
    cfg["keys"]["file"] = str(root / "keys.json")
    cfg["keys"]["salt_file"] = str(root / "key.salt")
    cfg["device"]["spool_dir"] = str(root / "spool")
    cfg["paths"]["run_dir"] = str(root / "run")
    cfg["monitoring"] = monitoring_ports()
    return load_settings(_write(cfg, root, overrides), environ={})


@dataclass
class Supervised:
    """A process of a test, run by the project's supervisor (components.ops.supervisor), never restarted."""

    spec: ServiceSpec
    child: Child = field(init=False)

    def __post_init__(self) -> None:
        self.child = Child(self.spec)

    @property
    def name(self) -> str:
        """Its name (the log file's too)."""
        return self.spec.name

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The current process (None before the first start)."""
        return self.child.proc

    @property
    def log_path(self) -> Path | None:
        """Where its output goes."""
        return self.spec.log_path

    def launch(self) -> None:
        """Start it (again); its output is appended to its log."""
        assert self.spec.log_path is not None
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.child.start()

    def signal(self, signum: int) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        """Wait for exit; return the code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int | None:
        """Its stop signal, then SIGKILL after ``timeout``; the exit code."""
        return self.child.stop(timeout)

    def kill(self) -> None:
        """SIGKILL it and whatever it started."""
        self.child.kill()

    def log(self) -> str:
        """What it printed so far."""
        return self.child.log()

    def log_size(self) -> int:
        """Current length of the log (to wait for a line logged after now)."""
        return len(self.log())

    @defer.inlineCallbacks
    def wait_for_log(self, needle: str, timeout: float = 60.0, after: int = 0) -> Any:
        """Wait (without blocking the reactor) until the log contains ``needle`` past offset ``after``."""
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None and needle not in self.log()[after:]:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before logging {needle!r}:\n"
                                     f"{self.log()[-3000:]}")
            return needle in self.log()[after:]
        yield wait_until(seen, timeout, 0.05, f"{self.name} to log {needle!r}")
        return self

    @defer.inlineCallbacks
    def wait_ready(self, timeout: float = COMPONENT_START_S) -> Any:
        """Wait (without blocking the reactor) for its ready line (``{"ready": name, ...}``)."""
        def ready() -> bool:
            if self.child.ready.is_set():
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n"
                                     f"{self.log()[-3000:]}")
            return False
        yield wait_until(ready, timeout, 0.05, f"{self.name} to be ready")
        return self


class RouterProcess(Supervised):
    """A Crossbar router started from the project's router/config.json with test settings applied."""

    def __init__(self, settings: Settings) -> None:
        """Not started yet: :meth:`start`."""
        self.settings = settings
        port = settings.router.listen_port
        super().__init__(ServiceSpec("router", (), Path(settings.paths.run_dir) / "router.log", signal.SIGINT,
                                     restart=False, ready_port=port,
                                     ready_marker=router_config.ready_marker(settings)))

    def start(self) -> RouterProcess:
        """Start and wait until the web transport accepts connections."""
        node_dir = router_config.write_node_dir(self.settings)
        self.child.spec = self.spec = dataclasses.replace(self.spec, argv=crossbar_argv(node_dir))
        self.launch()
        try:
            self.child.wait_ready(ROUTER_START_S)
        except Exception:
            self.stop()
            raise RuntimeError(f"router did not start; log:\n{self.log()[-4000:]}") from None
        return self


class ComponentProcess(Supervised):
    """A component or device process (``python -m components storage`` and the like)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None, log_path: Path | None = None,
                 announces: str | None = None) -> None:
        """Not started yet: :meth:`start`; ``announces`` is the name in its ready line, if it prints one."""
        super().__init__(ServiceSpec(name, argv, log_path, env=env, restart=False, cwd=REPO, announces=announces))

    def start(self) -> ComponentProcess:
        """Start it; output goes to ``log_path``."""
        self.launch()
        return self


def python_process(settings: Settings, name: str, module: str, *args: str, env: dict[str, str] | None = None
                   ) -> ComponentProcess:
    """``python -m <module> --config <test config> <args>`` with its log in the run folder.

    ``python -m components storage|query`` announces its readiness (:meth:`Supervised.wait_ready`).
    """
    argv = [sys.executable, "-m", module, "--config", settings.config_path, *args]
    log_path = Path(settings.paths.run_dir) / f"{name}.log"
    announces = args[0] if module == "components" and args and args[0] in ("storage", "query") else None
    return ComponentProcess(name, argv, env, log_path, announces)


@defer.inlineCallbacks
def start_storage(settings: Settings, name: str = "storage", env: dict[str, str] | None = None) -> Any:
    """A storage process, once it is ready (subscribed)."""
    proc = python_process(settings, name, "components", "storage", env=env).start()
    yield proc.wait_ready()
    return proc


@defer.inlineCallbacks
def start_query(settings: Settings, name: str = "query", env: dict[str, str] | None = None) -> Any:
    """A query callee process, once it is ready (its procedures registered)."""
    proc = python_process(settings, name, "components", "query", env=env).start()
    yield proc.wait_ready()
    return proc


# ---- WAMP sessions in the test process (pytest-twisted runs the reactor)

class Session:
    """A connected WAMP session and the component behind it."""

    def __init__(self, component: Any, session: Any) -> None:
        self.component = component
        self.session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def close(self) -> defer.Deferred[Any]:
        """Leave and stop reconnecting (nothing to do once the connection is gone: autobahn then has no
        completion Deferred left, and ``stop()`` would raise)."""
        if getattr(self.component, "_done_f", None) is None:
            return defer.succeed(None)
        return self.component.stop()


def open_session(settings: Settings, authentication: dict[str, Any], serializer: str | None = None
                 ) -> defer.Deferred[Session]:
    """Connect once; fires with a Session, or fails with the router's refusal."""
    component = make_component(settings.router, authentication, serializer=serializer, max_retries=0)
    joined: defer.Deferred[Session] = defer.Deferred()
    refused: list[str] = []

    def on_join(session: Any, details: Any) -> None:
        if not joined.called:
            joined.callback(Session(component, session))

    def on_leave(session: Any, details: Any) -> None:
        refused.append(f"{details.reason}: {details.message}")

    def on_done(result: Any) -> Any:
        if not joined.called:
            reason = f" ({refused[-1]})" if refused else ""
            joined.errback(RuntimeError(f"session refused or lost{reason}: {result}"))
        return None

    component.on("join", on_join)
    component.on("leave", on_leave)
    done = component.start(reactor)
    done.addBoth(lambda r: on_done(r.value if hasattr(r, "value") else r))
    return joined


def as_principal(settings: Settings, authid: str, serializer: str | None = None) -> defer.Deferred[Session]:
    """A session logged in with a ticket principal's ticket (storage, query, dashboard, admin)."""
    store = CredentialStore(settings.paths.secrets_dir)
    return open_session(settings, ticket_auth(authid, store.ticket(authid)), serializer)


def as_device(settings: Settings, device_id: str, serializer: str | None = None) -> defer.Deferred[Session]:
    """A session logged in as a provisioned device."""
    store = CredentialStore(settings.paths.secrets_dir)
    return open_session(settings, device_auth(device_id, store.device_key(device_id)), serializer)


class Collector:
    """Collects events of a prefix subscription: (topic, payload)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def __call__(self, payload: Any, details: Any = None, **kwargs: Any) -> None:
        """One event; keyword arguments (a device's spool ``epoch``) are not collected."""
        self.events.append((details.topic if details is not None else "", payload))

    def subscribe(self, session: Session, prefix: str) -> defer.Deferred[Any]:
        """Subscribe to ``prefix`` with prefix matching."""
        return session.subscribe(self, prefix, options=SubscribeOptions(match="prefix", details_arg="details"))


@defer.inlineCallbacks
def wait_until(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``condition`` (sync, or returning a Deferred) until truthy; fail after ``timeout`` seconds.

    The reactor's flavour of components.ops.waiting.wait_until: it yields to the reactor between looks.
    """
    deadline = Deadline(timeout)
    while True:
        result = condition()
        if isinstance(result, defer.Deferred):
            result = yield result
        if result:
            return result
        if deadline.passed():
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        yield task.deferLater(reactor, interval, lambda: None)

