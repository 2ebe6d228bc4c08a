"""The sink's tick (SINK_TICK_MS) batches the writes of many streams into one Redis call; it
must not set the pace of a stream whose model is faster than the tick. Each chunk waits for
its write's answer (the answer carries the cancel flag), so a sink that waited out the tick
before every call held a stream to one token per tick: 200 tokens/s at 5 ms, whatever the
model's speed (docs/benchmarks.md). What a user relies on: a fast model's answer streams at
the model's speed. Real Kafka and Redis, the simulated model.
"""

from __future__ import annotations

import asyncio

import pytest

from ai_consumer.handler import Handler
from chatpipe.schemas import ChatRequest
from chatpipe.settings import Settings
from tests.conftest import SettingsFactory

TOKENS = 12
TICK_MS = 2_000  # one tick per token would take TOKENS x 2 s


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        sim_tokens=TOKENS,
        sim_token_delay_ms=0,
        sim_first_token_delay_ms=0,
        sink_tick_ms=TICK_MS,
    )


async def test_a_model_faster_than_the_tick_is_not_held_to_one_token_per_tick(
    handler: Handler,
) -> None:
    req = ChatRequest(message_id="m-fast", session_id="s-fast", message="hi")
    # a few ticks at most: far below the TOKENS ticks a per-tick pace needs
    async with asyncio.timeout(3 * TICK_MS / 1000):
        assert await handler.handle(req) == "completed"
    answer = await handler.state.answer_so_far(req.session_id, req.message_id)
    assert len(answer.split()) == TOKENS
