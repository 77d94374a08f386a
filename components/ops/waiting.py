"""Waiting without fixed sleeps: a deadline, a poll loop against it, a port that accepts, a free port."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
