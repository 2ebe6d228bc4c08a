"""The contract's Redis keys on a real Redis: values and lifetimes as the design's table says."""

from __future__ import annotations

import zlib
from typing import cast

from redis.asyncio import Redis

from chatpipe.keys import Keys
from chatpipe.settings import Settings


async def test_seed_keys_with_the_test_prefix_keep_value_and_ttl(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    active, flag = keys.active("s-1"), keys.cancel("s-1", "m-1")
    # key layout 2: the seed's keys carry the session's hash tag, crc32(session) % buckets
    bucket = zlib.crc32(b"s-1") % settings.redis_key_buckets
    assert active == f"{settings.key_prefix}chat:{{{bucket}}}:active:s-1"
    assert flag == f"{settings.key_prefix}chat:{{{bucket}}}:cancel:s-1:m-1"

    await redis.set(active, "m-1", ex=settings.active_ttl_s)
    await redis.set(flag, "1", ex=settings.cancel_ttl_s)
    assert await redis.get(active) == b"m-1"
    assert await redis.get(flag) == b"1"
    assert settings.active_ttl_s - 5 < await redis.ttl(active) <= settings.active_ttl_s
    assert settings.cancel_ttl_s - 5 < await redis.ttl(flag) <= settings.cancel_ttl_s

    # a refresh (what the lease loop does for the active key) extends the lifetime again
    await redis.expire(active, 10)
    assert await redis.ttl(active) <= 10
    await redis.expire(active, settings.active_ttl_s)
    assert await redis.ttl(active) > 10

    # a key under another prefix is another key: tests and tenants do not see each other
    other = Keys(f"{settings.key_prefix}other:")
    assert other.active("s-1") != active
    assert await redis.get(other.active("s-1")) is None
    assert await redis.ttl(keys.active("never-set")) == -2


async def test_msg_and_stream_keys_hold_a_hash_and_a_stream(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    await redis.hset(keys.msg("s-1", "m-1"), mapping={"state": "queued", "session": "s-1"})
    await redis.expire(keys.msg("s-1", "m-1"), settings.msg_ttl_s)
    entry_id = await redis.xadd(keys.stream("s-1", "m-1"), {"e": "chunk", "s": 0, "d": "{}"})
    assert await redis.hget(keys.msg("s-1", "m-1"), "state") == b"queued"
    assert await redis.type(keys.stream("s-1", "m-1")) == b"stream"
    assert settings.msg_ttl_s - 5 < await redis.ttl(keys.msg("s-1", "m-1")) <= settings.msg_ttl_s
    assert await redis.ttl(keys.stream("s-1", "m-1")) == -1  # no TTL until the message is final
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(keys.stream("s-1", "m-1"))
    )
    (got_id, fields), *_ = entries
    assert got_id == entry_id
    assert fields == {b"e": b"chunk", b"s": b"0", b"d": b"{}"}
