"""Issue 14, history: a session's conversation survives a restart of every chatpipe process and
of Redis with AOF on (REDIS_APPENDONLY=yes, as the compose files run it).

The module runs 2 api + 3 ai_consumer + the listener on a private stack of its own. Two turns
are answered; then every process stops, Redis restarts (its AOF kept), every process starts
again; the third turn is generated from all three user messages (the simulator's text is
derived from the conversation it is given) and the conversation reads back unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from ai_consumer.llm.simulated import simulated_tokens
from chatpipe.history import Turn, prompt
from chatpipe.schemas import ChatRequest
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.e2e.faults.own_stack import OWN_STACK, real_services  # noqa: F401
from tests.support.cluster import Cluster, new_session
from tests.support.private_stack import PrivateStack, private_stack
from tests.support.sse import SSEEvent, chunks, dones

pytestmark = [pytest.mark.e2e, pytest.mark.faults, OWN_STACK]

TOKENS = 5


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    """This module's own stack, its Redis with AOF persistence (the shared one restarts empty)."""
    with private_stack(tmp_path_factory.mktemp("stack"), {"REDIS_APPENDONLY": "yes"}) as stack:
        yield stack


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {**DEFAULT_ENV, "sim_tokens": TOKENS, "sim_token_delay_ms": 20}


@contextlib.asynccontextmanager
async def clients(cluster: Cluster) -> AsyncIterator[tuple[Api, Api]]:
    """New clients of the two apis (connections from before a restart are dead)."""
    async with (
        httpx.AsyncClient(base_url=cluster.api_procs[0].url, timeout=30) as one,
        httpx.AsyncClient(base_url=cluster.api_procs[1].url, timeout=30) as two,
    ):
        yield Api("api-1", str(one.base_url), one), Api("api-2", str(two.base_url), two)


async def answer(api: Api, message_id: str) -> list[SSEEvent]:
    async with api.stream(message_id) as stream:
        events = await stream.until_done(within=30)
    assert dones(events)[-1].json()["status"] == "completed", events
    return events


def text(events: list[SSEEvent]) -> str:
    return "".join(str(e.json()["delta"]) for e in chunks(events))


async def conversation(api: Api, session: str) -> list[dict[str, Any]]:
    got = await api.client.get(f"/api/sessions/{session}/messages")
    assert got.status_code == 200, got.text
    turns: list[dict[str, Any]] = got.json()["messages"]
    return turns


async def test_history_survives_a_restart_of_every_process_and_of_redis_with_aof(
    cluster: Cluster, private: PrivateStack, settings: Settings
) -> None:
    session = new_session()
    async with clients(cluster) as (a, b):
        for question, api in (("what is Kafka?", a), ("and Redis?", b)):
            message_id = (await api.chat(session, question))["message_id"]
            await answer(b if api is a else a, message_id)
        before = await conversation(a, session)
    assert [t["message"] for t in before] == ["what is Kafka?", "and Redis?"]

    cluster.restart(timeout=90, between=private.restart_redis)

    async with clients(cluster) as (a, b):
        assert await conversation(b, session) == before
        third = (await a.chat(session, "and why?"))["message_id"]
        events = await answer(b, third)
        after = await conversation(a, session)
    request = ChatRequest(message_id=third, session_id=session, message="and why?")
    given = prompt([Turn.model_validate(t) for t in before], request, settings)
    assert [m.content for m in given if m.role == "user"] == [
        "what is Kafka?",
        "and Redis?",
        "and why?",
    ]
    assert text(events) == "".join(simulated_tokens(request, TOKENS, given))
    assert text(events) != "".join(simulated_tokens(request, TOKENS))  # not the message alone
    assert after[:2] == before
    assert [t["message_id"] for t in after] == [*(t["message_id"] for t in before), third]
