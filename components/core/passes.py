"""Background passes: a daemon thread that runs a pass now and then at an interval until it is stopped.

A pass that fails is logged (an :class:`~components.core.errors.IotError` as a warning, anything else with its
traceback) and tried again at the next interval; the thread never dies of it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from components.core.errors import IotError

log = logging.getLogger(__name__)


class PassThread:
    """Runs ``run_once`` on a thread of its own every ``interval_s`` seconds; ``stopping`` is set by :meth:`stop`
    (a pass may wait on it, to end early)."""

    def __init__(self, name: str, what: str, run_once: Callable[[], object], interval_s: float) -> None:
        """``what`` names the pass in log lines (``"compaction"``)."""
        self.stopping = threading.Event()
        self._name, self._what, self._run_once, self._interval_s = name, what, run_once, interval_s
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the first pass now, then one per interval."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the pass under way."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._run_once()
            except IotError as err:
                log.warning("%s pass stopped: %s; trying again in %.0fs", self._what, err, self._interval_s)
            except Exception:
                log.exception("%s pass failed; trying again in %.0fs", self._what, self._interval_s)
            self.stopping.wait(self._interval_s)
