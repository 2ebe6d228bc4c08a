"""Answers end to end: Kafka-only frontends, SSE from any instance, resume, order, fan-out.

The module's cluster runs the simulator at 100 ms per token with a 300 ms time to first token;
requests shorten their answers with options.max_tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import datetime

import pytest

from chatpipe.settings import Settings
from tests.e2e.conftest import Api
from tests.e2e.records import Event, foreign_producer, of_message, read_responses, terminal
from tests.support.cluster import Cluster, new_session
from tests.support.sse import SSEEvent, SSEStream, chunks, dones

pytestmark = pytest.mark.e2e


def wire(events: list[SSEEvent]) -> list[tuple[str | None, str, str]]:
    return [(e.id, e.event, e.data) for e in events]


def at(event: Event) -> datetime:
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00"))


async def test_request_published_by_a_spring_frontend_is_answered(
    apis: tuple[Api, Api], settings: Settings
) -> None:
    a, b = apis
    session, message_id = new_session(), f"spring-{uuid.uuid4().hex[:12]}"
    # what Spring's KafkaTemplate with JsonSerializer sends: camelCase, Jackson's numeric
    # timestamp, a type header, key = session id
    value = (
        f'{{"messageId":"{message_id}","sessionId":"{session}","userId":"u-42",'
        '"message":"Hello from Spring","createdAt":1764320000.123456789,'
        '"options":{"maxTokens":8},"locale":"en-GB"}'
    ).encode()
    async with foreign_producer(settings) as producer:
        await producer.send_and_wait(
            settings.requests_topic,
            value,
            key=session.encode(),
            headers=[("__TypeId__", b"com.example.chat.ChatRequest")],
        )

    # readable at once from either instance (the api waits a moment for the consumer to see it)
    async with a.stream(message_id) as from_a, b.stream(message_id) as from_b:
        events_a, events_b = await asyncio.gather(
            from_a.until_done(within=15), from_b.until_done(within=15)
        )

    assert wire(events_a) == wire(events_b), "the two instances streamed different events"
    assert [e.seq for e in chunks(events_a)] == list(range(1, 9))
    assert dones(events_a)[0].json()["status"] == "completed"
    assert "".join(e.json()["delta"] for e in chunks(events_a)).strip()
    # and on chat.responses, where the Spring side reads it: snake_case, seq 0.. in order
    seen = await read_responses(settings, {session}, lambda evs: bool(terminal(evs, message_id)))
    mine = of_message(seen, message_id)
    assert [e["type"] for e in mine] == ["chat.started"] + ["chat.chunk"] * 8 + ["chat.completed"]
    assert [e["seq"] for e in mine] == list(range(10))
    for e in mine:
        assert e["schema_version"] == 1
        assert e["session_id"] == session
        assert e["_headers"]["event-type"] == e["type"]


async def test_post_chat_stream_answers_with_the_stream_itself(apis: tuple[Api, Api]) -> None:
    a, b = apis
    session = new_session()
    body = {"session_id": session, "message": "stream it", "options": {"max_tokens": 3}}
    async with SSEStream(a.client, "/api/chat/stream", method="POST", body=body) as stream:
        events = await stream.until_done(within=10)
        message_id = stream.headers["x-message-id"]
    assert [e.event for e in events] == ["chunk", "chunk", "chunk", "done"]
    assert dones(events)[0].json()["status"] == "completed"
    assert all(e.id for e in events)
    # the same answer under the same id from the other instance
    async with b.stream(message_id) as replay:
        assert wire(await replay.until_done(within=10)) == wire(events)


async def test_sse_resumes_on_the_other_api_with_last_event_id(apis: tuple[Api, Api]) -> None:
    a, b = apis
    session = new_session()
    message_id = (await a.chat(session, max_tokens=20))["message_id"]  # ~2.3 s
    async with b.stream(message_id) as watcher:  # another tab, keeps the hub of b ahead
        watcher.record()
        async with a.stream(message_id) as first:
            before = await first.take(5, within=10)
        # the connection is gone; the answer goes on
        await watcher.wait_for(lambda evs: len(chunks(evs)) >= 9, within=10, what="9 chunks")
        async with b.stream(message_id, last_event_id=before[-1].id) as resumed:
            after = await resumed.until_done(within=15)
        await watcher.wait_done(within=10)

    assert [e.event for e in before] == ["chunk"] * 5
    assert after[0].seq == before[-1].seq + 1, "the resumed stream did not start at the next event"
    both = before + after
    assert [e.seq for e in chunks(both)] == list(range(1, 21)), "events missing or repeated"
    ids = [e.id for e in both]
    assert len(set(ids)) == len(ids)
    assert [e.event for e in both][-1] == "done"
    assert dones(both)[0].json()["status"] == "completed"
    assert wire(both) == wire(watcher.events), "the resumed view differs from an unbroken one"


async def test_messages_of_one_session_are_answered_in_order(
    apis: tuple[Api, Api], settings: Settings
) -> None:
    session = new_session()
    message_ids = []
    for i in range(3):  # back to back, alternating instances
        accepted = await apis[i % 2].chat(session, f"question number {i}", max_tokens=4)
        message_ids.append(accepted["message_id"])

    seen = await read_responses(
        settings,
        {session},
        lambda evs: all(terminal(evs, m) for m in message_ids),
        within=20,
    )

    for m in message_ids:
        assert [e["type"] for e in terminal(seen, m)] == ["chat.completed"]
    for first, second in itertools.pairwise(message_ids):
        first_end = max(at(e) for e in of_message(seen, first))
        second_start = min(at(e) for e in of_message(seen, second))
        assert second_start >= first_end, f"{second} started before {first} ended"
    # in the topic too: all of message 1, then all of message 2, then all of message 3
    order = [e["message_id"] for e in seen]
    assert order == sorted(order, key=message_ids.index)
    for i, m in enumerate(message_ids):  # and the SSE of each, from the other instance
        async with apis[(i + 1) % 2].stream(m) as stream:
            events = await stream.until_done(within=10)
        assert dones(events)[0].json()["status"] == "completed"
        assert len(chunks(events)) == 4


async def test_fifty_sessions_at_once_complete_on_all_consumers(
    apis: tuple[Api, Api], settings: Settings, cluster: Cluster
) -> None:
    sessions = [new_session() for _ in range(50)]
    accepted = await asyncio.gather(
        *(apis[i % 2].chat(s, f"hello {i}", max_tokens=5) for i, s in enumerate(sessions))
    )
    message_ids = [r["message_id"] for r in accepted]

    async def answer(i: int, message_id: str) -> list[SSEEvent]:
        async with apis[(i + 1) % 2].stream(message_id) as stream:
            return await stream.until_done(within=30)

    answers = await asyncio.gather(*(answer(i, m) for i, m in enumerate(message_ids)))

    for events in answers:
        assert dones(events)[0].json()["status"] == "completed"
        assert [e.seq for e in chunks(events)] == [1, 2, 3, 4, 5]
    seen = await read_responses(
        settings, set(sessions), lambda evs: len(terminal(evs)) >= 50, within=20
    )
    finals = terminal(seen)
    assert sorted(e["message_id"] for e in finals) == sorted(message_ids), "one terminal each"
    consumers = {p.instance_id for p in cluster.consumer_procs}
    assert {e["instance_id"] for e in seen} == consumers, "not every consumer took a share"
