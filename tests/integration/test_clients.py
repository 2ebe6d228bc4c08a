"""The client factories of chatpipe/clients.py against the real services."""

from __future__ import annotations

import asyncio

from chatpipe.clients import make_redis
from chatpipe.settings import Settings


async def test_closing_a_client_from_make_redis_closes_its_connections(settings: Settings) -> None:
    client = make_redis(settings, max_connections=4)
    pool = client.connection_pool
    try:
        await client.ping()
        await client.aclose()
        open_after_close = [c for c in pool._available_connections if c.is_connected]
        assert open_after_close == []
    finally:
        await pool.disconnect()


async def test_redis_client_pool_is_bounded_and_blocks_instead_of_raising(
    settings: Settings,
) -> None:
    """200 concurrent pipelines on a pool of 4 all complete (the default pool would raise
    MaxConnectionsError, see notes/field-notes.md)."""
    client = make_redis(settings, max_connections=4)
    key = f"{settings.key_prefix}pool-test"
    try:

        async def one(i: int) -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(key, str(i), i)
                pipe.hget(key, str(i))
                _, value = await pipe.execute()
            assert value == str(i).encode()

        await asyncio.gather(*(one(i) for i in range(200)))
        assert await client.hlen(key) == 200
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 4
    finally:
        await client.delete(key)
        await client.aclose(close_connection_pool=True)
