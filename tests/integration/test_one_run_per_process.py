"""A message runs at most once in one ai_consumer process, whichever path brings it there.

A message handed over at shutdown (its lease released, its offset left uncommitted) reaches
the next owner twice, at about the same time: its takeover scan finds the lapsed lease, and
the partition's redelivered record arrives. Both land in `Handler.handle` of one process. The
second must not claim the message again (CLAIM lets an instance re-take its own lease): a
client then saw two `restart` events and the first run fenced mid-answer (CI, stop 21,
tests/e2e/faults/test_consumer_shutdown.py). Real Redis and Kafka; the simulated model.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from ai_consumer.handler import Handler
from chatpipe.entries import event_of
from chatpipe.schemas import ChatRequest
from chatpipe.settings import Settings
from chatpipe.state import State
from tests.conftest import SettingsFactory

TOKENS = 20


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(sim_tokens=TOKENS, sim_token_delay_ms=10, lease_ms=3000)


async def handed_over(state: State, req: ChatRequest) -> None:
    """`req` as a consumer stopped at shutdown leaves it: claimed by that consumer (now gone),
    still `streaming`, its lease released."""
    claim = await state.claim(
        req.message_id,
        req.session_id,
        req.user_id,
        "gone-1",
        "2026-12-05T00:00:00Z",
        req.to_json(),
        "2026-12-05T00:00:00Z",
    )
    assert claim.outcome == "start"
    await state.release_leases([(req.session_id, req.message_id)])


@pytest.mark.parametrize("takeover_first", [True, False], ids=["takeover-first", "record-first"])
async def test_a_takeover_and_the_redelivered_record_run_the_message_once(
    handler: Handler, redis: Redis, takeover_first: bool
) -> None:
    req = ChatRequest(message_id="m-1", session_id="s-1", message="hi")
    await handed_over(handler.state, req)

    paths = [handler.handle(req, takeover=True), handler.handle(req)]
    if not takeover_first:
        paths.reverse()
    async with asyncio.timeout(30):
        outcomes = await asyncio.gather(*paths)

    assert sorted(outcomes) == ["completed", "skipped"]
    entries = await redis.xrange(handler.state.keys.stream(req.session_id, req.message_id))
    events = [event_of(fields).decode() for _, fields in entries]
    assert events.count("restart") == 1, events
    assert events.count("chunk") == TOKENS, events
    assert events[-1] == "done", events
