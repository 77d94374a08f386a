"""What every benchmark shares: options, result lines, a temporary stack folder, child processes, sampling.

Results are JSON objects, one per line on stdout, printed as soon as they are measured; the readable
summary table goes to stderr at the end. Every child process a benchmark starts is registered with a
:class:`Procs`, which stops it when the benchmark ends, fails or is interrupted (and the children get
SIGTERM from the kernel should the benchmark process itself be killed).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from components.core.settings import Settings, load_settings
from components.ops import router_config
from components.ops.credentials import CredentialStore
from components.ops.launcher import crossbar_argv, crossbar_executable, wait_for_port

REPO = Path(__file__).resolve().parent.parent
ROUTER_START_S = 90.0
COMPONENT_START_S = 60.0
STOP_TIMEOUT_S = 30.0
SAMPLE_INTERVAL_S = 0.2
_PR_SET_PDEATHSIG = 1


# ---- options and results

@dataclass(frozen=True)
class Options:
    """How a benchmark runs: ``quick`` shortens every run and shrinks the big store."""

    quick: bool = False
    keep: bool = False
    install_tools: bool = True


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark (and ``python -m bench``) accepts."""
    parser.add_argument("--quick", action="store_true", help="shorter runs and a smaller big store")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not install missing tools (ab, DynamoDB Local); use the fallbacks")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    """Options out of parsed arguments (see :func:`add_options`)."""
    return Options(quick=args.quick, keep=args.keep, install_tools=not args.no_install)


def parse_options(description: str, argv: Sequence[str] | None = None) -> Options:
    """The command line of one benchmark run alone."""
    return options_from(add_options(argparse.ArgumentParser(description=description)).parse_args(argv))


RESULTS: list[dict[str, Any]] = []
"""Every result emitted by this process, for the summary table."""


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(value, 4) if abs(value) < 1000 else round(value, 1)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def emit(result: dict[str, Any]) -> dict[str, Any]:
    """Print one result as a JSON line on stdout (at once) and keep it for the table."""
    clean = _clean(result)
    print(json.dumps(clean, separators=(", ", ": ")), flush=True)
    RESULTS.append(clean)
    return clean


def note(message: str) -> None:
    """Progress for the person watching (stderr, so stdout stays JSON lines only)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation."""
    if not values:
        return math.nan
    data = sorted(values)
    k = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def crossbar_version() -> str:
    """The Crossbar version of the venv (from its package metadata, as ``crossbar version`` prints it)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("crossbar")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(opts: Options, benches: Sequence[str]) -> dict[str, Any]:
    """The first result line: what ran, where."""
    return {"bench": "machine", "cores": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "crossbar": crossbar_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_1m": os.getloadavg()[0],
            "quick": opts.quick, "benches": list(benches), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---- the summary table

def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: Sequence[dict[str, Any]], columns: Mapping[str, Sequence[str]]) -> str:
    """A plain-text table per benchmark: its rows with the columns ``columns[bench]``."""
    out: list[str] = []
    for bench, cols in columns.items():
        rows = [r for r in results if r.get("bench") == bench]
        if not rows:
            continue
        header = ["case", *cols]
        cells = [[_fmt(r.get("case", "")), *(_fmt(r.get(c)) for c in cols)] for r in rows]
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
        out.append(f"== {bench}")
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        out.extend("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                   for row in cells)
        out.append("")
    return "\n".join(out)


# ---- interruption

class Interrupted(Exception):
    """SIGTERM or SIGHUP reached the benchmark: unwind and stop every child."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into an exception, so ``finally`` blocks stop the children (Ctrl-C already is one)."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)


# ---- the temporary folder and the stack's settings

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOT_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# ---- child processes

def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark process dies, whatever killed it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A process a benchmark started."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while it runs."""
        return self.proc.poll() is None

    def log(self) -> str:
        """What it wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = COMPONENT_START_S) -> None:
        """Poll the log until it holds ``needle``; fail if the process exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if needle in text:
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before logging {needle!r}:\n"
                                   f"{text[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log {needle!r} within {timeout:.0f}s:\n{text[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Ask it to stop (its stop signal), then kill its process group after ``timeout``."""
        if self.alive():
            try:
                self.proc.send_signal(self.stop_signal)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                note(f"{self.name} did not stop within {timeout:.0f}s; killing it")
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL its process group (a router's workers too)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class Procs:
    """The children of one benchmark: started in their own session, stopped newest first at the end."""

    def __init__(self, log_dir: Path) -> None:
        """Logs go to ``log_dir/<name>.log``."""
        self.log_dir = log_dir
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              stop_signal: int = signal.SIGTERM, stdin: bool = False, cwd: Path | None = None) -> Child:
        """Start ``argv`` (cwd: the repository unless given); its stdout and stderr go to its log."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, cwd=cwd or REPO,
                                    env=dict(env) if env is not None else child_env(), start_new_session=True,
                                    preexec_fn=_die_with_parent)
        child = Child(name, proc, log_path, stop_signal)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = STOP_TIMEOUT_S) -> int:
        """Stop one child now."""
        code = child.stop(timeout)
        if child in self.children:
            self.children.remove(child)
        return code

    def stop_all(self) -> None:
        """Stop every child still running, newest first."""
        try:
            while self.children:
                child = self.children[-1]
                child.stop()
                self.children.pop()
        except BaseException:
            for child in self.children:  # a second Ctrl-C, or a stop that failed: no more waiting
                child.kill()
            self.children.clear()
            raise

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def start_router(procs: Procs, settings: Settings, name: str = "router") -> Child:
    """The project's router (router/config.json with these settings), once its port accepts connections."""
    if not Path(crossbar_executable()).exists():
        raise RuntimeError(f"crossbar is not installed next to {sys.executable}: run `make install`")
    node_dir = router_config.write_node_dir(settings)
    child = procs.start(name, crossbar_argv(node_dir), stop_signal=signal.SIGINT)
    try:
        wait_for_port("127.0.0.1", settings.router.listen_port, time.monotonic() + ROUTER_START_S, child.proc)
    except (TimeoutError, RuntimeError) as err:
        raise RuntimeError(f"router did not start: {err}\n{child.log()[-3000:]}") from None
    return child


def start_component(procs: Procs, settings: Settings, role: str, name: str | None = None,
                    env: Mapping[str, str] | None = None) -> Child:
    """``python -m components storage|query`` with these settings, once it has subscribed or registered."""
    child = procs.start(name or role, python_module("components", "--config", settings.config_path, role),
                        env=child_env(env))
    child.wait_for_log("storage subscribed" if role == "storage" else "query callee registered")
    return child


# ---- psutil: CPU seconds and resident memory per process tree

def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the process and its (living) descendants."""
    total = 0.0
    for p in _tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (anything but idle and iowait)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def rss_bytes(pid: int) -> int:
    """Resident memory of the process and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


@dataclass
class MemoryTrace:
    """RSS samples of one process tree: (monotonic time, bytes)."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def peak_mb(self, start: float = -math.inf, end: float = math.inf) -> float | None:
        """Peak RSS in MB between ``start`` and ``end`` (monotonic)."""
        values = [b for t, b in self.samples if start <= t <= end]
        return max(values) / 2**20 if values else None

    def last_mb(self) -> float | None:
        """The last sample in MB."""
        return self.samples[-1][1] / 2**20 if self.samples else None


class MemorySampler:
    """A thread sampling the RSS of registered processes every ``SAMPLE_INTERVAL_S`` (bounded by their life)."""

    def __init__(self) -> None:
        """Nothing is watched until :meth:`watch`."""
        self._watched: dict[str, tuple[int, MemoryTrace]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> MemoryTrace:
        """Start sampling ``pid`` under ``name`` (a new trace)."""
        trace = MemoryTrace()
        with self._lock:
            self._watched[name] = (pid, trace)
        return trace

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            with self._lock:
                items = list(self._watched.values())
            now = time.monotonic()
            for pid, trace in items:
                rss = rss_bytes(pid)
                if rss:
                    trace.samples.append((now, rss))

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def sleep_until(deadline: float, alive: Callable[[], None] | None = None) -> None:
    """Sleep until ``deadline`` (time.time()), calling ``alive`` (which raises if a child died) on the way."""
    while True:
        left = deadline - time.time()
        if left <= 0:
            return
        if alive is not None:
            alive()
        time.sleep(min(left, 0.2))


def run_main(name: str, description: str, body: Callable[[Options], object], columns: Mapping[str, Sequence[str]],
             argv: Sequence[str] | None = None) -> int:
    """Entry point of one benchmark run alone: options, machine line, the body, then the table on stderr."""
    opts = parse_options(description, argv)
    install_signal_handlers()
    emit(machine_line(opts, [name]))
    started = time.monotonic()
    try:
        body(opts)
    except (KeyboardInterrupt, Interrupted) as err:
        note(f"interrupted ({err or 'Ctrl-C'}); every process it started has been stopped")
        return 130
    finally:
        print("\n" + table(RESULTS, columns), file=sys.stderr, flush=True)
        note(f"{name}: {time.monotonic() - started:.0f}s")
    return 0


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
            if not c.alive():
                raise RuntimeError(f"{c.name} exited early ({c.proc.returncode}):\n{c.log()[-3000:]}")
    return check


def run_caller(procs: Procs, settings: Settings, root: Path, name: str, cases: list[dict[str, Any]],
               timeout: float) -> dict[str, Any]:
    """Run ``bench._caller`` on ``cases`` (sequential WAMP calls); its report, per case name."""
    spec, report = root / f"{name}-spec.json", root / f"{name}-report.json"
    spec.write_text(json.dumps({"cases": cases}), encoding="utf-8")
    child = procs.start(name, python_module("bench._caller", "--config", settings.config_path, "--spec", str(spec),
                                            "--report", str(report)))
    try:
        code = child.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{name} did not finish within {timeout:.0f}s:\n{child.log()[-3000:]}") from None
    finally:
        procs.stop(child)
    data = read_json(report)
    if code != 0 or data is None:
        raise RuntimeError(f"{name} failed ({code}):\n{child.log()[-3000:]}")
    cases_out: dict[str, Any] = data["cases"]
    return cases_out


def target(value: float | None, limit: float, at_most: bool = False, prefix: str = "") -> dict[str, Any]:
    """``target`` and ``meets_target`` fields for a DESIGN.md section 9 target (``>= limit``, or ``<=``)."""
    meets = None if value is None else (value <= limit if at_most else value >= limit)
    return {f"{prefix}target": f"{'<=' if at_most else '>='} {limit:g}", f"{prefix}meets_target": meets}


def latency_figures(latencies_ms: Sequence[float], prefix: str = "") -> dict[str, float]:
    """p50 and p99 (and the count) of a list of milliseconds."""
    return {f"{prefix}p50_ms": percentile(latencies_ms, 50), f"{prefix}p99_ms": percentile(latencies_ms, 99)}
