"""Issue 12, item 1: no subscriber's cursor or stream can break the SSE hub's read for others.

The hub reads every watched stream with ONE XREAD; a stream Redis refuses to read (here: its key
holds a string, WRONGTYPE) used to fail that read on every retry, for every client of the
process. Now the hub reads each stream of the refused read alone, ends the clients of the one
Redis refuses, and goes on with the rest. A first client with an id from the future (valid but
past the stream's end) no longer holds back the later clients of the same message either.
On a real Redis, with the helpers of tests/integration/test_hub.py.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from api.hub import U64_MAX, parse_id
from chatpipe.keys import Keys
from chatpipe.settings import Settings
from tests.integration.test_hub import SESSION, TIMEOUT, add, running_hub, take


async def test_a_stream_redis_refuses_to_read_ends_only_its_own_clients(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    await add(redis, keys, "honest", 0)
    await redis.set(keys.stream(SESSION, "broken"), "not a stream")  # XREAD: WRONGTYPE
    async with running_hub(settings, redis) as (hub, reads, _):
        honest = await hub.subscribe(SESSION, "honest", (0, 0))
        assert len(await take(honest, 1)) == 1
        broken = await hub.subscribe(SESSION, "broken", (0, 0))
        async with asyncio.timeout(TIMEOUT):
            assert await broken.queue.get() is None, "the broken stream's client is ended"
        await reads.blocked()
        for n in range(1, 4):
            await add(redis, keys, "honest", n)
        got = await take(honest, 3)
        assert [e[1][b"s"] for e in got] == [b"1", b"2", b"3"]
        assert hub.healthy


async def test_a_first_client_from_the_future_does_not_hold_back_later_clients(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    first_id = await add(redis, keys, "m", 0)
    async with running_hub(settings, redis) as (hub, reads, _):
        future = await hub.subscribe(SESSION, "m", (U64_MAX, U64_MAX))  # valid, past the end
        later = await hub.subscribe(SESSION, "m", (0, 0))
        assert [i for i, _ in later.backlog] == [first_id]
        await reads.blocked()
        new_id = await add(redis, keys, "m", 1)
        assert [i for i, _ in await take(later, 1)] == [new_id]
        # the future client is handed the entry too; its SSE route skips what is not after it
        assert parse_id((await take(future, 1))[0][0]) == parse_id(new_id)
