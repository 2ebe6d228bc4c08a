"""End to end: an api and an ai_consumer process with LLM_PROVIDER=openai, pointed at the fake
model server running in this test's loop, over the real Kafka and Redis.

A user's Cancel click (POST /api/cancel) must reach the model server as a closed HTTP stream
(that is what stops a real GPU), and an upstream failure must end the user's stream with a
`done` event that says what went wrong.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from chatpipe.settings import Settings
from tests.providers.procs import Proc, start_api, start_consumer, stopping
from tests.providers.upstream import ERROR_MESSAGE, FakeOpenAI, serve
from tests.support.sse import SSEEvent, sse_events

pytestmark = pytest.mark.e2e

CANCEL_WITHIN = 1.0  # POST /api/cancel sent -> the model server sees the disconnect, seconds


@dataclass
class Stack:
    upstream: FakeOpenAI
    api: Proc
    consumer: Proc
    http: httpx.AsyncClient


@pytest.fixture
async def stack(topics: Settings, redis: Redis, tmp_path: Path) -> AsyncIterator[Stack]:
    async with serve(FakeOpenAI()) as upstream:
        consumer = await start_consumer(
            topics,
            tmp_path,
            "ai-1",
            llm_provider="openai",
            llm_base_url=f"{upstream.url}/v1",
            llm_model="fake-model",
            llm_api_key="sk-e2e",
            llm_timeout_s=1.0,
        )
        async with stopping(consumer):
            api = await start_api(topics, tmp_path, "api-1")
            async with stopping(api), httpx.AsyncClient(base_url=api.url, timeout=10) as http:
                yield Stack(upstream, api, consumer, http)


async def post_chat(stack: Stack, message: str) -> tuple[str, str]:
    session, message_id = f"s-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    answer = await stack.http.post(
        "/api/chat", json={"session_id": session, "message_id": message_id, "message": message}
    )
    assert answer.status_code == 202, answer.text
    return session, message_id


async def until_done(stream: AsyncIterator[SSEEvent], within: float = 15.0) -> list[SSEEvent]:
    out: list[SSEEvent] = []
    async with asyncio.timeout(within):
        async for event in stream:
            out.append(event)
            if event.event == "done":
                break
    return out


async def test_a_cancel_click_closes_the_model_servers_stream(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    session, message_id = await post_chat(stack, "hold:3")
    call = await stack.upstream.next_call(within=30)
    assert call.headers["authorization"] == "Bearer sk-e2e"
    assert call.headers["x-request-id"] == message_id

    async with stack.http.stream("GET", f"/api/chat/{message_id}/stream") as response:
        assert response.status_code == 200
        events = sse_events(response)
        async with asyncio.timeout(15):
            seen = [await anext(events) for _ in range(3)]
        assert [e.json()["delta"] for e in seen] == ["t0 ", "t1 ", "t2 "]
        assert not call.disconnected.is_set()  # the model is still "generating"

        sent = loop.time()
        cancel = await stack.http.post(
            "/api/cancel", json={"session_id": session, "message_id": message_id}
        )
        assert cancel.json()["status"] == "cancelled", cancel.text
        await asyncio.wait_for(call.disconnected.wait(), 10)
        assert call.disconnected_at is not None
        took = call.disconnected_at - sent
        print(f"cancel -> upstream disconnect: {took * 1000:.1f} ms")
        assert took < CANCEL_WITHIN

        rest = await until_done(events)
    assert rest[-1].event == "done"
    assert rest[-1].json() == {"status": "cancelled", "reason": "cancelled by user"}
    assert len(stack.upstream.calls) == 1


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("status:500", f"upstream returned 500: {ERROR_MESSAGE}"),
        ("stall", "upstream timed out after 1s"),
    ],
    ids=["500", "stall"],
)
async def test_an_upstream_failure_ends_the_stream_with_its_reason(
    stack: Stack, message: str, reason: str
) -> None:
    _, message_id = await post_chat(stack, message)
    async with stack.http.stream("GET", f"/api/chat/{message_id}/stream") as response:
        assert response.status_code == 200
        events = await until_done(sse_events(response))
    assert [e.event for e in events] == ["done"]
    assert events[-1].json() == {"status": "failed", "reason": reason}
    failed = stack.consumer.find(lambda line: line.get("message_id") == message_id)
    assert any(line.get("msg") == f"upstream failed: {reason}" for line in failed), failed
