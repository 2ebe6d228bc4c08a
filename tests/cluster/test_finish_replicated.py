"""On a Redis Cluster a message's FINISH reaches a replica before its terminal event goes to
Kafka (`State.finish`: WAIT 1 on FINISH's connection, REDIS_FINISH_WAIT_MS), so a failover right
after cannot bring the message back as `streaming` on the promoted replica to be answered again
(docs/reliability.md, "Redis Cluster: a primary lost")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from chatpipe.clients import make_redis
from chatpipe.settings import Settings
from chatpipe.state import State
from tests.cluster.conftest import ClusterStack
from tests.conftest import namespace

pytestmark = [pytest.mark.cluster]
NOW = "2026-12-05T10:00:00.000000Z"


@pytest.fixture
async def cluster_state(cluster_stack: ClusterStack) -> AsyncIterator[State]:
    settings = Settings(
        _env_file=None,
        redis_url=cluster_stack.env["REDIS_URL"],
        redis_cluster=True,
        key_prefix=f"{namespace()}:",
        redis_finish_wait_ms=1000,
    )
    redis = make_redis(settings, max_connections=4)
    try:
        yield State(redis, settings)
    finally:
        await redis.aclose()


async def wait_calls(node: Any) -> int:
    """How many WAIT commands the node has run."""
    stats = await node.execute_command("INFO", "commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def test_a_finish_is_on_a_replica_before_it_returns(cluster_state: State) -> None:
    state = cluster_state
    cluster = cast(Any, state.redis)
    assert await state.accept("m-1", "s-1", "u", NOW) == "ok"
    run = await state.claim("m-1", "s-1", "u", "ai-1", NOW)
    key = state.keys.msg("s-1", "m-1")
    primary = cluster.get_node_from_key(key)
    before = await wait_calls(primary)

    done = await state.finish("m-1", "s-1", "ai-1", "completed", "", 1, NOW, epoch=run.epoch)

    assert done.state == "completed"
    assert await wait_calls(primary) == before + 1
    replica = cluster.get_node_from_key(key, replica=True)
    assert replica is not None
    assert replica.name != primary.name
    direct = Redis(host=replica.host, port=replica.port)
    try:
        await direct.execute_command("READONLY")
        assert await direct.hget(key, "state") == b"completed"
    finally:
        await direct.aclose()
