"""RESPONSES_CHUNK_WINDOW_MS (issue 16, contract 1.7.0): a message's chunk records within the
window leave chat.responses as one record: its first chunk's `seq`, `count` chunks, their
deltas joined. Read back as a Spring consumer would (every record of the session, in order):
the answer is whole, `seq` + `count` covers every chunk once, `started` comes first and the
terminal last, and there are fewer records than chunks. SSE (Redis) keeps one entry per chunk.
Real Kafka and Redis, the simulated model: 30 tokens 10 ms apart, a 50 ms window.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from ai_consumer.handler import Handler
from chatpipe.entries import event_of
from chatpipe.schemas import ChatChunk, ChatRequest
from chatpipe.settings import Settings
from tests.conftest import SettingsFactory
from tests.e2e.records import of_message, read_responses, terminal

TOKENS = 30


@pytest.fixture(params=[50, 0], ids=["window-50ms", "no-window"])
def settings(make_settings: SettingsFactory, request: pytest.FixtureRequest) -> Settings:
    return make_settings(
        sim_tokens=TOKENS,
        sim_token_delay_ms=10,
        sim_first_token_delay_ms=0,
        responses_chunk_window_ms=request.param,
    )


async def test_chunk_records_within_the_window_leave_as_one(
    handler: Handler, redis: Redis, settings: Settings
) -> None:
    req = ChatRequest(message_id="m-1", session_id="s-1", message="hi")
    async with asyncio.timeout(30):
        assert await handler.handle(req) == "completed"

    events = of_message(
        await read_responses(settings, [req.session_id], lambda evs: bool(terminal(evs))),
        req.message_id,
    )
    types = [e["type"] for e in events]
    assert types[0] == "chat.started", types
    assert types[-1] == "chat.completed", types
    assert set(types[1:-1]) == {"chat.chunk"}, types
    chunks = [ChatChunk.model_validate(e) for e in events[1:-1]]
    counts = [c.count or 1 for c in chunks]
    # every chunk once, in order: each record starts where the one before it ended
    assert [c.seq for c in chunks] == [1 + sum(counts[:i]) for i in range(len(chunks))]
    assert sum(counts) == TOKENS == events[-1]["usage"]["chunks"]
    assert events[-1]["seq"] == TOKENS + 1
    answer = "".join(c.delta for c in chunks)
    assert answer == await handler.state.answer_so_far(req.session_id, req.message_id)
    if settings.responses_chunk_window_ms:
        assert len(chunks) < TOKENS / 2, counts  # 10 ms tokens, 50 ms windows
    else:
        assert counts == [1] * TOKENS

    # SSE readers replay one Redis entry per chunk either way
    entries = await redis.xrange(handler.state.keys.stream(req.session_id, req.message_id))
    assert [event_of(f) for _, f in entries].count(b"chunk") == TOKENS
