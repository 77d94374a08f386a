"""The dashboard (router/web/, served by the router) in headless Chromium, against a real router, storage, query
callee and simulated devices on the session's router: live and past ranges, zoom, CSV, the URL fragment, tickets.

Which queries the page makes is read from the query service's audit log.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.wamp.types import PublishOptions
from twisted.internet import defer

from components.core.settings import Settings
from components.ops.credentials import CredentialStore
from tests.browser.pages import HAS_POINT, LAST_VALUE, LOADED, WAIT_S, Dashboard, dashboard_url
from tests.support.harness import (
    ComponentProcess,
    Session,
    as_device,
    as_principal,
    derive_settings,
    python_process,
    start_query,
    start_storage,
    wait_until,
)

pytestmark = pytest.mark.browser

ACK = PublishOptions(acknowledge=True)


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
        try:
            for session in sessions:
                await session.close()
        finally:   # the processes stop even when a session is gone already: they would serve the next tests
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
    # the table shows each device's latest reading though none of this sensor type arrives live
    latest = await hub.admin.call("iot.get_latest", device_id="0", sensor_type="history")
    await page.wait("""(text) => [...document.querySelectorAll('#devices tr[data-device="0"] .value')]
                                 .some(e => e.textContent === text)""", f"history {latest[0]['value']:.2f}")
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


