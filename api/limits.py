"""Limits of the api: chat messages per user per minute and open streams per user (both in Redis,
so they hold across api instances), and SSE connections per process.

A refusal raises `Limited` (429, `Retry-After`) or `Full` (503, `Retry-After`); the app maps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis

from chatpipe.errors import ChatpipeError
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.scripts import register

log = logging.getLogger(__name__)


class Limited(ChatpipeError):
    """A per-user limit is reached: 429 with `Retry-After`."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.retry_after_s = max(1, retry_after_s)


class Full(ChatpipeError):
    """This process serves as many SSE connections as it may: 503 with `Retry-After`."""


# GCRA (a leaky bucket without a timer): `burst` requests at once, then one per `interval`;
# no window edge where twice the rate slips through. Time is the Redis server's, so api
# instances with skewed clocks agree. KEYS tat ; ARGV interval_ms burst -> 0 allowed | ms to wait
RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + interval - tonumber(ARGV[2]) * interval
if now < allow_at then return allow_at - now end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now))
return 0
"""

# Slots expire unless refreshed, so a crashed api's streams free themselves (Redis time).
# KEYS slots ; ARGV ttl_ms limit member -> 1 taken | 0 full
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS slots1 slots2 ... ; ARGV ttl_ms member1 member2 ... (refresh the slots still held)
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return #KEYS
"""


class RateLimiter:
    """At most `per_minute` chat messages per user per minute (a burst of `per_minute`, then
    one every 60/`per_minute` s), across all api instances."""

    def __init__(self, redis: Redis, keys: Keys, per_minute: int, metrics: Metrics) -> None:
        self.keys = keys
        self.per_minute = per_minute
        self.metrics = metrics
        self._rate = register(redis, RATE)

    async def hit(self, user_id: str) -> None:
        if self.per_minute <= 0:
            return
        interval_ms = max(1, round(60_000 / self.per_minute))
        wait_ms = await self._rate(
            keys=[self.keys.rate(user_id)], args=[interval_ms, self.per_minute]
        )
        if int(wait_ms) > 0:
            self.metrics.limited.labels("rate").inc()
            raise Limited(
                f"rate limit: {self.per_minute} messages per minute per user",
                math.ceil(int(wait_ms) / 1000),
            )


@dataclass
class Slot:
    """One held stream: a per-process connection and, for a known user, a Redis slot."""

    limits: StreamLimits
    user_id: str | None
    member: str
    released: bool = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        await self.limits.release(self)


@dataclass
class StreamLimits:
    """SSE connections per process (`max_connections`) and open streams per user
    (`per_user`, a sorted set of expiring slots in Redis, refreshed while held)."""

    redis: Redis
    keys: Keys
    metrics: Metrics
    max_connections: int
    per_user: int
    slot_ttl_s: int
    retry_after_s: int
    prefix: str = "api"
    open: int = 0
    held: dict[str, Slot] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._acquire = register(self.redis, ACQUIRE)
        self._refresh = register(self.redis, REFRESH)

    async def acquire(self, user_id: str | None) -> Slot:
        if self.max_connections > 0 and self.open >= self.max_connections:
            self.metrics.limited.labels("sse_connections").inc()
            raise Full(f"this instance serves its maximum of {self.max_connections} SSE streams")
        slot = Slot(self, user_id, f"{self.prefix}:{next(self._ids)}")
        self.open += 1
        try:
            if user_id is not None and self.per_user > 0:
                taken = await self._acquire(
                    keys=[self.keys.stream_slots(user_id)],
                    args=[self.slot_ttl_s * 1000, self.per_user, slot.member],
                )
                if not int(taken):
                    self.metrics.limited.labels("streams_per_user").inc()
                    raise Limited(
                        f"stream limit: {self.per_user} open streams per user",
                        self.retry_after_s,
                    )
                self.held[slot.member] = slot
        except BaseException:
            slot.released = True
            self.open -= 1
            raise
        return slot

    async def release(self, slot: Slot) -> None:
        self.open -= 1
        if self.held.pop(slot.member, None) is not None and slot.user_id is not None:
            # shielded: this runs while the SSE response's task group is being cancelled
            # (the client went away); unshielded, the ZREM would be cancelled with it
            with anyio.move_on_after(2, shield=True):
                try:
                    await self.redis.zrem(self.keys.stream_slots(slot.user_id), slot.member)
                except Exception as e:  # the slot expires by itself within slot_ttl_s
                    log.warning("could not free a stream slot: %s", e)

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop(), name="stream-slots")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.slot_ttl_s / 3))
            slots = [s for s in self.held.values() if s.user_id is not None]
            if not slots:
                continue
            by_user: dict[str, list[str]] = {}
            for s in slots:
                by_user.setdefault(s.user_id or "", []).append(s.member)
            try:  # one script per user: each user's key is in a slot of its own
                async with self.redis.pipeline(transaction=False) as pipe:
                    for user_id, members in by_user.items():
                        keys = [self.keys.stream_slots(user_id)] * len(members)
                        args: list[str | int] = [self.slot_ttl_s * 1000, *members]
                        await self._refresh(keys=keys, args=args, client=pipe)
                    await pipe.execute()
            except Exception as e:
                log.warning("could not refresh stream slots: %s", e)
