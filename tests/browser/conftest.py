"""Fixtures of the dashboard tests: one headless Chromium per module, pages closed after each test."""

from __future__ import annotations

import pytest_twisted
from playwright.sync_api import sync_playwright

from tests.browser.pages import CHROMIUM, CHROMIUM_ARGS, BrowserThread, Chromium, Dashboard


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

