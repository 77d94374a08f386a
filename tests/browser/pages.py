"""Driving the dashboard in headless Chromium: one browser thread, open pages, what the tests wait for.

Playwright's sync API runs on one dedicated thread: its objects may only be used from the thread that created them,
and the reactor thread has to stay free for the WAMP sessions the tests publish with. Assertions read the page's
read-only hook ``window.sensorHub`` (and the rendered table), never pixels. Wait predicates are arrow functions:
the page's Content-Security-Policy forbids eval, which Playwright would use for a bare expression.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from playwright.sync_api import Browser, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from twisted.internet import defer, reactor
from twisted.python.failure import Failure

from components.core.settings import Settings
from components.ops import router_config
from tests.support.harness import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
WAIT_S = 20.0

CONNECTED = "() => sensorHub.state === 'connected'"
LOADED = "() => sensorHub.state === 'connected' && sensorHub.loads > 0"
HAS_POINT = """([device, sensor, value]) => sensorHub.series().some(s =>
    s.device_id === device && s.sensor_type === sensor && s.points.some(p => p[1] === value))"""
LAST_VALUE = """([device, sensor]) => {
    const d = sensorHub.devices().find(d => d.device_id === device);
    return d && d.last[sensor] ? d.last[sensor].value : null;
}"""
SNAPSHOT = """() => ({state: sensorHub.state, message: sensorHub.message, received: sensorHub.received,
    skipped: sensorHub.skipped, loads: sensorHub.loads, hash: location.hash.replace(/ticket=[^&]*/, 'ticket=…'),
    history: sensorHub.history, note: sensorHub.note, view: sensorHub.view(), charted: sensorHub.charted(),
    series: sensorHub.series().map(s => `${s.device_id}/${s.sensor_type}:${s.points.length}`)})"""



class BrowserThread:
    """Runs callables on one thread of its own; each call returns a Deferred that fires on the reactor thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], defer.Deferred[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="playwright", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done = job
            try:
                result = fn()
            except BaseException:
                reactor.callFromThread(done.errback, Failure())
            else:
                reactor.callFromThread(done.callback, result)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """``fn(*args, **kwargs)`` on the browser thread."""
        done: defer.Deferred[Any] = defer.Deferred()
        self._jobs.put((lambda: fn(*args, **kwargs), done))
        return done

    def stop(self) -> None:
        """Let the thread finish (after the jobs already queued)."""
        self._jobs.put(None)
        self._thread.join(30)


class Dashboard:
    """One open dashboard page; every method runs on the browser thread and returns a Deferred."""

    def __init__(self, thread: BrowserThread, page: Page) -> None:
        self.thread = thread
        self.page = page
        self.errors: list[str] = []     # uncaught exceptions in the page
        self.console: list[str] = []
        page.on("pageerror", lambda err: self.errors.append(str(err)))
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))

    def wait(self, predicate: str, arg: Any = None, timeout: float = WAIT_S) -> defer.Deferred[Any]:
        """Wait until the JS ``predicate`` (an arrow function) returns a truthy value; fire with that value."""
        def run() -> Any:
            try:
                return self.page.wait_for_function(predicate, arg=arg, timeout=timeout * 1000, polling=100).json_value()
            except PlaywrightTimeout:
                raise AssertionError(f"timed out after {timeout}s waiting for {predicate} ({arg!r}); page: "
                                     f"{self.page.evaluate(SNAPSHOT)}; console: {self.console[-8:]}") from None
        return self.thread.call(run)

    def eval(self, fn: str, arg: Any = None) -> defer.Deferred[Any]:
        """The value of the JS function ``fn(arg)``."""
        return self.thread.call(self.page.evaluate, fn, arg)

    def screenshot(self, name: str) -> defer.Deferred[Any]:
        """Save a full-page screenshot under test-artifacts/, after the page's next redraw."""
        ARTIFACTS.mkdir(exist_ok=True)

        def run() -> None:
            draws = self.page.evaluate("() => sensorHub.draws")
            self.page.wait_for_function("(n) => sensorHub.draws > n", arg=draws, timeout=WAIT_S * 1000)
            self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)
        return self.thread.call(run)


@dataclass
class Chromium:
    thread: BrowserThread
    browser: Browser

    def open(self, url: str) -> defer.Deferred[Dashboard]:
        """A fresh browser context (no shared state between pages) with ``url`` loaded."""
        def run() -> Dashboard:
            context = self.browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            page = context.new_page()
            dash = Dashboard(self.thread, page)
            page.goto(url)
            return dash
        return self.thread.call(run)



def dashboard_url(settings: Settings, ticket: str | None = None, **params: str) -> str:
    """The dashboard's address, ``#ticket=...`` first as ``make run`` prints it, then the other hash params."""
    fragment = {"ticket": ticket, **params} if ticket is not None else params
    return f"{router_config.http_base(settings)}/#{urlencode(fragment)}"

