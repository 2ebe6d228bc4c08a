"""Issue 4, fault 6: Redis restarts with its data gone while a cancel waits for a queued message.

The message is queued for real: it is in chat.requests and no ai_consumer has taken it yet (the
module's cluster starts without one: every consumer busy elsewhere looks the same from here).
The user cancels it (the api sets the Redis flag and publishes to chat.cancels), then Redis
restarts empty: the flag and the message's state are gone. The cancel listener sees Redis's new
run_id and replays the compacted chat.cancels, which re-creates the flag; the consumer that
starts afterwards finds it and ends the message `cancelled` without streaming a token. A message
of the same session that was not cancelled is answered as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatpipe.clients import make_redis
from chatpipe.keys import Keys
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api, ClusterShape
from tests.e2e.faults.own_stack import OWN_STACK, real_services  # noqa: F401
from tests.e2e.records import of_message, read_responses, terminal
from tests.support.cluster import Cluster, new_session
from tests.support.private_stack import PrivateStack
from tests.support.sse import SSEError, SSEEvent, chunks, dones
from tests.support.wait import apoll

pytestmark = [pytest.mark.e2e, pytest.mark.faults, OWN_STACK]


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {**DEFAULT_ENV, "sim_token_delay_ms": 20}


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """2 api + the cancel listener; no ai_consumer yet (the test starts one)."""
    return ClusterShape(consumers=0, ready_timeout=90)


@pytest.fixture
async def fresh_redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client of the module's Redis that outlives its restart (reconnects on use)."""
    client = make_redis(settings, max_connections=4)
    try:
        yield client
    finally:
        await client.aclose()


async def answer_of(api: Api, message_id: str) -> list[SSEEvent]:
    """The message's SSE events up to `done`. A 503 is retried as its Retry-After asks: each
    api connection to Redis that died with the server fails once (docs/reliability.md)."""

    async def attempt() -> list[SSEEvent] | None:
        try:
            async with api.stream(message_id) as stream:
                return await stream.until_done(within=45)
        except SSEError as e:
            if "-> 503" not in str(e):
                raise
            return None

    return await apoll(f"the answer of {message_id}", attempt, within=60)


async def test_a_cancel_pending_for_a_queued_message_survives_a_redis_restart(
    cluster: Cluster,
    apis: tuple[Api, Api],
    settings: Settings,
    private: PrivateStack,
    fresh_redis: Redis,
) -> None:
    a, b = apis
    keys = Keys.from_settings(settings)
    session = new_session()
    cancelled = (await a.chat(session, max_tokens=5))["message_id"]
    answered = (await a.chat(session, max_tokens=5))["message_id"]
    answer = await b.cancel(session, cancelled)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelled"
    flag = keys.cancel(session, cancelled)
    assert await fresh_redis.exists(flag)

    listener = cluster.listener_procs[0]
    assert not listener.find(lambda x: "Redis came back empty" in str(x.get("msg")))

    await asyncio.to_thread(private.restart_redis)
    await fresh_redis.connection_pool.disconnect()  # its connections died with the server
    # the data is gone (nothing re-creates a message's state but the consumer, not running)
    assert not await fresh_redis.exists(keys.msg(session, cancelled))

    async def flag_back() -> bool | None:
        return True if await fresh_redis.exists(flag) else None

    await apoll("the listener to re-create the cancel flag", flag_back, within=15)
    await listener.log_line(lambda x: "Redis came back empty" in str(x.get("msg")), within=5)
    assert not await fresh_redis.exists(keys.cancel(session, answered))

    consumer = cluster.spawn("ai_consumer", "ai-late")

    async def both_final() -> bool | None:
        found = [
            await fresh_redis.hget(keys.msg(session, m), "state") for m in (cancelled, answered)
        ]
        return True if all(s in (b"cancelled", b"completed", b"failed") for s in found) else None

    # the message states are gone with Redis: the consumer re-creates them when it takes the
    # requests (until then the api answers 404 for their streams)
    await apoll("both messages to be final", both_final, within=60)
    for message_id, status, n in ((cancelled, "cancelled", 0), (answered, "completed", 5)):
        events = await answer_of(a, message_id)
        assert [d.json()["status"] for d in dones(events)] == [status], events
        assert len(chunks(events)) == n, events
    assert consumer.alive()

    seen = await read_responses(settings, {session}, lambda evs: len(terminal(evs)) >= 2, within=30)
    assert [e["type"] for e in of_message(seen, cancelled)] == ["chat.cancelled"]
    assert [e["type"] for e in terminal(of_message(seen, answered))] == ["chat.completed"]
