"""Issue 14, history: each answer is generated with the session's conversation so far.

2 api + 3 ai_consumer + the cancel listener with LLM_PROVIDER=openai, pointed at a recording
OpenAI-compatible server (tests/providers/upstream.py, in a thread of its own: the processes
start before any test's loop). What the model server receives is what is asserted: the
`messages` of each upstream request, found by its X-Request-Id (the message id).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.providers.upstream import FakeOpenAI, provider_env, reply
from tests.support.cluster import new_session
from tests.support.sse import SSEEvent, chunks, dones
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

MARK = "[the user stopped this answer here]"  # HISTORY_CANCELLED_MARK's default


@pytest.fixture(scope="module")
def cluster_env(upstream: FakeOpenAI) -> dict[str, object]:
    return {**DEFAULT_ENV, **provider_env(upstream, "fake-model")}


async def answer(api: Api, message_id: str) -> list[SSEEvent]:
    async with api.stream(message_id) as stream:
        return await stream.until_done(within=30)


def text(events: list[SSEEvent]) -> str:
    return "".join(str(e.json()["delta"]) for e in chunks(events))


def status(events: list[SSEEvent]) -> str:
    return str(dones(events)[-1].json()["status"])


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


async def send(api: Api, session: str, body: dict[str, Any]) -> str:
    posted = await api.client.post("/api/chat", json={"session_id": session, **body})
    assert posted.status_code == 202, posted.text
    return str(posted.json()["message_id"])


async def answered(on: Api, read_on: Api, session: str, message: str) -> str:
    """Send `message` on one api, read its answer to `completed` on another; its id."""
    message_id = str((await on.chat(session, message))["message_id"])
    assert status(await answer(read_on, message_id)) == "completed"
    return message_id


async def test_each_turn_is_generated_with_the_conversation_so_far(
    apis: tuple[Api, Api], upstream: FakeOpenAI
) -> None:
    a, b = apis
    session = new_session()
    first = await answered(a, b, session, "what is Kafka?")
    assert (await upstream.call_for(first)).body["messages"] == [turn("user", "what is Kafka?")]

    # stopped halfway: 3 chunks, then the model server holds until the cancel closes it
    stopped = (await b.chat(session, "hold:3"))["message_id"]
    async with a.stream(stopped) as stream:
        stream.record()
        await stream.wait_for(lambda evs: len(chunks(evs)) == 3, within=30, what="3 chunks")
        assert (await b.cancel(session, stopped)).status_code == 200
        await stream.wait_done(within=30)
    assert status(stream.events) == "cancelled"

    failed = (await a.chat(session, "status:500"))["message_id"]  # the upstream fails it
    assert status(await answer(b, failed)) == "failed"

    last = (await b.chat(session, "and Redis?"))["message_id"]
    events = await answer(a, last)
    assert status(events) == "completed"
    assert text(events) == "".join(reply("and Redis?"))
    assert (await upstream.call_for(last)).body["messages"] == [
        turn("user", "what is Kafka?"),
        turn("assistant", "".join(reply("what is Kafka?"))),
        turn("user", "hold:3"),
        turn("assistant", f"t0 t1 t2 {MARK}"),  # as far as it got, marked; the failed one left out
        turn("user", "and Redis?"),
    ]

    # the conversation as the session API shows it, from the other api
    shown = await b.client.get(f"/api/sessions/{session}/messages")
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["has_more"] is False
    got = [(t["message_id"], t["message"], t["status"], t["answer"]) for t in body["messages"]]
    assert got == [
        (first, "what is Kafka?", "completed", "".join(reply("what is Kafka?"))),
        (stopped, "hold:3", "cancelled", "t0 t1 t2 "),
        (failed, "status:500", "failed", ""),
        (last, "and Redis?", "completed", "".join(reply("and Redis?"))),
    ]
    assert all(t["created_at"] and t["finished_at"] for t in body["messages"])
    # paginated: the newest 2, then the 2 before them
    page = (await a.client.get(f"/api/sessions/{session}/messages", params={"limit": 2})).json()
    assert [t["message_id"] for t in page["messages"]] == [failed, last]
    assert page["has_more"] is True
    older = await a.client.get(
        f"/api/sessions/{session}/messages", params={"limit": 2, "before": failed}
    )
    assert [t["message_id"] for t in older.json()["messages"]] == [first, stopped]
    assert older.json()["has_more"] is False


async def test_a_request_with_its_own_messages_is_sent_as_given(
    apis: tuple[Api, Api], upstream: FakeOpenAI
) -> None:
    a, b = apis
    session = new_session()
    earlier = await answered(a, b, session, "kept by chatpipe")
    given = [
        turn("system", "answer briefly"),
        turn("user", "from the frontend's database"),
        turn("assistant", "an answer it stored"),
        turn("user", "and now?"),
    ]
    message_id = await send(b, session, {"messages": given})  # `message` left out
    assert status(await answer(a, message_id)) == "completed"
    assert (await upstream.call_for(message_id)).body["messages"] == given
    turns = (await a.client.get(f"/api/sessions/{session}/messages")).json()["messages"]
    assert [(t["message_id"], t["message"]) for t in turns] == [
        (earlier, "kept by chatpipe"),
        (message_id, "and now?"),  # the last user entry is the turn's message
    ]


async def test_a_queued_and_a_streaming_turn_show_in_the_conversation(
    apis: tuple[Api, Api],
) -> None:
    a, b = apis
    session = new_session()
    streaming = (await a.chat(session, "hold:2"))["message_id"]
    queued = (await a.chat(session, "next"))["message_id"]
    async with b.stream(streaming) as stream:
        stream.record()
        await stream.wait_for(lambda evs: len(chunks(evs)) == 2, within=30, what="2 chunks")

        async def both() -> list[Any] | None:
            shown = await b.client.get(f"/api/sessions/{session}/messages")
            turns: list[Any] = shown.json()["messages"]
            return turns if [t["status"] for t in turns] == ["streaming", "queued"] else None

        turns = await apoll("a streaming and a queued turn", both, within=10)
        assert [(t["message_id"], t["message"], t["answer"]) for t in turns] == [
            (streaming, "hold:2", "t0 t1 "),
            (queued, "next", ""),
        ]
        stop = await a.client.post(f"/api/sessions/{session}/cancel")
        assert stop.status_code == 200, stop.text
        await stream.wait_done(within=30)


async def test_bad_session_history_requests_get_a_reason(apis: tuple[Api, Api]) -> None:
    a, _ = apis
    session = new_session()
    for params in ({"limit": 0}, {"limit": 201}, {"before": "bad id!"}, {"limit": "x"}):
        got = await a.client.get(f"/api/sessions/{session}/messages", params=params)
        assert got.status_code == 422, (params, got.text)
        assert got.json()["detail"], got.text
    empty = await a.client.get(f"/api/sessions/{session}/messages")
    assert empty.json() == {"session_id": session, "messages": [], "has_more": False}
    for body in (
        {"session_id": session},  # no message and no messages
        {"session_id": session, "messages": []},
        {"session_id": session, "messages": [{"role": "assistant", "content": "no user"}]},
        {"session_id": session, "messages": [{"role": "tool", "content": "x"}]},
        {"session_id": session, "messages": "hello"},
    ):
        got = await a.client.post("/api/chat", json={**body, "message_id": uuid.uuid4().hex})
        assert got.status_code == 422, (body, got.text)
