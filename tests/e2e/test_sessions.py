"""Issue 14, first part: a session-wide cancel and double texting (`if_busy`), across two api
instances, on real processes (2 api, 3 ai_consumer, 1 cancel_listener).

A session's queued and streaming messages are kept in a Redis set (chatpipe/lua/accept.lua);
`POST /api/sessions/{id}/cancel` cancels each of them as `POST /api/cancel` would, and
`if_busy` on `POST /api/chat` decides what a message sent while one is open does.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
from redis.asyncio import Redis

from chatpipe.keys import Keys, cancel_record_key, session_cancel_record_key
from chatpipe.schemas import ChatSessionCancel
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.e2e.faults.consumer_support import recorded
from tests.e2e.records import foreign_producer, latest_cancels
from tests.support.cluster import new_session
from tests.support.sse import SSEEvent, chunks, dones
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

TOKENS = 40  # 4 s answers: long enough to act on one while it streams


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {**DEFAULT_ENV, "sim_tokens": TOKENS, "sim_token_delay_ms": 100}


def status(events: list[SSEEvent]) -> str:
    return str(dones(events)[-1].json()["status"])


async def test_a_session_cancel_on_the_other_api_stops_the_streaming_and_the_queued_ones(
    apis: tuple[Api, Api],
) -> None:
    a, b = apis
    session, neighbour = new_session(), new_session()
    ids = [(await a.chat(session))["message_id"] for _ in range(4)]  # 1 streams, 3 wait
    other = (await a.chat(neighbour))["message_id"]
    async with recorded(a.stream(m) for m in [*ids, other]) as streams:
        await streams[0].wait_for(lambda evs: bool(chunks(evs)), within=20, what="a chunk")
        answer = await b.client.post(f"/api/sessions/{session}/cancel")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["session_id"] == session
        assert body["cancelled"] == ids, body  # oldest first
        assert body["ended"] == []
        for s in streams:
            await s.wait_done(within=30)
    assert [status(s.events) for s in streams[:4]] == ["cancelled"] * 4
    assert all(not chunks(s.events) for s in streams[1:4])  # the queued ones never started
    assert status(streams[4].events) == "completed"  # another session: untouched
    assert len(chunks(streams[4].events)) == TOKENS
    again = await a.client.post(f"/api/sessions/{session}/cancel")  # nothing open any more
    assert again.json() == {"session_id": session, "cancelled": [], "ended": []}


async def test_if_busy_reject_names_the_busy_message_and_queues_nothing(
    apis: tuple[Api, Api],
) -> None:
    a, b = apis
    session = new_session()
    first = (await a.chat(session))["message_id"]
    refused_id = uuid.uuid4().hex
    async with recorded([a.stream(first)]) as (stream,):
        await stream.wait_for(lambda evs: bool(chunks(evs)), within=20, what="a chunk")
        body = {"session_id": session, "message": "and?", "message_id": refused_id}
        refused = await b.client.post("/api/chat", json={**body, "if_busy": "reject"})
        assert refused.status_code == 409, refused.text
        assert first in refused.json()["detail"]
        await stream.wait_done(within=30)
    assert status(stream.events) == "completed"
    gone = await b.client.get(f"/api/chat/{refused_id}/stream")
    assert gone.status_code == 404, gone.text  # nothing was queued
    # once the first has ended the session is free again, with the same message id
    later = await b.client.post("/api/chat", json={**body, "if_busy": "reject"})
    assert later.status_code == 202, later.text


async def test_if_busy_interrupt_cancels_what_is_open_and_runs_the_new_message(
    apis: tuple[Api, Api],
) -> None:
    a, b = apis
    session = new_session()
    first = (await a.chat(session))["message_id"]
    queued = (await a.chat(session))["message_id"]
    async with recorded([a.stream(first), a.stream(queued)]) as streams:
        await streams[0].wait_for(lambda evs: bool(chunks(evs)), within=20, what="a chunk")
        body = {"session_id": session, "message": "stop, this instead", "if_busy": "interrupt"}
        posted = await b.client.post("/api/chat", json=body)
        assert posted.status_code == 202, posted.text
        async with b.stream(posted.json()["message_id"]) as new:
            events = await new.until_done(within=30)
        for s in streams:
            await s.wait_done(within=30)
    assert [status(s.events) for s in streams] == ["cancelled", "cancelled"]
    assert status(events) == "completed"
    assert len(chunks(events)) == TOKENS


async def test_if_busy_enqueue_is_the_default_and_runs_after_the_open_one(
    apis: tuple[Api, Api],
) -> None:
    a, b = apis
    session = new_session()
    first = (await a.chat(session))["message_id"]
    second = (await b.chat(session, "and then?"))["message_id"]  # no if_busy: enqueue
    async with recorded([a.stream(first), b.stream(second)]) as streams:
        for s in streams:
            await s.wait_done(within=40)
    assert [status(s.events) for s in streams] == ["completed", "completed"]
    # per-session order: the second's first chunk after the first's done
    assert chunks(streams[1].events)[0].received > dones(streams[0].events)[0].received


async def test_delete_of_a_session_stops_it_then_leaves_nothing_of_it(
    apis: tuple[Api, Api], redis: Redis, settings: Settings
) -> None:
    a, b = apis
    session, neighbour = new_session(), new_session()
    ended = (await a.chat(session, max_tokens=2))["message_id"]
    async with a.stream(ended) as stream:
        assert status(await stream.until_done(within=30)) == "completed"
    streaming = (await a.chat(session))["message_id"]
    queued = (await a.chat(session))["message_id"]
    other = (await a.chat(neighbour, max_tokens=2))["message_id"]
    async with recorded([a.stream(streaming), a.stream(queued)]) as streams:
        await streams[0].wait_for(lambda evs: bool(chunks(evs)), within=20, what="a chunk")
        deleted = await b.client.delete(f"/api/sessions/{session}")
        assert deleted.status_code == 200, deleted.text
        for s in streams:
            await s.wait_done(within=30)
    body = deleted.json()
    assert body["session_id"] == session
    assert body["cancelled"] == [streaming, queued]
    assert sorted(body["removed"]) == sorted([ended, streaming, queued])
    assert [status(s.events) for s in streams] == ["cancelled", "cancelled"]

    ids = (session, ended, streaming, queued)

    async def nothing_left() -> bool | None:
        # the cancel listeners apply the stop's chat.session_cancel record, which may reach
        # one after the DELETE removed the keys: its tombstone, sent after, undoes its mark
        left = [k async for k in redis.scan_iter(match=f"{settings.key_prefix}*", count=1000)]
        mine = [k for k in left if any(i in k.decode() for i in ids)]
        return True if not mine else None

    await apoll("no key of the deleted session", nothing_left, within=15)
    keys = Keys.from_settings(settings)
    member = cancel_record_key(session, streaming)
    assert await redis.zscore(keys.leases(keys.bucket(session)), member) is None
    for message_id in (ended, streaming, queued):
        gone = await b.client.get(f"/api/chat/{message_id}/stream")
        assert gone.status_code == 404, gone.text
    shown = await a.client.get(f"/api/sessions/{session}/messages")
    assert shown.json()["messages"] == []
    latest = await latest_cancels(settings)
    for message_id in (streaming, queued):  # their cancel records: tombstoned
        key = cancel_record_key(session, message_id)
        assert key in latest, key
        assert latest[key] is None, key
    async with a.stream(other) as stream:  # another session of the user: untouched
        assert status(await stream.until_done(within=30)) == "completed"
    assert (await a.client.delete(f"/api/sessions/{session}")).json()["removed"] == []


async def test_a_kafka_session_cancel_stops_the_streaming_and_the_queued_ones(
    apis: tuple[Api, Api], settings: Settings
) -> None:
    """The same as the api's session cancel, from a `chat.session_cancel` record alone (as a
    Spring frontend sends "stop all")."""
    a, _ = apis
    session, neighbour = new_session(), new_session()
    ids = [(await a.chat(session))["message_id"] for _ in range(4)]
    other = (await a.chat(neighbour))["message_id"]
    async with recorded(a.stream(m) for m in [*ids, other]) as streams:
        await streams[0].wait_for(lambda evs: bool(chunks(evs)), within=20, what="a chunk")
        record = ChatSessionCancel(session_id=session, reason="stop all")
        async with foreign_producer(settings) as producer:
            await producer.send_and_wait(
                settings.cancels_topic,
                record.to_json(),
                key=session_cancel_record_key(session).encode(),
            )
        for s in streams:
            await s.wait_done(within=30)
    assert [status(s.events) for s in streams[:4]] == ["cancelled"] * 4
    assert all(not chunks(s.events) for s in streams[1:4])
    assert status(streams[4].events) == "completed"
    assert len(chunks(streams[4].events)) == TOKENS
    later = (await a.chat(session, max_tokens=2))["message_id"]  # sent after: runs
    async with a.stream(later) as stream:
        assert status(await stream.until_done(within=30)) == "completed"


def kafka_request(session_id: str, if_busy: str) -> tuple[str, bytes]:
    message_id = uuid.uuid4().hex
    value = {"messageId": message_id, "sessionId": session_id, "message": "and?", "ifBusy": if_busy}
    return message_id, orjson.dumps(value)


async def test_if_busy_from_kafka_interrupts_or_is_refused(
    apis: tuple[Api, Api], settings: Settings
) -> None:
    """`if_busy` on a request produced straight to Kafka: `reject` in a busy session ends it
    failed with the busy id as its reason (the open one goes on); `interrupt` cancels what is
    open and runs."""
    a, b = apis
    session = new_session()
    first = (await a.chat(session))["message_id"]
    queued = (await a.chat(session))["message_id"]
    refused, refused_value = kafka_request(session, "reject")
    interrupting, interrupt_value = kafka_request(session, "interrupt")
    async with recorded([a.stream(first), a.stream(queued)]) as streams:
        await streams[0].wait_for(lambda evs: bool(chunks(evs)), within=20, what="a chunk")
        async with foreign_producer(settings) as producer:
            key = session.encode()
            await producer.send_and_wait(settings.requests_topic, refused_value, key=key)
            async with b.stream(refused, open_timeout=20) as stream:
                events = await stream.until_done(within=30)
            done = dones(events)[-1].json()
            assert (done["status"], chunks(events)) == ("failed", [])
            assert done["reason"].rsplit(" ", 1)[-1] in (first, queued)  # names a busy one
            assert streams[0].events[-1].event != "done"  # the open one goes on
            await producer.send_and_wait(settings.requests_topic, interrupt_value, key=key)
        async with b.stream(interrupting, open_timeout=20) as stream:
            events = await stream.until_done(within=30)
        for s in streams:
            await s.wait_done(within=30)
    assert [status(s.events) for s in streams] == ["cancelled", "cancelled"]
    assert status(events) == "completed"
    assert len(chunks(events)) == TOKENS
