"""Cancelling answers across real processes: a chat goes to one api, its cancel to the other.

The module's cluster runs the simulator at 100 ms per token (60 tokens: a 6 s answer unless a
request asks for fewer) with a 300 ms time to first token, as a real model has.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import cast

import httpx
import pytest
from redis.asyncio import Redis

from chatpipe.keys import Keys, cancel_record_key
from chatpipe.settings import Settings
from tests.e2e.conftest import Api
from tests.e2e.records import foreign_producer, of_message, read_responses, terminal
from tests.interop.stack import read_topic
from tests.support.cluster import Cluster, new_session
from tests.support.sse import SSEEvent, chunks, dones
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e


def assert_contiguous(events: list[SSEEvent]) -> None:
    seqs = [e.seq for e in chunks(events)]
    assert seqs == list(range(1, len(seqs) + 1)), f"chunk seqs not 1..n: {seqs}"


async def test_cancel_right_after_send_stops_it_before_any_chunk(
    apis: tuple[Api, Api], settings: Settings
) -> None:
    a, b = apis
    session = new_session()
    accepted = await a.chat(session)
    message_id = accepted["message_id"]
    assert accepted["stream_url"] == f"/api/chat/{message_id}/stream"

    answer = await b.cancel(session, message_id)

    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelled"
    for api in (a, b):  # the same answer from either instance
        async with api.stream(message_id) as stream:
            events = await stream.until_done(within=10)
        assert chunks(events) == [], f"{api.name} streamed chunks after the cancel: {events}"
        assert [e.event for e in events] == ["done"]
        assert events[0].json()["status"] == "cancelled"
        assert events[0].id
    # a Spring frontend reading chat.responses sees the same: one cancelled, no chunk
    seen = await read_responses(settings, {session}, lambda evs: bool(terminal(evs, message_id)))
    mine = of_message(seen, message_id)
    assert [e["type"] for e in terminal(mine)] == ["chat.cancelled"]
    assert not [e for e in mine if e["type"] == "chat.chunk"]


async def test_twenty_rapid_clicks_on_both_apis_end_it_once(
    apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    a, b = apis
    session = new_session()
    message_id = (await a.chat(session))["message_id"]
    loop = asyncio.get_running_loop()
    async with b.stream(message_id) as stream:
        stream.record()
        await stream.wait_for(lambda evs: len(chunks(evs)) >= 2, within=10, what="2 chunks")

        sent_at: list[float] = []
        answered_at: list[float] = []

        async def click(api: Api) -> httpx.Response:
            sent_at.append(loop.time())
            answer = await api.cancel(session, message_id)
            answered_at.append(loop.time())
            return answer

        answers = await asyncio.gather(*(click((a, b)[i % 2]) for i in range(20)))

        # they raced: all 20 were out before any answer came back (how far apart they left
        # is the test process's speed, not chatpipe's: CI saw 106 ms on a busy box)
        assert max(sent_at) < min(answered_at), (sent_at, answered_at)
        assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers]
        assert {r.json()["status"] for r in answers} == {"cancelled"}
        done = await stream.wait_done(within=5)
        events = await stream.wait_ended(within=5)

    assert done.json()["status"] == "cancelled"
    assert len(dones(events)) == 1
    assert len(chunks(events)) < 60, "the answer ran to its end despite the cancel"
    assert_contiguous(events)
    # exactly one terminal event in the stream SSE readers replay from ...
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis.xrange(Keys.from_settings(settings).stream(session, message_id)),
    )
    assert [fields[b"e"] for _, fields in entries].count(b"done") == 1
    # ... and on chat.responses, read up to the end offsets after the first one showed up
    seen = await read_responses(settings, {session}, lambda evs: bool(terminal(evs, message_id)))
    finals = terminal(seen, message_id)
    assert [e["type"] for e in finals] == ["chat.cancelled"], finals


async def test_cancel_of_a_completed_or_unknown_message(apis: tuple[Api, Api]) -> None:
    a, b = apis
    session = new_session()
    message_id = (await a.chat(session, max_tokens=3))["message_id"]
    async with a.stream(message_id) as stream:
        events = await stream.until_done(within=10)
    assert dones(events)[0].json()["status"] == "completed"
    assert len(chunks(events)) == 3

    for path in ("/api/cancel", "/cancel"):  # the contract's path and the seed's
        late = await b.client.post(path, json={"session_id": session, "message_id": message_id})
        assert late.status_code == 200, late.text
        assert late.json()["status"] == "completed"

    unknown = await b.cancel(session, f"no-such-{uuid.uuid4().hex}")
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["status"] == "not_found"
    assert unknown.json()["detail"]
    # a real message, but not in the session the click names
    other = await b.cancel(new_session(), message_id)
    assert other.status_code == 404, other.text
    assert other.json()["status"] == "not_found"


async def test_cancel_during_a_long_stream(
    apis: tuple[Api, Api], cluster: Cluster, settings: Settings, redis: Redis
) -> None:
    a, b = apis
    session = new_session()
    message_id = (await a.chat(session))["message_id"]  # 60 tokens, ~6 s
    active_key = Keys.from_settings(settings).active(session)
    loop = asyncio.get_running_loop()
    async with a.stream(message_id) as stream:
        stream.record()
        await stream.wait_for(
            lambda evs: len(chunks(evs)) >= 5 and stream.comments >= 1,
            within=10,
            what="5 chunks and a heartbeat comment",
        )
        assert await redis.get(active_key) == message_id.encode()

        answer = await b.cancel(session, message_id)
        answered = loop.time()

        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cancelled"
        done = await stream.wait_done(within=5)
        events = await stream.wait_ended(within=5)

    assert done.json()["status"] == "cancelled"
    assert done.received - answered <= 1.0, f"done came {done.received - answered:.3f}s late"
    after = [e for e in chunks(events) if e.received > answered]
    assert len(after) <= 1, f"{len(after)} chunks after the cancel answer"
    assert_contiguous(events)
    assert len(chunks(events)) < 30, "the stream did not stop early"
    # the consumer that generated it logged the cancel, naming the message
    state = cast(
        dict[bytes, bytes],
        await redis.hgetall(Keys.from_settings(settings).msg(session, message_id)),
    )
    assert state[b"state"] == b"cancelled"
    owner = cluster.by_instance(state[b"owner"].decode())
    assert owner.kind == "ai_consumer"
    line = await owner.log_line(
        lambda line: line.get("message_id") == message_id and "cancel" in str(line.get("msg")),
        within=5,
    )
    assert line["session_id"] == session
    assert not await redis.exists(active_key), "the session still has an active stream"


async def test_cancel_published_to_kafka_by_a_spring_frontend(
    apis: tuple[Api, Api], settings: Settings
) -> None:
    a, b = apis
    session = new_session()
    message_id = (await a.chat(session))["message_id"]
    loop = asyncio.get_running_loop()
    async with foreign_producer(settings) as producer, b.stream(message_id) as stream:
        stream.record()
        await stream.wait_for(lambda evs: len(chunks(evs)) >= 3, within=10, what="3 chunks")
        # what Spring's KafkaTemplate with JsonSerializer sends: camelCase, a type header
        requested_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        value = json.dumps(
            {"sessionId": session, "messageId": message_id, "requestedAt": requested_at}
        ).encode()
        await producer.send_and_wait(
            settings.cancels_topic,
            value,
            key=f"{session}:{message_id}".encode(),
            headers=[("__TypeId__", b"com.example.chat.CancelEvent")],
        )
        acked = loop.time()
        done = await stream.wait_done(within=5)
        events = await stream.wait_ended(within=5)

    assert done.json()["status"] == "cancelled"
    assert done.received - acked <= 1.0, f"done came {done.received - acked:.3f}s late"
    after = [e for e in chunks(events) if e.received > acked]
    assert len(after) <= 1, f"{len(after)} chunks after the cancel record was in Kafka"
    assert_contiguous(events)
    # the apis answer for it like for a cancel they took themselves
    again = await a.cancel(session, message_id)
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"


async def test_many_clicks_publish_one_cancel_then_its_tombstone(
    apis: tuple[Api, Api], settings: Settings
) -> None:
    """What a storm of clicks leaves on the compacted chat.cancels topic: the first accepted
    cancel is published once, later clicks (on either api, during the stream or after it ended)
    get the same answer and publish nothing, and the consumer's tombstone comes after the
    record (ai_consumer/tombstones.py), so compaction forgets the cancel."""
    a, b = apis
    session = new_session()
    message_id = (await a.chat(session))["message_id"]
    key = cancel_record_key(session, message_id).encode()
    async with b.stream(message_id) as stream:
        stream.record()
        await stream.wait_for(lambda evs: len(chunks(evs)) >= 2, within=10, what="2 chunks")
        during = await asyncio.gather(*(api.cancel(session, message_id) for api in (a, b) * 5))
        done = await stream.wait_done(within=5)
    after = [await api.cancel(session, message_id) for api in (a, b)]  # it has ended now

    assert done.json()["status"] == "cancelled"
    for answer in (*during, *after):
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cancelled"

    async def tombstoned() -> list[bytes | None] | None:
        values = [
            r.value for r in await read_topic(settings, settings.cancels_topic) if r.key == key
        ]
        return values if values and values[-1] is None else None

    values = await apoll("the tombstone of the cancel", tombstoned, within=15)
    assert len(values) == 2, f"expected one cancel record then its tombstone, got {values}"
    assert values[0] is not None
