"""Readiness: can this process reach Kafka and Redis right now (bounded, cached briefly)."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from chatpipe.clients import ProducerHandle
from chatpipe.redact import redact_text


class Readiness:
    def __init__(self, redis: Redis, producer: ProducerHandle, timeout_s: float = 2.0) -> None:
        self.redis = redis
        self.producer = producer
        self.timeout_s = timeout_s
        self._cached: tuple[float, dict[str, str]] | None = None

    async def _probe(self, name: str, aw: object) -> str:
        try:
            async with asyncio.timeout(self.timeout_s):
                await aw  # type: ignore[misc]
        except TimeoutError:
            return f"no answer within {self.timeout_s:g}s"
        except Exception as e:
            # the cause as an operator needs it (a refused login says so), URL passwords masked
            return redact_text(f"{type(e).__name__}: {e}")[:300]
        return "ok"

    async def _kafka(self) -> None:
        await self.producer.get().client.fetch_all_metadata()

    async def check(self) -> dict[str, str]:
        now = time.monotonic()
        if self._cached and now - self._cached[0] < 0.5:
            return self._cached[1]
        redis, kafka = await asyncio.gather(
            self._probe("redis", self.redis.ping()),
            self._probe("kafka", self._kafka()),
        )
        result = {"redis": redis, "kafka": kafka}
        self._cached = (now, result)
        return result
