"""COALESCE_MS (issue 16, contract 1.8.0, HTTP 1.4.0): a stream's tokens within the window join
one chunk: one Redis entry (one SSE event) and one chat.responses record, `seq` of its first
token, `count` tokens, their deltas joined. What a reader relies on: the answer is whole and
in order, `seq` + `count` covers every token once on SSE and on Kafka, `usage.chunks` still
counts tokens, a cancel still ends the answer with nothing after its terminal, and a chunk is
written once its window has passed even while the model is silent.
Real Kafka and Redis, the simulated model.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from ai_consumer.handler import Handler
from chatpipe.entries import data_of, event_of, seq_of
from chatpipe.schemas import ChatChunk, ChatRequest
from chatpipe.settings import Settings
from tests.conftest import SettingsFactory
from tests.e2e.records import of_message, read_responses, terminal
from tests.support.wait import apoll

TOKENS = 30


@pytest.fixture(params=[{}, {"responses_chunk_window_ms": 50}], ids=["no-window", "window-50ms"])
def settings(make_settings: SettingsFactory, request: pytest.FixtureRequest) -> Settings:
    defaults: dict[str, Any] = {
        "sim_tokens": TOKENS,
        "sim_token_delay_ms": 10,
        "sim_first_token_delay_ms": 0,
        "coalesce_ms": 30,
    }
    return make_settings(**{**defaults, **request.param})


async def sse_events(redis: Redis, handler: Handler, req: ChatRequest) -> list[tuple[bytes, Any]]:
    entries = await redis.xrange(handler.state.keys.stream(req.session_id, req.message_id))
    return [(event_of(f), orjson.loads(data_of(f))) for _, f in entries]


def covers_once(chunks: list[dict[str, Any]], first: int = 1) -> int:
    """Asserts each chunk starts where the one before it ended; returns the tokens covered."""
    counts = [c.get("count", 1) for c in chunks]
    assert [c["seq"] for c in chunks] == [first + sum(counts[:i]) for i in range(len(chunks))]
    assert all(n >= 1 for n in counts)
    return sum(counts)


async def test_tokens_within_the_window_are_one_chunk_on_sse_and_on_kafka(
    handler: Handler, redis: Redis, settings: Settings
) -> None:
    req = ChatRequest(message_id="m-1", session_id="s-1", message="hi")
    async with asyncio.timeout(30):
        assert await handler.handle(req) == "completed"

    sse = await sse_events(redis, handler, req)
    entries = await redis.xrange(handler.state.keys.stream(req.session_id, req.message_id))
    assert [event for event, _ in sse[:1] + sse[-1:]] == [b"started", b"done"]
    chunks = [data for event, data in sse[1:-1]]
    assert {event for event, _ in sse[1:-1]} == {b"chunk"}
    assert seq_of(entries[-1][1]) == TOKENS + 1
    assert covers_once(chunks) == TOKENS
    assert len(chunks) < TOKENS / 2, [c.get("count") for c in chunks]  # 10 ms tokens, 30 ms
    answer = "".join(c["delta"] for c in chunks)
    assert answer == await handler.state.answer_so_far(req.session_id, req.message_id)
    assert len(answer.split()) == TOKENS

    events = of_message(
        await read_responses(settings, [req.session_id], lambda evs: bool(terminal(evs))),
        req.message_id,
    )
    assert [e["type"] for e in events[:1] + events[-1:]] == ["chat.started", "chat.completed"]
    records = [ChatChunk.model_validate(e).model_dump(exclude_none=True) for e in events[1:-1]]
    assert covers_once(records) == TOKENS
    assert "".join(r["delta"] for r in records) == answer
    assert events[-1]["seq"] == TOKENS + 1
    assert events[-1]["usage"]["chunks"] == TOKENS
    if not settings.responses_chunk_window_ms:  # one record per SSE chunk
        assert [r["seq"] for r in records] == [c["seq"] for c in chunks]


async def test_a_cancel_ends_a_coalesced_answer_with_nothing_after_its_terminal(
    handler: Handler, redis: Redis
) -> None:
    req = ChatRequest(message_id="m-2", session_id="s-2", message="hi")
    run = asyncio.create_task(handler.handle(req))
    stream_key = handler.state.keys.stream(req.session_id, req.message_id)

    async def two_chunks() -> bool | None:  # started and two chunks
        return True if len(await redis.xrange(stream_key)) >= 3 else None

    async with asyncio.timeout(30):
        await apoll("two chunks in the stream", two_chunks, within=20, interval=0.01)
        assert await handler.state.cancel(req.session_id, req.message_id) == "cancelled"
        assert await run == "cancelled"
    sse = await sse_events(redis, handler, req)
    entries = await redis.xrange(stream_key)
    assert sse[-1][0] == b"done"
    assert [event for event, _ in sse].count(b"done") == 1  # nothing after it
    chunks = [data for event, data in sse if event == b"chunk"]
    covered = covers_once(chunks)
    assert seq_of(entries[-1][1]) == covered + 1
    assert covered < TOKENS
    events = of_message(
        await read_responses(handler.settings, [req.session_id], lambda evs: bool(terminal(evs))),
        req.message_id,
    )
    assert events[-1]["type"] == "chat.cancelled"
    assert events[-1]["seq"] == covered + 1  # right after the last token written
    assert events[-1]["usage"]["chunks"] == covered


@pytest.mark.parametrize(
    "settings", [{"sim_tokens": 4, "sim_token_delay_ms": 700, "coalesce_ms": 50}], indirect=True
)
async def test_a_held_token_is_written_when_its_window_passes_while_the_model_is_silent(
    handler: Handler, redis: Redis
) -> None:
    """Tokens 700 ms apart and a 50 ms window: each token is its own chunk, in Redis long
    before the next token comes (the Redis entry id is the server's clock at the XADD)."""
    req = ChatRequest(message_id="m-3", session_id="s-3", message="hi")
    async with asyncio.timeout(30):
        assert await handler.handle(req) == "completed"
    entries = await redis.xrange(handler.state.keys.stream(req.session_id, req.message_id))
    chunks = [(i, orjson.loads(data_of(f))) for i, f in entries if event_of(f) == b"chunk"]
    assert [c["seq"] for _, c in chunks] == [1, 2, 3, 4]
    assert all("count" not in c for _, c in chunks)
    for entry_id, c in chunks:
        written_ms = int(entry_id.split(b"-")[0])
        produced_ms = _ms(c["at"])
        assert written_ms - produced_ms < 400, (entry_id, c)  # not at the next token (700 ms)


def _ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)
