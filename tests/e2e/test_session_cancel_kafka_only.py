"""Issue 14: a session-wide cancel reaches the messages Redis has not seen yet.

A Spring frontend produces its requests straight to `chat.requests`; while no ai_consumer has
fetched them (here: none runs yet, as when every consumer is busy or lagging), Redis does not
know them. A `chat.session_cancel` record on `chat.cancels` (what that frontend sends for
"stop all") must still stop them: the cancel listener keeps the session's cancel time, and a
consumer that later claims a message created before it ends it `cancelled` without a token.
A message sent after the cancel runs as usual. The requests carry no `createdAt` (a producer
that does not set it): they were created when they were sent, their record's timestamp.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from redis.asyncio import Redis

from chatpipe.keys import Keys, session_cancel_record_key
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api, ClusterShape
from tests.e2e.records import foreign_producer, of_message, read_responses, terminal
from tests.support.cluster import Cluster, new_session
from tests.support.sse import chunks, dones
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

TOKENS = 5


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {**DEFAULT_ENV, "sim_tokens": TOKENS, "sim_token_delay_ms": 20}


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """2 api + the cancel listener; the ai_consumers are started by the test."""
    return ClusterShape(consumers=0)


def spring_request(session_id: str, message_id: str, text: str) -> bytes:
    """As a Spring KafkaTemplate with Jackson writes a request record that sets no createdAt."""
    return orjson.dumps({"messageId": message_id, "sessionId": session_id, "message": text})


async def test_a_kafka_session_cancel_stops_the_messages_still_only_in_kafka(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    a, b = apis
    session, neighbour = new_session(), new_session()
    before = [f"m-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    other, after = f"m-{uuid.uuid4().hex[:12]}", f"m-{uuid.uuid4().hex[:12]}"
    keys = Keys.from_settings(settings)
    async with foreign_producer(settings) as producer:
        for i, message_id in enumerate(before):
            value = spring_request(session, message_id, f"question {i}")
            await producer.send_and_wait(settings.requests_topic, value, key=session.encode())
        await producer.send_and_wait(
            settings.requests_topic,
            spring_request(neighbour, other, "the neighbour's"),
            key=neighbour.encode(),
        )
        assert not await redis.exists(keys.msg(session, before[0]))  # Redis has not seen them
        stop_all = orjson.dumps({"type": "chat.session_cancel", "sessionId": session})
        await producer.send_and_wait(
            settings.cancels_topic, stop_all, key=session_cancel_record_key(session).encode()
        )

        async def mirrored() -> bool | None:
            return True if await redis.exists(keys.session_cancelled(session)) else None

        await apoll("the listener to mirror the session cancel", mirrored, within=15)
        await producer.send_and_wait(
            settings.requests_topic,
            spring_request(session, after, "sent after the stop"),
            key=session.encode(),
        )
    for i in range(1, 4):
        cluster.spawn("ai_consumer", f"ai-{i}", member=True)
    await asyncio.to_thread(cluster.wait_ready, 90)

    async def answer(message_id: str) -> tuple[str, int]:
        async with b.stream(message_id, open_timeout=30) as stream:
            events = await stream.until_done(within=30)
        return str(dones(events)[-1].json()["status"]), len(chunks(events))

    assert [await answer(m) for m in before] == [("cancelled", 0)] * 3
    assert await answer(after) == ("completed", TOKENS)
    assert await answer(other) == ("completed", TOKENS)  # another session: untouched
    seen = await read_responses(settings, {session}, lambda evs: len(terminal(evs)) >= 4)
    for message_id in before:  # never started: the cancel is their only event
        assert [e["type"] for e in of_message(seen, message_id)] == ["chat.cancelled"]
    shown = await a.client.get(f"/api/sessions/{session}/messages")
    assert [t["status"] for t in shown.json()["messages"]] == [
        "cancelled",
        "cancelled",
        "cancelled",
        "completed",
    ]
