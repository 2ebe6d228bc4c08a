"""The api's limits (api/limits.py) on a real Redis: two limiter objects stand for two api
processes sharing one Redis (tests/e2e/test_security_api.py does it with real processes)."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from redis.asyncio import Redis

from api.limits import Full, Limited, RateLimiter, StreamLimits
from chatpipe.clients import make_redis
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from tests.support.wait import apoll


@pytest.fixture
def keys(make_settings: Callable[..., Settings]) -> Keys:
    return Keys.from_settings(make_settings())


async def test_rate_limit_is_shared_and_says_when_to_retry(redis: Redis, keys: Keys) -> None:
    one, two = (RateLimiter(redis, keys, 6, Metrics()) for _ in range(2))
    for i in range(6):  # a burst of the whole minute's allowance, split over two instances
        await (one if i % 2 else two).hit("alice")
    for limiter in (one, two):
        with pytest.raises(Limited) as caught:
            await limiter.hit("alice")
        # one message every 10 s after the burst; allow for the time this test took
        assert 1 <= caught.value.retry_after_s <= 10
    await one.hit("bob")  # per user
    await RateLimiter(redis, keys, 0, Metrics()).hit("alice")  # 0 = off


def limits(redis: Redis, keys: Keys, name: str, **overrides: int) -> StreamLimits:
    values = {"max_connections": 100, "per_user": 2, "slot_ttl_s": 60, "retry_after_s": 3}
    values.update(overrides)
    return StreamLimits(redis, keys, Metrics(), prefix=name, **values)


async def test_streams_per_user_hold_across_instances(redis: Redis, keys: Keys) -> None:
    a, b = limits(redis, keys, "api-1"), limits(redis, keys, "api-2")
    first = await a.acquire("alice")
    await b.acquire("alice")
    for side in (a, b):
        with pytest.raises(Limited) as caught:
            await side.acquire("alice")
        assert caught.value.retry_after_s == 3
    assert (a.open, b.open) == (1, 1)  # a refusal holds nothing
    await b.acquire("bob")
    anonymous = [await a.acquire(None) for _ in range(3)]  # auth off: no per-user limit
    await first.release()
    await first.release()  # idempotent
    await b.acquire("alice")  # the freed slot is taken on the other instance
    for slot in anonymous:
        await slot.release()
    assert a.open == 0


async def test_a_dead_instance_slots_free_themselves(redis: Redis, keys: Keys) -> None:
    dead = limits(redis, keys, "api-dead", per_user=1, slot_ttl_s=1)
    await dead.acquire("alice")  # never released, never refreshed: its process died
    alive = limits(redis, keys, "api-alive", per_user=1, slot_ttl_s=1)

    async def taken() -> bool | None:
        try:
            await alive.acquire("alice")
        except Limited:
            return None
        return True

    await apoll("the dead instance's slot to expire", taken, within=5, interval=0.2)


async def test_a_held_slot_is_refreshed_past_its_ttl(redis: Redis, keys: Keys) -> None:
    holder = limits(redis, keys, "api-1", per_user=1, slot_ttl_s=1)
    holder.start()
    try:
        await holder.acquire("alice")
        other = limits(redis, keys, "api-2", per_user=1, slot_ttl_s=1)
        score = await redis.zscore(keys.stream_slots("alice"), "api-1:0")
        assert score is not None

        async def refreshed() -> bool | None:
            new = await redis.zscore(keys.stream_slots("alice"), "api-1:0")
            return True if new is not None and new > score + 500 else None

        await apoll("the holder to refresh its slot", refreshed, within=5)
        with pytest.raises(Limited):
            await other.acquire("alice")
    finally:
        await holder.stop()


async def test_connections_per_process(redis: Redis, keys: Keys) -> None:
    proc = limits(redis, keys, "api-1", max_connections=2, per_user=0)
    held = [await proc.acquire("alice"), await proc.acquire(None)]
    with pytest.raises(Full):
        await proc.acquire("carol")
    await held[0].release()
    await proc.acquire("carol")


async def test_a_slot_is_freed_even_while_its_response_is_being_cancelled(
    redis: Redis, keys: Keys, settings: Settings
) -> None:
    proc = limits(redis, keys, "api-1", per_user=1)
    slot = await proc.acquire("alice")
    # the release needs a new connection (the pool's idle one dropped): connecting yields, and
    # a cancelled release would never send its ZREM
    proc.redis = make_redis(settings, max_connections=2)
    try:
        with anyio.CancelScope() as scope:  # as when the client goes away mid-stream
            scope.cancel()
            await slot.release()
    finally:
        await proc.redis.aclose()
    assert await redis.zcard(keys.stream_slots("alice")) == 0
