"""The demo page at `/` in headless Chromium: send, watch the answer grow, cancel once.

The page talks to its own origin; a route sends its cancel to the OTHER api process, as a
load balancer without stickiness would.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import Cluster
from tests.support.sse import SSEStream, chunks, dones

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


ANSWER_MS = 30_000  # a 60-token answer takes 6 s (tests/e2e/conftest.py DEFAULT_ENV)


async def send(page: Page, text: str) -> None:
    await page.locator("#message").fill(text)
    await page.locator("#send").click()


async def test_a_conversation_survives_a_reload_and_stop_all_stops_it_from_another_instance(
    browser: Browser, cluster: Cluster, tmp_path: Path
) -> None:
    """Issue 14: three turns, a reload shows them again (from the server), then Stop all with
    one answer streaming and one queued behind it, sent to the other api; the page shows who
    served, generated and stopped each answer, and the click-to-stop time it measured."""
    home, other = cluster.urls[0], cluster.urls[1]
    page: Page = await browser.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    async def to_other_instance(route: Route) -> None:
        path = route.request.url.split("/", 3)[3]
        await route.fulfill(response=await route.fetch(url=f"{other}/{path}"))

    await page.route("**/api/sessions/*/cancel", to_other_instance)
    await page.goto(f"{home}/")
    turns = page.locator(".turn")
    for i, text in enumerate(["what is Kafka?", "and Redis?", "and why?"]):
        await send(page, text)
        await expect(turns.nth(i)).to_have_attribute("data-status", "completed", timeout=ANSWER_MS)
    answers = [await turns.nth(i).locator(".a").inner_text() for i in range(3)]
    assert all(len(a.split()) == 60 for a in answers), answers

    await page.reload()
    await expect(page.locator("body")).to_have_attribute("data-restored", "3")
    await expect(turns).to_have_count(3)
    assert [await turns.nth(i).locator(".a").inner_text() for i in range(3)] == answers
    for i, text in enumerate(["what is Kafka?", "and Redis?", "and why?"]):
        await expect(turns.nth(i).locator(".q")).to_have_text(f"You: {text}")
        await expect(turns.nth(i)).to_have_attribute("data-status", "completed")
    await expect(turns.nth(0).locator(".info")).to_contain_text("generated by")
    await expect(turns.nth(0).locator(".info")).to_contain_text("streamed by")

    await send(page, "tell me more")  # streams
    await expect(turns.nth(3).locator(".a")).not_to_be_empty()
    await send(page, "and then?")  # queued behind it (if_busy: queue behind)
    await expect(turns.nth(4).locator(".status")).to_have_text("streaming")
    await page.locator("#stop-all").click()
    for i in (3, 4):
        await expect(turns.nth(i)).to_have_attribute("data-status", "cancelled", timeout=ANSWER_MS)
    assert await turns.nth(4).locator(".a").inner_text() == ""  # never started
    assert 0 < len((await turns.nth(3).locator(".a").inner_text()).split()) < 60
    info = turns.nth(3).locator(".info")
    await expect(info).to_contain_text(f"cancel taken by {cluster.api_procs[1].instance_id}")
    await expect(info).to_contain_text("ms after the click")
    stop_ms = int(await turns.nth(3).get_attribute("data-stop-ms") or "-1")
    assert 0 <= stop_ms < 5_000, stop_ms
    await page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    assert errors == [], errors
    await page.close()
