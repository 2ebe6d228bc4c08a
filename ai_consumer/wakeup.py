"""Cancel wake-ups over Redis Pub/Sub: the api publishes each accepted cancel, and every
ai_consumer hands it to `on_cancel` at once (the one streaming the message interrupts it, also
while the model is silent). Only a wake-up: a message lost here (Redis away, reconnecting) is
still stopped by its flag on the next chunk and by the chat.cancels record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from redis.asyncio import Redis

from chatpipe.schemas import ChatCancel

log = logging.getLogger(__name__)


class CancelWakeup:
    def __init__(self, redis: Redis, channel: str, on_cancel: Callable[[ChatCancel], None]) -> None:
        self.redis = redis
        self.channel = channel
        self.on_cancel = on_cancel
        self.subscribed = asyncio.Event()  # set while subscribed (tests wait on it)

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.subscribed.set()
                    backoff = 0.1
                    async for message in pubsub.listen():
                        self._handle(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cancel wake-ups interrupted, resubscribing in %.1fs: %s", backoff, e)
            self.subscribed.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _handle(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        try:
            item = orjson.loads(data)
            cancel = ChatCancel(
                session_id=item["s"],
                message_id=item["m"],
                requested_at=datetime.fromtimestamp(float(item["at"]), UTC),
            )
        except Exception as e:
            log.warning("ignored a malformed cancel wake-up: %s", e)
            return
        self.on_cancel(cancel)
