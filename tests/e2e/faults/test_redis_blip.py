"""Issue 12, item 13: Redis briefly unreachable (its data kept) while answers stream.

A failover, a proxy restart or a network blip resets every client connection to Redis at once;
the server and its data are still there a moment later. docs/reliability.md promised "a paused
stream that resumes"; a stream must not end `failed` for it. Real processes (2 api, 1
ai_consumer, 1 cancel_listener) on the fault tests' private stack (own_stack.py): every connection of
the cluster's processes is killed (`CLIENT KILL TYPE normal`) twice while eight answers stream;
each answer then goes on and ends `completed` with every chunk once, on SSE and on
chat.responses.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api, ClusterShape
from tests.e2e.faults.consumer_support import recorded
from tests.e2e.faults.own_stack import OWN_STACK, real_services  # noqa: F401
from tests.e2e.records import of_message, read_responses, terminal
from tests.support.cluster import Cluster, new_session
from tests.support.sse import chunks, dones

pytestmark = [pytest.mark.e2e, pytest.mark.faults, OWN_STACK]

TOKENS = 30
STREAMS = 8


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {**DEFAULT_ENV, "sim_tokens": TOKENS, "sim_token_delay_ms": 100}


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    return ClusterShape(apis=2, consumers=1, ready_timeout=90)


async def kill_connections(redis: Redis) -> int:
    """Reset every client connection of the server but this one (what a blip does)."""
    return int(await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))


async def test_streams_go_on_through_a_redis_connection_reset(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    a, _ = apis
    sessions = [new_session() for _ in range(STREAMS)]
    ids = [(await a.chat(s))["message_id"] for s in sessions]
    async with recorded(a.stream(m) for m in ids) as streams:
        for s in streams:
            await s.wait_for(lambda evs: len(chunks(evs)) >= 3, within=20, what="3 chunks")
        assert await kill_connections(redis) > 0
        # a second reset once every stream has moved on after the first one
        marks = [len(chunks(s.events)) for s in streams]
        for s, mark in zip(streams, marks, strict=True):
            await s.wait_for(
                lambda evs, m=mark: len(chunks(evs)) >= m + 2, within=20, what="2 more chunks"
            )
        assert await kill_connections(redis) > 0
        for s in streams:
            await s.wait_done(within=30)
    for m, s in zip(ids, streams, strict=True):
        assert [d.json()["status"] for d in dones(s.events)] == ["completed"], (m, s.events)
        assert [e.seq for e in chunks(s.events)] == list(range(1, TOKENS + 1)), m
    seen = await read_responses(
        settings, set(sessions), lambda evs: len(terminal(evs)) >= STREAMS, within=30
    )
    for m in ids:
        events = of_message(seen, m)
        assert [e["type"] for e in terminal(events)] == ["chat.completed"], events
        assert [e["seq"] for e in events if e["type"] == "chat.chunk"] == list(
            range(1, TOKENS + 1)
        ), m
    assert all(p.alive() for p in cluster.consumer_procs + cluster.api_procs)
