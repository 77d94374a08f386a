"""One process supervisor: start child processes, keep their output, restart the ones that die, stop them in order.

Each child runs in a session of its own (so Ctrl-C reaches only the supervisor), gets SIGTERM if the supervisor
itself dies, and writes its output into a pipe that a reader thread copies to the child's log file, to a
bounded tail kept in memory (for reports) and, when asked, to this terminal with the child's name in front.

Restart policy (as compose's ``restart: on-failure`` and Crossbar's worker restart policies): a child that
exits with a non-zero code, or is killed, while the supervisor is not stopping is started again after a
backoff that doubles with each quick failure (0.5 s, 1 s, 2 s, ... up to 10 s). A child that ran for a while
before it died starts again at once. One that fails within seconds of its start several times in a row is
given up: :meth:`Supervisor.poll` reports it with its last log lines, and the caller decides what then.
A child that exits 0 is done and stays stopped.

Readiness is machine-readable, never log text: a child whose spec names a ``ready_port`` is ready once that
port accepts connections (the router); one whose spec names a ``ready_url`` is ready once that health endpoint
answers 200 from the child's own process (storage and query: ``/health/ready``, see
``components.wamp.monitoring``); one whose spec names what it ``announces`` is ready once it prints the line
:func:`ready_line` makes, ``{"ready": "<name>", "pid": N}`` (``components.wamp.connection.announce_ready``).
:meth:`Child.wait_ready` waits for any of them. A program that opens its port before it is fully set up
(Crossbar with proxy workers) names a ``ready_marker`` as well: a fixed token the program itself prints when it
is (Crossbar's ``NODE_BOOT_COMPLETE``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from components.ops.waiting import accepts, http_ready, wait_for_port, wait_until

_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 20.0
TAIL_LINES = 30
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 10.0
QUICK_FAILURE_S = 10.0
"""A child that dies within this many seconds of its start failed 'at once'."""
MAX_QUICK_FAILURES = 5
"""Quick failures in a row after which a child is given up."""


def ready_line(name: str) -> str:
    """The line a child prints once it is ready: ``{"ready": "storage", "pid": 1234}``."""
    return json.dumps({"ready": name, "pid": os.getpid()})


def announced(line: str) -> str | None:
    """The name in a :func:`ready_line`, or None for any other line."""
    if not line.startswith('{"ready"'):
        return None
    try:
        name = json.loads(line)["ready"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the supervisor dies."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one child: its command line, where its output goes, how to stop it, whether to restart it."""

    name: str
    argv: Sequence[str]
    log_path: Path | None = None
    stop_signal: int = signal.SIGTERM
    echo: bool = False
    """Copy its output lines to this process's stdout, prefixed with the name."""
    restart: bool = True
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    """Extra environment variables (on top of ``base_env``)."""
    base_env: Mapping[str, str] | None = None
    """The environment to start from (this process's unless given)."""
    stdin: bool = False
    """Give it a pipe on stdin (``proc.stdin``) instead of /dev/null."""
    ready_port: int | None = None
    """Ready once ``ready_host:ready_port`` accepts connections."""
    ready_host: str = "127.0.0.1"
    announces: str | None = None
    """Ready once it prints ``ready_line(announces)``."""
    ready_marker: str | None = None
    """With ``ready_port``: ready once the port accepts and a line holding this token was printed."""
    ready_url: str | None = None
    """Ready once this health endpoint answers 200 from the child's process."""


def describe_exit(code: int) -> str:
    """'exit 3' or 'killed by SIGKILL' for a Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


@dataclass
class Child:
    """One supervised child: the current process and its history."""

    spec: ServiceSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_failures: int = 0
    restart_at: float | None = None
    given_up: bool = False
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    ready: threading.Event = field(default_factory=threading.Event)
    """Set once the current process printed its ready line."""
    _reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        """The service's name."""
        return self.spec.name

    @property
    def running(self) -> bool:
        """True while its process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The current process's id."""
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        """What it wrote to its log file so far (its last lines when it has none)."""
        if self.spec.log_path is None:
            return "\n".join(self.tail)
        try:
            return self.spec.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _last_lines(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (it printed nothing)"

    def wait_ready(self, timeout: float) -> Child:
        """Block until it is ready (its port accepts, its health endpoint says ready, or it printed its ready line);
        raise if it exits first.

        RuntimeError (it exited) or TimeoutError, with its last lines. A spec naming no readiness is ready now.
        """
        spec = self.spec
        try:
            if spec.ready_port is not None:
                deadline = time.monotonic() + timeout
                wait_for_port(spec.ready_host, spec.ready_port, deadline, self.proc)
                if spec.ready_marker is not None:
                    wait_until(self._announced, max(0.0, deadline - time.monotonic()),
                               f"{spec.name} to print {spec.ready_marker}")
            elif spec.ready_url is not None:
                wait_until(self._says_ready, timeout, f"{spec.name} to answer {spec.ready_url} with ready",
                           interval=0.2)
            elif spec.announces is not None:
                wait_until(self._announced, timeout, f"{spec.name} to print its ready line")
        except (TimeoutError, RuntimeError) as err:
            raise type(err)(f"{spec.name} did not get ready: {err}; its last lines:\n{self._last_lines()}") from None
        return self

    def _says_ready(self) -> bool:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"process exited ({describe_exit(proc.returncode) if proc else 'not started'})")
        return http_ready(str(self.spec.ready_url), proc.pid) is not None

    def is_ready(self) -> bool:
        """Whether the current process is ready now (one look, no waiting; False while it is not running)."""
        proc, spec = self.proc, self.spec
        if proc is None or proc.poll() is not None:
            return False
        if spec.ready_port is not None:
            return (spec.ready_marker is None or self.ready.is_set()) and accepts(spec.ready_host, spec.ready_port)
        if spec.ready_url is not None:
            return http_ready(spec.ready_url, proc.pid) is not None
        return spec.announces is None or self.ready.is_set()

    def _announced(self) -> bool:
        if self.ready.is_set():
            return True
        if not self.running:
            if self._reader is not None:
                self._reader.join(1.0)  # its last lines, the ready line perhaps, may still be in the pipe
            if self.ready.is_set():
                return True
            assert self.proc is not None
            raise RuntimeError(f"it exited ({describe_exit(self.proc.returncode)})")
        return False

    def start(self) -> None:
        """Start (or start again) the process, its output going through a reader thread."""
        spec = self.spec
        # unbuffered: a Python child's output reaches the log line by line, not when a pipe buffer fills
        env = dict(os.environ if spec.base_env is None else spec.base_env, PYTHONUNBUFFERED="1", **(spec.env or {}))
        self.ready.clear()
        self.proc = subprocess.Popen(list(spec.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent, cwd=spec.cwd, env=env)
        self.started_at = time.monotonic()
        self.restart_at = None
        self._reader = threading.Thread(target=self._copy_output, args=(self.proc.stdout,),
                                        name=f"output-{spec.name}", daemon=True)
        self._reader.start()

    def _copy_output(self, stream: IO[bytes] | None) -> None:
        if stream is None:
            return
        log = open(self.spec.log_path, "ab") if self.spec.log_path else None
        try:
            for raw in iter(stream.readline, b""):
                if log is not None:
                    log.write(raw)
                    log.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                self.tail.append(line)
                if self.spec.announces is not None and announced(line) == self.spec.announces:
                    self.ready.set()
                elif self.spec.ready_marker is not None and self.spec.ready_marker in line:
                    self.ready.set()
                if self.spec.echo:
                    sys.stdout.write(f"{self.spec.name:>8} | {line}\n")
                    sys.stdout.flush()
        finally:
            stream.close()
            if log is not None:
                log.close()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the current process to exit (subprocess.TimeoutExpired after ``timeout``); its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def reap(self) -> None:
        """After the process exited: kill what it left behind in its session, wait for its output to end."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._reader is not None:
            self._reader.join(5.0)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Ask it to stop with its stop signal; SIGKILL after ``timeout``. Returns the exit code."""
        self.restart_at = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(self.spec.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop in {timeout:.0f}s; killing it", file=sys.stderr, flush=True)
                self.proc.kill()
                self.proc.wait()
        self.reap()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL its whole session now (a router's workers too) and wait for it."""
        self.restart_at = None
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self.reap()


@dataclass(frozen=True)
class Event:
    """Something :meth:`Supervisor.poll` noticed: a child exited, was restarted, or was given up."""

    kind: str
    """'exited', 'restarted', 'done' (exited 0) or 'given_up'."""
    child: Child
    detail: str


class Supervisor:
    """Starts children, restarts those that die, stops them newest first."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        """An empty supervisor; ``say`` reports what :meth:`stop` did (default: print on stdout)."""
        self.children: list[Child] = []
        self.stopping = False
        self.say = say or (lambda message: print(message, flush=True))

    def start(self, spec: ServiceSpec) -> Child:
        """Start a child under supervision."""
        child = Child(spec)
        child.start()
        self.children.append(child)
        return child

    def poll(self, now: float | None = None) -> list[Event]:
        """Notice exits, schedule and perform restarts; return what happened (call it a few times a second)."""
        now = time.monotonic() if now is None else now
        events: list[Event] = []
        for child in self.children:
            proc = child.proc
            if proc is None or child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at and not self.stopping:
                    child.restarts += 1
                    child.start()
                    events.append(Event("restarted", child, f"restart {child.restarts}"))
                continue
            code = proc.poll()
            if code is None or self.stopping:
                continue
            child.reap()
            events.append(self._after_exit(child, code, now))
        return events

    def _after_exit(self, child: Child, code: int, now: float) -> Event:
        how = describe_exit(code)
        if code == 0 or not child.spec.restart:
            child.given_up = code != 0
            return Event("done" if code == 0 else "given_up", child, how)
        ran = now - child.started_at
        child.quick_failures = child.quick_failures + 1 if ran < QUICK_FAILURE_S else 1
        if child.quick_failures >= MAX_QUICK_FAILURES:
            child.given_up = True
            return Event("given_up", child, f"{how}, {child.quick_failures} times in a row within "
                                            f"{QUICK_FAILURE_S:.0f}s of starting")
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (child.quick_failures - 1)) if ran < QUICK_FAILURE_S \
            else 0.0
        child.restart_at = now + delay
        return Event("exited", child, f"{how} after {ran:.1f}s; restarting in {delay:.1f}s")

    def stop_child(self, child: Child, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop one child now and forget it; its exit code."""
        code = child.stop(timeout)
        if child in self.children:
            self.children.remove(child)
        return code

    def stop(self) -> None:
        """Stop every child, newest first, each with its stop signal (SIGKILL after a timeout).

        Interrupted (a second Ctrl-C, an error), it kills the children left at once and re-raises.
        """
        self.stopping = True
        try:
            while self.children:
                child = self.children[-1]
                code = child.stop()
                if code is not None:
                    self.say(f"  stopped {child.name} ({describe_exit(code)})")
                self.children.pop()
        except BaseException:
            for child in self.children:
                child.kill()
            self.children.clear()
            raise
