"""Issue 12, item 1: nothing one SSE client sends can stall another client of the same api.

A crafted `Last-Event-ID` (a number over 64 bits, a negative sequence) used to become the SSE
hub's cursor for that message; Redis then rejected the hub's one shared XREAD on every retry
and every other client of the process got nothing until the crafted one left, while /ready
said 200. Now an id that is not a Redis stream id (`<ms>-<seq>`, each an unsigned 64-bit
integer, or a plain `<ms>`) is answered 400 with the reason, and a read that fails for one
watched stream ends only that stream's clients (tests/integration/test_hub_isolation.py).

The module's cluster: 1 api (the crafted and the honest client share its hub), 1 ai_consumer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.e2e.conftest import DEFAULT_ENV, ClusterShape
from tests.support.cluster import Cluster, new_session
from tests.support.sse import SSEStream, chunks

pytestmark = pytest.mark.e2e

TOKENS = 200  # a 10 s answer: the honest client is still streaming while the crafted ones come
CRAFTED = [
    "99999999999999999999-0",
    "5--1",
    "1-99999999999999999999",
    "18446744073709551616-1",
    "-1",
    "1-2-3",
    "0x10-0",
    "$",
]


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {**DEFAULT_ENV, "sim_tokens": TOKENS, "sim_token_delay_ms": 50}


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    return ClusterShape(apis=1, consumers=1, listener=False)


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=cluster.api_procs[0].url, timeout=httpx.Timeout(10.0, read=30.0)
    ) as c:
        yield c


async def chat(client: httpx.AsyncClient) -> str:
    response = await client.post("/api/chat", json={"session_id": new_session(), "message": "hi"})
    assert response.status_code == 202, response.text
    message_id: str = response.json()["message_id"]
    return message_id


async def test_a_crafted_last_event_id_is_refused_and_stalls_no_other_client(
    client: httpx.AsyncClient,
) -> None:
    honest_id, crafted_id = await chat(client), await chat(client)
    async with SSEStream(client, f"/api/chat/{honest_id}/stream") as honest:
        honest.record()
        await honest.wait_for(lambda evs: len(chunks(evs)) >= 1, within=15, what="a first chunk")
        for crafted in CRAFTED:
            async with contextlib.AsyncExitStack() as stack:
                response = await stack.enter_async_context(
                    client.stream(
                        "GET",
                        f"/api/chat/{crafted_id}/stream",
                        headers={"Last-Event-ID": crafted, "Accept": "text/event-stream"},
                    )
                )
                # the crafted stream is held open (as the attacker would) while we watch
                seen = len(chunks(honest.events))
                await honest.wait_for(
                    lambda evs, n=seen: len(chunks(evs)) >= n + 3,  # type: ignore[misc]
                    within=5,
                    what=f"3 more chunks while Last-Event-ID {crafted!r} is open",
                )
                assert response.status_code == 400, (crafted, response.status_code)
                detail = (await response.aread()).decode()
                assert "is not a stream id" in detail, detail
                assert crafted in detail, detail
        ready = await client.get("/ready")
        assert ready.status_code == 200, ready.text


async def test_valid_last_event_id_forms_resume_after_that_id(client: httpx.AsyncClient) -> None:
    """`<ms>-<seq>` and the plain `<ms>` (Redis reads it as `<ms>-0`) resume after that id; the
    largest id Redis allows is valid too (nothing after it: the stream just waits)."""
    message_id = await chat(client)
    url = f"/api/chat/{message_id}/stream"
    async with SSEStream(client, url) as first:
        events = await first.take(3, within=15)
    async with SSEStream(client, url, last_event_id=events[1].id) as resumed:
        assert (await resumed.take(1, within=10))[0].id == events[2].id
    assert events[0].id is not None
    ms = events[0].id.split("-")[0]
    async with SSEStream(client, url, last_event_id=str(int(ms) - 1)) as plain:
        assert (await plain.take(1, within=10))[0].id == events[0].id
    top = f"{2**64 - 1}-{2**64 - 1}"
    async with SSEStream(client, url, last_event_id=top) as at_the_end:
        assert at_the_end.status_code == 200
