"""The live dashboard (router/web/, served by the router) in headless Chromium, against a real router, storage, query
callee and simulated devices.

Playwright's sync API runs on one dedicated thread: its objects may only be used from the thread that created them,
and the reactor thread has to stay free for the WAMP sessions the tests publish with. Assertions read the page's
read-only hook ``window.sensorHub`` (and the rendered table), never pixels. Wait predicates are arrow functions:
the page's Content-Security-Policy forbids eval, which Playwright would use for a bare expression.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from autobahn.wamp.types import PublishOptions
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from twisted.internet import defer, reactor, threads
from twisted.python.failure import Failure

from components.core.settings import Settings
from components.ops import router_config
from components.ops.credentials import CredentialStore
from tests.support.harness import (
    REPO,
    ComponentProcess,
    RouterProcess,
    Session,
    as_device,
    as_principal,
    derive_settings,
    python_process,
    stack_settings,
    start_query,
    start_storage,
    wait_until,
)

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
ACK = PublishOptions(acknowledge=True)
WAIT_S = 20.0

CONNECTED = "() => sensorHub.state === 'connected'"
BACKFILLED = "() => sensorHub.state === 'connected' && sensorHub.backfills > 0"
HAS_POINT = """([device, sensor, value]) => sensorHub.series().some(s =>
    s.device_id === device && s.sensor_type === sensor && s.points.some(p => p[1] === value))"""
LAST_VALUE = """([device, sensor]) => {
    const d = sensorHub.devices().find(d => d.device_id === device);
    return d && d.last[sensor] ? d.last[sensor].value : null;
}"""
SNAPSHOT = """() => ({state: sensorHub.state, message: sensorHub.message, received: sensorHub.received,
    skipped: sensorHub.skipped, backfills: sensorHub.backfills, hash: location.hash.replace(/ticket=[^&]*/, 'ticket=…'),
    history: document.getElementById('history').textContent,
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
        """Save a full-page screenshot under test-artifacts/."""
        ARTIFACTS.mkdir(exist_ok=True)
        return self.thread.call(self.page.screenshot, path=str(ARTIFACTS / name), full_page=True)


@dataclass
class Chromium:
    thread: BrowserThread
    browser: Browser

    def open(self, url: str) -> defer.Deferred[Dashboard]:
        """A fresh browser context (no shared state between pages) with ``url`` loaded."""
        def run() -> Dashboard:
            page = self.browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            dash = Dashboard(self.thread, page)
            page.goto(url)
            return dash
        return self.thread.call(run)


@pytest_twisted.async_yield_fixture(scope="module")
async def chromium():
    thread = BrowserThread()
    playwright = await thread.call(lambda: sync_playwright().start())
    browser = await thread.call(playwright.chromium.launch, executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield Chromium(thread, browser)
    finally:
        await thread.call(browser.close)
        await thread.call(playwright.stop)
        thread.stop()


@pytest_twisted.async_yield_fixture
async def open_page(chromium):
    """Opens dashboard pages; closes them after the test and fails it on any uncaught page exception."""
    pages: list[Dashboard] = []

    async def open_(url: str) -> Dashboard:
        dash = await chromium.open(url)
        pages.append(dash)
        return dash

    yield open_
    for dash in pages:
        await chromium.thread.call(dash.page.context.close)
    assert [e for dash in pages for e in dash.errors] == []


def dashboard_url(settings: Settings, ticket: str | None = None, **params: str) -> str:
    """The dashboard's address, ``#ticket=...`` first as ``make run`` prints it, then the other hash params."""
    fragment = {"ticket": ticket, **params} if ticket is not None else params
    return f"{router_config.http_base(settings)}/#{urlencode(fragment)}"


@dataclass
class Hub:
    settings: Settings
    ticket: str
    device0: Session
    reader: Session

    def url(self, **params: str) -> str:
        return dashboard_url(self.settings, self.ticket, **params)


@pytest_twisted.async_yield_fixture(scope="module")
async def hub(router, router_settings, tmp_path_factory):
    """Storage, query callee and simulated devices 1 and 2 (5 readings/s per sensor) on the session router;
    the tests publish as device 0 themselves."""
    s = derive_settings(router_settings, tmp_path_factory.mktemp("dashboard"))
    procs: list[ComponentProcess] = []
    sessions: list[Session] = []
    try:
        procs.append(await start_storage(s))
        procs.append(await start_query(s))
        procs.append(python_process(s, "simulator", "devices", "simulate", "--device-ids", "1,2",
                                    "--rate", "5").start())
        sessions.append(await as_device(s, "0"))
        sessions.append(await as_principal(s, "dashboard"))
        reader = sessions[-1]

        def simulated_devices_stored() -> defer.Deferred[bool]:
            d = reader.call("iot.list_devices")
            d.addCallback(lambda rows: {"1", "2"} <= {r["device_id"] for r in rows})
            return d.addErrback(lambda _: False)

        await wait_until(simulated_devices_stored, WAIT_S, message="readings of devices 1 and 2 stored")
        yield Hub(s, CredentialStore(s.paths.secrets_dir).ticket("dashboard"), sessions[0], reader)
    finally:
        for session in sessions:
            await session.close()
        for proc in reversed(procs):
            proc.stop()


def publish(session: Session, device: str, sensor: str, *args: Any) -> defer.Deferred[Any]:
    return session.publish(f"iot.sensor.{device}.{sensor}", *args, options=ACK)


@pytest_twisted.ensureDeferred
async def test_live_reading_appears_in_table_and_chart(hub, open_page) -> None:
    page = await open_page(hub.url())
    await page.wait(BACKFILLED)
    await publish(hub.device0, "0", "pressure", {"value": 63.25, "ts": time.time()})

    await page.wait(HAS_POINT, ["0", "pressure", 63.25])
    assert await page.wait(LAST_VALUE, ["0", "pressure"]) == 63.25
    # ... and the table as drawn, not only the data behind it
    await page.wait("""() => [...document.querySelectorAll('#devices tr[data-device="0"] .value')]
                             .some(e => e.textContent === 'pressure 63.25')""")
    await page.wait("() => sensorHub.readingsPerSecond() > 0")

    # At 20 readings/s the page redraws at most 4 times a second, not once per reading.
    draws, received, started = await page.eval("() => [sensorHub.draws, sensorHub.received, performance.now()]")
    draws_now, received_now, now = await page.wait(
        "(n) => sensorHub.received >= n && [sensorHub.draws, sensorHub.received, performance.now()]", received + 40)
    assert draws_now - draws <= (now - started) / 250 + 2, (draws_now - draws, received_now - received)

    await page.wait("() => sensorHub.series().filter(s => s.points.length >= 10).length >= 4")
    await page.screenshot("dashboard.png")


@pytest_twisted.ensureDeferred
async def test_backfill_shows_readings_stored_before_the_page_opened(hub, open_page) -> None:
    ts = round(time.time() - 30, 3)
    await publish(hub.device0, "0", "backfill", {"value": 17.5, "ts": ts})
    await wait_until(lambda: hub.reader.call("iot.fetch_last_n_sec", 300, device_id="0", sensor_type="backfill"),
                     WAIT_S, message="the reading stored")

    page = await open_page(hub.url())
    await page.wait(BACKFILLED)
    await page.wait(HAS_POINT, ["0", "backfill", 17.5])
    assert await page.eval(LAST_VALUE, ["0", "backfill"]) == 17.5
    await page.wait("() => document.getElementById('history').textContent.startsWith('history: ')")
    shown = await page.eval("() => sensorHub.devices().map(d => d.device_id)")
    assert {"0", "1", "2"} <= set(shown)


@pytest_twisted.ensureDeferred
async def test_malformed_readings_are_skipped_and_counted(hub, open_page) -> None:
    page = await open_page(hub.url())
    await page.wait(BACKFILLED)
    skipped = await page.eval("() => sensorHub.skipped")
    now = time.time()
    await publish(hub.device0, "0", "humidity", "not a reading")
    await publish(hub.device0, "0", "humidity", {"value": float("nan"), "ts": now})
    await publish(hub.device0, "0", "humidity", {"value": float("inf"), "ts": now})
    await publish(hub.device0, "0", "humidity", {"value": 5.0})                       # no ts
    await publish(hub.device0, "0", "humidity", [{"value": 31.5, "ts": now}, {"value": "7", "ts": now}, None])
    await publish(hub.device0, "0", "humidity")                                       # no payload at all
    await publish(hub.device0, "0", "humidity", {"value": 32.5, "ts": now + 0.5})

    await page.wait(HAS_POINT, ["0", "humidity", 32.5])
    assert await page.eval("() => sensorHub.skipped") == skipped + 7
    assert await page.eval(HAS_POINT, ["0", "humidity", 31.5])   # the good reading of the mixed event is kept
    await page.wait("(n) => document.getElementById('skipped').textContent === `${n} skipped`", skipped + 7)
    await publish(hub.device0, "0", "humidity", {"value": 33.5, "ts": now + 1})
    await page.wait(HAS_POINT, ["0", "humidity", 33.5])
    assert await page.eval("() => sensorHub.state") == "connected"


@pytest_twisted.ensureDeferred
async def test_filters_in_the_url_restrict_what_is_shown(hub, open_page) -> None:
    await publish(hub.device0, "0", "humidity", {"value": 12.5, "ts": time.time()})  # stored: a device to hide
    await wait_until(lambda: hub.reader.call("iot.fetch_last_n_sec", 60, device_id="0"), WAIT_S,
                     message="device 0's reading stored")
    page = await open_page(hub.url(device="1", sensor="humidity", theme="x"))
    await page.wait(BACKFILLED)
    device1 = await as_device(hub.settings, "1")
    try:
        await publish(device1, "1", "pressure", {"value": 555.5, "ts": time.time()})   # another sensor: hidden
        await publish(device1, "1", "humidity", {"value": 123.25, "ts": time.time()})  # shown, and sent after
        await page.wait(HAS_POINT, ["1", "humidity", 123.25])
    finally:
        await device1.close()

    shown = await page.eval("() => sensorHub.series().map(s => [s.device_id, s.sensor_type])")
    assert shown == [["1", "humidity"]]
    rows = await page.eval("() => sensorHub.devices()")
    assert [(r["device_id"], sorted(r["last"])) for r in rows] == [("1", ["humidity"])]
    # the table as drawn (on the next redraw, at most 250 ms later): device 1's row only
    await page.wait("""() => [...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device)
                             .join() === '1'""")
    # what is hidden is known (the filters offer it, from the next redraw on), only not shown
    await page.wait("""([devices, sensors]) => {
        const [d, s] = ['device-filter', 'sensor-filter'].map(id =>
            [...document.getElementById(id).options].map(o => o.value));
        return devices.every(x => d.includes(x)) && sensors.every(x => s.includes(x));
    }""", [["0", "1", "2"], ["humidity", "pressure", "temperature"]])
    assert await page.eval("() => [document.getElementById('device-filter').value, "
                           "document.getElementById('sensor-filter').value]") == ["1", "humidity"]
    assert "ticket" not in await page.eval("() => document.getElementById('share-link').getAttribute('href')")

    # Choosing "all sensors" shows the hidden reading at once and rewrites the hash, ticket and the rest kept.
    await page.thread.call(page.page.select_option, "#sensor-filter", "")
    await page.wait(HAS_POINT, ["1", "pressure", 555.5])
    assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}&device=1&theme=x"


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_ticket_asks_for_one(hub, open_page) -> None:
    page = await open_page(hub.url().replace(hub.ticket, "wrong") + "&device=1")
    await page.wait("() => sensorHub.state === 'auth failed'")
    # drawn on the next frame, with the router's own words
    message = await page.wait("() => document.getElementById('state-message').textContent")
    assert "was not accepted" in message and "not_authorized" in message
    assert await page.eval("() => !document.getElementById('ticket-form').hidden")

    # The right ticket typed into the form logs in and lands in the hash, next to the filter.
    await page.thread.call(page.page.fill, "#ticket-input", hub.ticket)
    await page.thread.call(page.page.click, "#ticket-form button")
    await page.wait(BACKFILLED)
    assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}&device=1"
    assert await page.eval("() => document.getElementById('ticket-form').hidden")

    nothing = await open_page(dashboard_url(hub.settings, device="1"))
    await nothing.wait("() => sensorHub.state === 'no ticket'")
    assert await nothing.eval("() => !document.getElementById('ticket-form').hidden")


@pytest_twisted.ensureDeferred
async def test_page_recovers_after_the_router_restarts(open_page, tmp_path) -> None:
    """A router of its own, stopped and started again on the same port. Its query callee answers at most 20
    readings, so the page's back-fill also meets iot.error.too_many_results."""
    settings = stack_settings(tmp_path / "stack", devices=("0",), overrides={"query": {"max_results": 20}})
    router = await threads.deferToThread(RouterProcess(settings).start)
    procs: list[ComponentProcess] = []
    try:
        procs.append(await start_storage(settings))
        procs.append(await start_query(settings))
        procs.append(python_process(settings, "simulator", "devices", "simulate", "--device-ids", "0",
                                    "--rate", "5").start())
        reader = await as_principal(settings, "dashboard")
        try:
            def stored_enough() -> defer.Deferred[bool]:
                d = reader.call("iot.get_stats").addCallback(lambda stats: stats["stored"] > 20)
                return d.addErrback(lambda _: False)

            await wait_until(stored_enough, WAIT_S, message="more than query.max_results readings stored")
        finally:
            await reader.close()

        ticket = CredentialStore(settings.paths.secrets_dir).ticket("dashboard")
        page = await open_page(dashboard_url(settings, ticket))
        await page.wait(BACKFILLED)
        # too_many_results for the whole window: the page asked for the newest readings, fewer each time
        history = await page.eval("() => sensorHub.history")
        assert 0 < int(re.fullmatch(r"history: the newest (\d+) readings", history)[1]) <= 20, history
        await page.wait("() => sensorHub.received > 0")
        backfills = await page.eval("() => sensorHub.backfills")

        await threads.deferToThread(router.stop)
        await page.wait("() => sensorHub.state === 'reconnecting'")
        restarted = time.time()
        await threads.deferToThread(router.start)          # same settings: the same port
        await page.wait(CONNECTED, timeout=30)
        await page.wait("(t) => sensorHub.series().some(s => s.points.some(p => p[0] > t))", restarted)
        # ... and back-fills again once the query callee has registered again (it may come back after the page)
        await page.wait("(n) => sensorHub.backfills > n && sensorHub.history.startsWith('history: the newest')",
                        backfills, timeout=30)
    finally:
        for proc in reversed(procs):
            proc.stop()
        await threads.deferToThread(router.stop)
