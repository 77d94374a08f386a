"""Waiting without fixed sleeps: a deadline, a poll loop against it, a port that accepts, a health endpoint that
says ready, a free port."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Deadline:
    """A point ``timeout`` seconds from now (monotonic clock)."""

    def __init__(self, timeout: float) -> None:
        """Starts now."""
        self.timeout = timeout
        self.at = time.monotonic() + timeout

    def left(self) -> float:
        """Seconds until it passes (negative once it has)."""
        return self.at - time.monotonic()

    def passed(self) -> bool:
        """True once it has passed."""
        return self.left() <= 0

    def check(self, what: str) -> None:
        """Raise TimeoutError naming ``what`` once it has passed."""
        if self.passed():
            raise TimeoutError(f"timed out after {self.timeout:g}s waiting for {what}")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (returned); TimeoutError after ``timeout`` seconds.

    ``condition`` may raise to give up early (a process that died).
    """
    deadline = Deadline(timeout)
    while True:
        result = condition()
        if result:
            return result
        deadline.check(what)
        time.sleep(min(interval, max(deadline.left(), 0.0)))


def accepts(host: str, port: int) -> bool:
    """True when ``host:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, deadline: float, alive: object | None = None) -> None:
    """Block until ``host:port`` accepts connections; raise TimeoutError at ``deadline`` (time.monotonic()).

    ``alive`` is a process (anything with ``poll()``) that must not exit meanwhile (RuntimeError if it does).
    """
    def listening() -> bool:
        if alive is not None and alive.poll() is not None:  # type: ignore[attr-defined]
            raise RuntimeError(f"process exited with code {alive.returncode} "  # type: ignore[attr-defined]
                               f"before listening on {port}")
        return accepts(host, port)

    try:
        wait_until(listening, deadline - time.monotonic(), f"{host}:{port}", interval=0.1)
    except TimeoutError:
        raise TimeoutError(f"nothing listened on {host}:{port} in time") from None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def http_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, JSON document) of a GET of ``url``; (0, None) when nothing answers or the answer is not JSON."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read())
        except ValueError:
            return err.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return 0, None


def http_ready(url: str, pid: int | None = None, timeout: float = 2.0) -> dict[str, Any] | None:
    """The JSON document ``url`` (a service's ``/health/ready``) answers with 200, else None (not ready, not
    answering). With ``pid``, only an answer of that process counts: a port may be another stack's."""
    status, doc = http_json(url, timeout)
    if status != 200 or not isinstance(doc, dict) or (pid is not None and doc.get("pid") != pid):
        return None
    return doc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
