"""The demo page at `/` in headless Chromium: send, watch the answer grow, cancel once.

The page talks to its own origin; a route sends its cancel to the OTHER api process, as a
load balancer without stickiness would.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.sse import SSEStream, chunks, dones

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

from playwright.async_api import Browser, Page, Route, async_playwright, expect  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def test_demo_page_sends_streams_and_cancels(browser: Browser, cluster: Cluster) -> None:
    home, other = cluster.urls[0], cluster.urls[1]
    page: Page = await browser.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    cancels: list[int] = []
    cancel_answered = asyncio.Event()

    async def to_other_instance(route: Route) -> None:
        response = await route.fetch(url=f"{other}/api/cancel")
        cancels.append(response.status)
        await route.fulfill(response=response)
        cancel_answered.set()

    await page.route("**/api/cancel", to_other_instance)
    await page.goto(f"{home}/")
    await expect(page.locator("#cancel")).to_be_disabled()

    await page.locator("#message").fill("Tell me about Kafka")
    await page.locator("#send").click()

    turn = page.locator(".turn").first
    answer = turn.locator(".a")
    await expect(turn.locator(".status")).to_have_text("streaming")
    await expect(answer).not_to_be_empty()
    first = len(await answer.inner_text())
    # the answer grows while it streams
    await page.wait_for_function(
        "n => document.querySelector('.turn .a').textContent.length > n", arg=first
    )
    await expect(page.locator("#cancel")).to_be_enabled()
    await page.locator("#cancel").click()

    await expect(turn).to_have_attribute("data-status", "cancelled")
    status = turn.locator(".status")
    await expect(status).to_have_attribute("data-status", "cancelled")
    await expect(status).to_contain_text("cancelled")
    # the server's stop can reach the page (the SSE `done`) before this route has its own
    # answer: wait for the route, not only for the page
    async with asyncio.timeout(10):
        await cancel_answered.wait()
    assert cancels == [200], f"the cancel went out {len(cancels)} times: {cancels}"
    # stopped: far short of the 60-token answer, and it does not grow any more
    stopped = await answer.inner_text()
    assert 0 < len(stopped.split()) < 60
    await expect(page.locator("#send")).to_be_enabled()
    await expect(page.locator("#cancel")).to_be_disabled()
    assert errors == [], errors
    # what the page shows is what the servers recorded: replay it from the other instance
    message_id = await turn.get_attribute("data-message-id")
    assert message_id
    await page.close()
    async with (
        httpx.AsyncClient(base_url=other, timeout=10) as client,
        SSEStream(client, f"/api/chat/{message_id}/stream") as stream,
    ):
        events = await stream.until_done(within=10)
    assert dones(events)[0].json()["status"] == "cancelled"
    assert "".join(e.json()["delta"] for e in chunks(events)) == stopped
