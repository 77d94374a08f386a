"""The dashboard (router/web/, served by the router) in headless Chromium, against a real router, storage, query
callee and simulated devices: live and past ranges, zoom, CSV, a thousand devices, a router restart.

Playwright's sync API runs on one dedicated thread: its objects may only be used from the thread that created them,
and the reactor thread has to stay free for the WAMP sessions the tests publish with. Assertions read the page's
read-only hook ``window.sensorHub`` (and the rendered table), never pixels; which queries the page makes is read
from the query service's audit log. Wait predicates are arrow functions:
the page's Content-Security-Policy forbids eval, which Playwright would use for a bare expression.
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from autobahn.wamp.exception import ApplicationError
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
    """Opens dashboard pages; closes them after the test and fails it on any uncaught page exception or
    Content-Security-Policy violation."""
    pages: list[Dashboard] = []

    async def open_(url: str) -> Dashboard:
        dash = await chromium.open(url)
        pages.append(dash)
        return dash

    yield open_
    for dash in pages:
        await chromium.thread.call(dash.page.context.close)
    assert [e for dash in pages for e in dash.errors] == []
    # the page, uPlot included, stays inside its Content-Security-Policy (no inline style or script)
    assert [m for dash in pages for m in dash.console if "Content Security Policy" in m] == []


def dashboard_url(settings: Settings, ticket: str | None = None, **params: str) -> str:
    """The dashboard's address, ``#ticket=...`` first as ``make run`` prints it, then the other hash params."""
    fragment = {"ticket": ticket, **params} if ticket is not None else params
    return f"{router_config.http_base(settings)}/#{urlencode(fragment)}"


@dataclass
class Hub:
    settings: Settings
    ticket: str
    device0: Session
    admin: Session

    def url(self, **params: str) -> str:
        return dashboard_url(self.settings, self.ticket, **params)


@pytest_twisted.async_yield_fixture(scope="module")
async def hub(router, router_settings, tmp_path_factory):
    """Storage, query callee and simulated devices 1 and 2 (5 readings/s per sensor) on the session router;
    the tests publish as device 0 themselves. Devices 0, 1 and 2 have a week of "history" (a reading every 30 s,
    ending 10 minutes ago): more than a chart shows raw in a day or a week, less in an hour."""
    s = derive_settings(router_settings, tmp_path_factory.mktemp("dashboard"))
    procs: list[ComponentProcess] = []
    sessions: list[Session] = []
    try:
        procs.append(await start_storage(s))
        procs.append(await start_query(s))
        procs.append(python_process(s, "simulator", "devices", "simulate", "--device-ids", "1,2",
                                    "--rate", "5").start())
        sessions.append(await as_device(s, "0"))
        sessions.append(await as_principal(s, "admin"))
        admin = sessions[-1]
        now = time.time()
        last = await publish_history(sessions[0], "0", now)
        for device in ("1", "2"):
            session = await as_device(s, device)
            try:
                await publish_history(session, device, now)
            finally:
                await session.close()

        def stored() -> defer.Deferred[bool]:
            d = admin.call("iot.fetch_between_window", last, last, sensor_type="history")   # the last of each
            return d.addCallback(lambda rows: len(rows) == 3).addErrback(lambda _: False)

        await wait_until(stored, WAIT_S, message="the history of devices 0, 1 and 2 stored")
        yield Hub(s, CredentialStore(s.paths.secrets_dir).ticket("dashboard"), sessions[0], admin)
    finally:
        for session in sessions:
            await session.close()
        for proc in reversed(procs):
            proc.stop()


def publish(session: Session, device: str, sensor: str, *args: Any) -> defer.Deferred[Any]:
    return session.publish(f"iot.sensor.{device}.{sensor}", *args, options=ACK)


async def publish_history(session: Session, device: str, now: float) -> float:
    """A week of the device's "history", a reading every 30 s (a daily wave), 1,000 readings an event; the last ts."""
    ts = [round(now - 7 * 86400 + 60 + 30 * k, 3) for k in range(int((7 * 86400 - 660) / 30))]
    n = int(device)
    readings = [{"ts": t, "value": round(20 + 8 * n + (5 - n) * math.sin(2 * math.pi * t / 86400 + n) + (k % 7) * 0.2,
                                         2)} for k, t in enumerate(ts)]
    for k in range(0, len(readings), 1000):
        await publish(session, device, "history", readings[k:k + 1000])
    return ts[-1]


@pytest_twisted.ensureDeferred
async def test_live_reading_appears_in_table_and_chart(hub, open_page) -> None:
    page = await open_page(hub.url())
    await page.wait(LOADED)
    assert {"0", "1", "2"} <= set(await page.eval("() => sensorHub.charted()"))
    await publish(hub.device0, "0", "pressure", {"value": 63.25, "ts": time.time()})

    await page.wait(HAS_POINT, ["0", "pressure", 63.25])
    assert await page.wait(LAST_VALUE, ["0", "pressure"]) == 63.25
    # ... and the table as drawn, not only the data behind it
    await page.wait("""() => [...document.querySelectorAll('#devices tr[data-device="0"] .value')]
                             .some(e => e.textContent === 'pressure 63.25')""")
    await page.wait("() => sensorHub.readingsPerSecond() > 0")
    # one uPlot chart per sensor type, nothing drawn by hand
    assert await page.eval("() => document.querySelectorAll('#charts figure .uplot canvas').length") >= 3

    # At 30 readings/s the page redraws at most 4 times a second, not once per reading.
    draws, received, started = await page.eval("() => [sensorHub.draws, sensorHub.received, performance.now()]")
    draws_now, received_now, now = await page.wait(
        "(n) => sensorHub.received >= n && [sensorHub.draws, sensorHub.received, performance.now()]", received + 40)
    assert draws_now - draws <= (now - started) / 250 + 2, (draws_now - draws, received_now - received)

    await page.wait("() => sensorHub.series().filter(s => s.points.length >= 10).length >= 4")
    await page.screenshot("dashboard-live.png")


@pytest_twisted.ensureDeferred
async def test_backfill_shows_readings_stored_before_the_page_opened(hub, open_page) -> None:
    ts = round(time.time() - 30, 3)
    await publish(hub.device0, "0", "backfill", {"value": 17.5, "ts": ts})
    await wait_until(lambda: hub.admin.call("iot.fetch_last_n_sec", 300, device_id="0", sensor_type="backfill"),
                     WAIT_S, message="the reading stored")

    page = await open_page(hub.url())
    await page.wait(LOADED)
    await page.wait(HAS_POINT, ["0", "backfill", 17.5])
    assert await page.eval(LAST_VALUE, ["0", "backfill"]) == 17.5
    assert (await page.eval("() => sensorHub.history")).startswith("live, back-filled ")
    shown = await page.eval("() => sensorHub.devices().map(d => d.device_id)")
    assert {"0", "1", "2"} <= set(shown)


@pytest_twisted.ensureDeferred
async def test_malformed_readings_are_skipped_and_counted(hub, open_page) -> None:
    page = await open_page(hub.url())
    await page.wait(LOADED)
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
async def test_devices_and_sensor_in_the_url_restrict_what_is_shown(hub, open_page) -> None:
    page = await open_page(hub.url(devices="1", sensor="humidity", theme="x"))
    await page.wait(LOADED)
    device1 = await as_device(hub.settings, "1")
    try:
        await publish(device1, "1", "pressure", {"value": 555.5, "ts": time.time()})   # another sensor: hidden
        await publish(device1, "1", "humidity", {"value": 123.25, "ts": time.time()})  # shown, and sent after
        await page.wait(HAS_POINT, ["1", "humidity", 123.25])
    finally:
        await device1.close()

    shown = await page.eval("() => sensorHub.series().map(s => [s.device_id, s.sensor_type])")
    assert shown == [["1", "humidity"]]
    assert await page.eval("() => sensorHub.charted()") == ["1"]
    # the table lists every device that has the sensor (device 1 ticked), the charts say how many are hidden
    await page.wait("""() => [...document.querySelectorAll('#devices tbody input:checked')]
                             .map(e => e.dataset.device).join() === '1'""")
    note = await page.wait("() => document.getElementById('chart-note').textContent")
    assert re.fullmatch(r"1 of (\d+) devices charted, (\d+) hidden: tick them in the table to chart them", note)
    assert "ticket" not in await page.eval("() => document.getElementById('share-link').getAttribute('href')")

    # Choosing "all sensors" shows the other sensor type of device 1 and rewrites the hash, ticket and the rest kept.
    await page.thread.call(page.page.select_option, "#sensor-filter", "")
    await page.wait(HAS_POINT, ["1", "pressure", 555.5])
    assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}&devices=1&theme=x"
    # Ticking device 2 in the table charts it too (and puts it in the address).
    await page.thread.call(page.page.check, '#devices input[data-device="2"]')
    await page.wait("() => sensorHub.series().some(s => s.device_id === '2')")
    assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}&devices=1%2C2&theme=x"


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_ticket_asks_for_one(hub, open_page) -> None:
    page = await open_page(hub.url().replace(hub.ticket, "wrong") + "&devices=1")
    await page.wait("() => sensorHub.state === 'auth failed'")
    # drawn on the next frame, with the router's own words
    message = await page.wait("() => document.getElementById('state-message').textContent")
    assert "was not accepted" in message and "not_authorized" in message
    assert await page.eval("() => !document.getElementById('ticket-form').hidden")

    # The right ticket typed into the form logs in and lands in the hash, next to the devices.
    await page.thread.call(page.page.fill, "#ticket-input", hub.ticket)
    await page.thread.call(page.page.click, "#ticket-form button")
    await page.wait(LOADED)
    assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}&devices=1"
    assert await page.eval("() => document.getElementById('ticket-form').hidden")

    nothing = await open_page(dashboard_url(hub.settings, devices="1"))
    await nothing.wait("() => sensorHub.state === 'no ticket'")
    assert await nothing.eval("() => !document.getElementById('ticket-form').hidden")


@pytest.mark.parametrize("fragment, why", [
    ({"range": "12x"}, "range=12x is not one of live, 1h, 24h, 7d, 30d"),
    ({"from": "yesterday", "to": "2026-01-01T00:00:00Z"}, "from=yesterday to=2026-01-01T00:00:00Z is not a time range"),
    ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z", "devices": "1"}, "is not a time range"),
    ({"range": "7d", "devices": "1,nosuch"}, "no device nosuch is known"),
    ({"range": "1h", "devices": "Bad-Id"}, "no device Bad-Id is known"),
])
@pytest_twisted.ensureDeferred
async def test_a_malformed_fragment_falls_back_to_live_with_a_note(hub, open_page, fragment, why) -> None:
    page = await open_page(hub.url(**fragment))
    await page.wait(LOADED)
    note = await page.wait("() => !document.getElementById('note').hidden && "
                           "document.getElementById('note').textContent")
    assert why in note and note.endswith("showing live, the 10 most recent devices."), note
    view = await page.eval("() => sensorHub.view()")
    assert view["range"] == "live" and {"0", "1", "2"} <= set(await page.eval("() => sensorHub.charted()"))
    assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}"   # the address says what is shown
    await page.wait("() => sensorHub.series().some(s => s.device_id === '1' && s.points.length > 0)")


async def dashboard_calls(hub: Hub, since: float, count: int) -> list[dict[str, Any]]:
    """The query calls of the dashboard principal since ``since``, from the audit log, once ``count`` are there."""
    def calls() -> defer.Deferred[Any]:
        d = hub.admin.call("iot.get_audit", since=since)
        d.addCallback(lambda rows: [r for r in rows if r["authid"] == "dashboard"])
        return d.addCallback(lambda rows: rows if len(rows) >= count else None)
    return await wait_until(calls, WAIT_S, interval=0.2, message=f"{count} calls of the dashboard in the audit log")


@pytest_twisted.ensureDeferred
async def test_each_range_asks_for_readings_or_buckets_of_at_most_1000_points(hub, open_page) -> None:
    page = await open_page(hub.url(sensor="history"))
    await page.wait(LOADED)
    charted = await page.eval("() => sensorHub.charted()")
    for range_, mode, bucket in [("1h", "raw", None), ("24h", "buckets", 120), ("7d", "buckets", 900),
                                 ("30d", "buckets", 3600), ("live", "raw", None)]:
        loads = await page.eval("() => sensorHub.loads")
        since = time.time()
        await page.thread.call(page.page.select_option, "#range", range_)
        await page.wait("(n) => sensorHub.loads > n", loads)
        view = await page.eval("() => sensorHub.view()")
        assert (view["range"], view["mode"], view["bucket"]) == (range_, mode, bucket)
        expected = {}   # the device list comes once per connection, not per view
        if range_ != "live":
            assert view["end"] - view["start"] == {"1h": 3600, "24h": 86400, "7d": 604800, "30d": 2592000}[range_]
            assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}&sensor=history&range={range_}"
            expected["fetch_between_window"] = len(charted)
            if mode == "buckets":
                expected["aggregate"] = len(charted)
        else:
            expected["fetch_last_window"] = len(charted)
        calls = await dashboard_calls(hub, since, sum(expected.values()))
        assert Counter(c["procedure"].removeprefix("iot.") for c in calls) == expected, calls
        for c in calls:
            filters = c["kwargs"]
            if c["procedure"] == "iot.fetch_between_window":     # raw first, one more than a chart shows
                assert c["args"] == [view["start"], view["end"]]
                assert filters == {"device_id": filters["device_id"], "sensor_type": "history", "limit": 1001}
            elif c["procedure"] == "iot.aggregate":
                assert c["args"] == [view["start"] // bucket * bucket, view["end"], bucket]
                assert filters == {"device_id": filters["device_id"], "sensor_type": "history"}
        if range_ != "live":
            series = await page.eval("() => sensorHub.series()")
            assert sorted(s["device_id"] for s in series) == ["0", "1", "2"]
            assert all(0 < len(s["points"]) <= 1000 for s in series)
            await page.wait("() => document.querySelectorAll('#charts figure').length === 1")
        await page.screenshot(f"dashboard-range-{range_}.png")


async def drag(page: Dashboard, x0: float, x1: float) -> None:
    """Drag across the first chart from ``x0`` to ``x1`` (fractions of its plot's width)."""
    def run() -> None:
        box = page.page.locator("#charts figure .u-over").first.bounding_box()
        assert box is not None
        y = box["y"] + box["height"] / 2
        page.page.mouse.move(box["x"] + x0 * box["width"], y)
        page.page.mouse.down()
        page.page.mouse.move(box["x"] + x1 * box["width"], y, steps=8)
        page.page.mouse.up()
    await page.thread.call(run)


@pytest_twisted.ensureDeferred
async def test_drag_zooms_in_with_finer_buckets_and_double_click_goes_back(hub, open_page) -> None:
    page = await open_page(hub.url(sensor="history", range="7d"))
    await page.wait("() => sensorHub.loads > 0 && sensorHub.view().mode === 'buckets'")
    week = await page.eval("() => sensorHub.view()")
    assert week["bucket"] == 900

    loads = await page.eval("() => sensorHub.loads")
    since = time.time()
    await drag(page, 0.4, 0.6)
    await page.wait("(n) => sensorHub.loads > n", loads)
    zoomed = await page.eval("() => sensorHub.view()")
    assert zoomed["range"] == "custom" and zoomed["zoomed"] == 1
    assert week["start"] < zoomed["start"] < zoomed["end"] < week["end"]
    assert 0.15 < (zoomed["end"] - zoomed["start"]) / 604800 < 0.25
    assert zoomed["mode"] == "buckets" and zoomed["bucket"] < week["bucket"]
    calls = await dashboard_calls(hub, since, 6)
    assert {c["args"][2] for c in calls if c["procedure"] == "iot.aggregate"} == {zoomed["bucket"]}
    assert "from=" in await page.eval("() => location.hash")
    await page.screenshot("dashboard-zoomed.png")

    # Zoomed in again, so far that the readings fit: raw readings, then back out one step at a time.
    loads = await page.eval("() => sensorHub.loads")
    await drag(page, 0.45, 0.5)
    await page.wait("(n) => sensorHub.loads > n && sensorHub.view().mode === 'raw'", loads)
    assert (await page.eval("() => sensorHub.view()"))["zoomed"] == 2
    for expected in (zoomed, week):
        loads = await page.eval("() => sensorHub.loads")
        await page.thread.call(page.page.locator("#charts figure .u-over").first.dblclick)
        await page.wait("(n) => sensorHub.loads > n", loads)
        back = await page.eval("() => sensorHub.view()")
        assert (back["start"], back["end"], back["bucket"]) == (expected["start"], expected["end"], expected["bucket"])
    assert await page.eval("() => location.hash") == f"#ticket={hub.ticket}&sensor=history&range=7d"


async def download_csv(page: Dashboard) -> str:
    """Click "download CSV" and read the file the browser saved."""
    def run() -> str:
        with page.page.expect_download() as info:
            page.page.click("#csv")
        return Path(info.value.path()).read_text()
    return await page.thread.call(run)


@pytest_twisted.ensureDeferred
async def test_csv_holds_what_a_query_beside_it_answers(hub, open_page) -> None:
    # Buckets: the week of device 0's history, against iot.aggregate with the page's own window and bucket.
    page = await open_page(hub.url(sensor="history", range="7d", devices="0"))
    await page.wait("() => sensorHub.loads > 0 && sensorHub.view().mode === 'buckets'")
    view = await page.eval("() => sensorHub.view()")
    lines = (await download_csv(page)).splitlines()
    assert lines[0] == "time_iso,time_epoch,device_id,sensor_type,count,min,max,mean,bucket_seconds"
    buckets = await hub.admin.call("iot.aggregate", view["start"] // 900 * 900, view["end"], 900,
                                   device_id="0", sensor_type="history")
    assert len(buckets) > 500
    rows = [line.split(",") for line in lines[1:]]
    assert [(float(r[1]), r[2], r[3], int(r[4]), float(r[5]), float(r[6]), float(r[7]), float(r[8])) for r in rows] \
        == [(b["bucket_start"], "0", "history", b["count"], b["min"], b["max"], b["mean"], 900.0) for b in buckets]
    for r in rows:   # the ISO-8601 time (milliseconds, UTC) is the epoch time
        assert abs(datetime.fromisoformat(r[0]).timestamp() - float(r[1])) < 0.001 and r[0].endswith("Z")

    # Raw readings: an hour of the history, against fetch_between_window over the same window.
    start, end = round(view["end"] - 6 * 3600, 3), round(view["end"] - 5 * 3600, 3)
    loads = await page.eval("() => sensorHub.loads")
    await page.thread.call(page.page.goto, hub.url(sensor="history", devices="0", **{"from": str(start),
                                                                                       "to": str(end)}))
    await page.wait("(n) => sensorHub.loads > n", loads)
    assert (await page.eval("() => sensorHub.view()"))["mode"] == "raw"
    lines = (await download_csv(page)).splitlines()
    assert lines[0] == "time_iso,time_epoch,device_id,sensor_type,value"
    readings = await hub.admin.call("iot.fetch_between_window", start, end, device_id="0", sensor_type="history")
    assert len(readings) >= 100
    assert [(float(t), d, s, float(v)) for _, t, d, s, v in (line.split(",") for line in lines[1:])] \
        == [(r["ts"], "0", "history", r["value"]) for r in readings]


@pytest_twisted.ensureDeferred
async def test_a_past_range_survives_a_router_restart_and_a_refused_query_shows_the_routers_message(
        open_page, tmp_path) -> None:
    """A router of its own, stopped and started again on the same port. Its query callee answers at most 20
    readings, so the live back-fill (the newest 3,000 readings of a device) is refused."""
    settings = stack_settings(tmp_path / "stack", devices=("0",), overrides={"query": {"max_results": 20}})
    router = await threads.deferToThread(RouterProcess(settings).start)
    procs: list[ComponentProcess] = []
    try:
        procs.append(await start_storage(settings))
        procs.append(await start_query(settings))
        procs.append(python_process(settings, "simulator", "devices", "simulate", "--device-ids", "0",
                                    "--rate", "2").start())
        admin = await as_principal(settings, "admin")
        try:
            def stored_a_while() -> defer.Deferred[Any]:
                d = admin.call("iot.list_devices")
                d.addCallback(lambda rows: rows and rows[0]["last_ts"] - rows[0]["first_ts"] > 3 and rows[0])
                return d.addErrback(lambda _: False)

            row = await wait_until(stored_a_while, WAIT_S, message="3 s of device 0's readings stored")
            start = round(row["first_ts"] + 0.5, 3)
            window = await admin.call("iot.fetch_between_window", start, start + 2)
            assert 0 < len(window) <= 20
            try:   # what the page asks for: the newest 1,000 readings per sensor type
                await admin.call("iot.fetch_last_window", 1000 * len(row["sensor_types"]), device_id="0")
                raise AssertionError("the query callee answered more than query.max_results")
            except ApplicationError as err:
                assert err.error == "iot.error.too_many_results"
                refusal = err.args[0]
        finally:
            await admin.close()

        ticket = CredentialStore(settings.paths.secrets_dir).ticket("dashboard")
        page = await open_page(dashboard_url(settings, ticket))
        note = await page.wait("() => document.getElementById('note').textContent")
        assert note == f"query refused: iot.error.too_many_results: {refusal}"
        assert await page.eval("() => document.getElementById('note').className") == "error"

        # A past range of 2 s (at most 20 readings): shown raw, and the error note is gone.
        await page.thread.call(page.page.goto, dashboard_url(settings, ticket, **{"from": str(start),
                                                                                   "to": str(start + 2)}))
        await page.wait("() => sensorHub.loads > 0 && sensorHub.view().range === 'custom'")
        await page.wait("() => document.getElementById('note').hidden")   # on the next redraw
        points = lambda series: sorted((s["sensor_type"], p[0], p[1]) for s in series for p in s["points"])  # noqa: E731
        shown = points(await page.eval("() => sensorHub.series()"))
        assert shown == sorted((r["sensor_type"], r["ts"], r["value"]) for r in window)
        loads, received = await page.eval("() => [sensorHub.loads, sensorHub.received]")

        await threads.deferToThread(router.stop)
        await page.wait("() => sensorHub.state === 'reconnecting'")
        await threads.deferToThread(router.start)          # same settings: the same port
        await page.wait(CONNECTED, timeout=30)
        # loaded again once the query callee has registered again (it may come back after the page)
        await page.wait("(n) => sensorHub.loads > n", loads, timeout=30)
        await page.wait("(n) => sensorHub.received > n + 6", received)   # the live events flow again ...
        assert points(await page.eval("() => sensorHub.series()")) == shown   # ... and the past range stays put
        view = await page.eval("() => sensorHub.view()")
        assert (view["range"], view["start"], view["end"], view["mode"]) == ("custom", start, start + 2, "raw")
        await page.screenshot("dashboard-after-restart.png")
    finally:
        for proc in reversed(procs):
            proc.stop()
        await threads.deferToThread(router.stop)


FLEET = 1000


@pytest_twisted.ensureDeferred
async def test_a_thousand_devices_page_the_table_and_chart_ten(open_page, tmp_path) -> None:
    """A stack of its own with 1,000 simulated devices publishing one reading every 2 s each (500 readings/s).

    Prints the page's redraw times while they publish (draw(): header, table page, every chart's setData)."""
    ids = [f"d{i:04d}" for i in range(FLEET)]
    settings = await threads.deferToThread(stack_settings, tmp_path / "stack", None, None, tuple(ids))
    router = await threads.deferToThread(RouterProcess(settings).start)
    procs: list[ComponentProcess] = []
    try:
        procs.append(await start_storage(settings))
        procs.append(await start_query(settings))
        procs.append(python_process(settings, "simulator", "devices", "simulate", "--device-ids", ",".join(ids),
                                    "--sensor-types", "temperature,humidity", "--rate", "0.25").start())
        admin = await as_principal(settings, "admin")
        try:
            def all_stored() -> defer.Deferred[Any]:
                d = admin.call("iot.list_devices").addCallback(lambda rows: len(rows) == FLEET)
                return d.addErrback(lambda _: False)
            await wait_until(all_stored, 90, interval=0.5, message=f"readings of all {FLEET} devices stored")
        finally:
            await admin.close()

        ticket = CredentialStore(settings.paths.secrets_dir).ticket("dashboard")
        page = await open_page(dashboard_url(settings, ticket))
        await page.wait(LOADED, timeout=30)
        assert await page.eval("() => sensorHub.knownDevices()") == FLEET
        charted = await page.eval("() => sensorHub.charted()")
        assert len(charted) == 10
        seen = [d["last_seen"] for d in await page.eval("() => sensorHub.devices()")]
        assert len(seen) == FLEET and seen == sorted(seen, reverse=True)    # the table: most recent first
        await page.wait("() => sensorHub.series().length === 20")   # 10 devices x 2 sensor types
        note = await page.eval("() => document.getElementById('chart-note').textContent")
        assert note == "10 of 1000 devices charted, 990 hidden: tick them in the table to chart them"
        # one page of rows in the document, not a thousand
        assert await page.eval("() => document.querySelectorAll('#devices tbody tr').length") == 20
        assert await page.eval("() => document.getElementById('page-info').textContent") == "1-20 of 1000"
        await page.thread.call(page.page.click, "#next-page")
        await page.wait("() => document.getElementById('page-info').textContent === '21-40 of 1000'")
        await page.thread.call(page.page.fill, "#search", "d09")
        await page.wait("() => document.getElementById('page-info').textContent === "
                        "'1-20 of 100 (of 1000 devices)'")
        rows = await page.eval("() => [...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device)")
        assert len(rows) == 20 and all(r.startswith("d09") for r in rows)

        # Redraw time while 1,000 devices publish: 40 redraws (at most 4 a second), live range, 20 series.
        draws = await page.eval("() => sensorHub.draws")
        await page.wait("(n) => sensorHub.draws >= n + 40", draws, timeout=60)
        times = sorted((await page.eval("() => sensorHub.drawMs()"))[-40:])
        rate = await page.eval("() => sensorHub.readingsPerSecond()")
        median, p90, worst = times[len(times) // 2], times[int(len(times) * 0.9)], times[-1]
        print(f"\ndashboard redraw with {FLEET} devices publishing ({rate:.0f} readings/s seen by the page): "
              f"median {median:.1f} ms, p90 {p90:.1f} ms, max {worst:.1f} ms over {len(times)} redraws")
        assert rate > 200
        assert p90 < 100, times      # a redraw comes at most every 250 ms: this leaves the page most of the time
        await page.thread.call(page.page.fill, "#search", "")
        await page.screenshot("dashboard-1000-devices.png")
    finally:
        for proc in reversed(procs):
            proc.stop()
        await threads.deferToThread(router.stop)
