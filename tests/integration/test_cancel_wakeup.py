"""The cancel wake-up (ai_consumer/wakeup.py) on a real Redis: a cancel the api publishes
reaches every subscribed ai_consumer at once, as the ChatCancel its interrupt callback takes;
a malformed wake-up is skipped without stopping the subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import orjson
from redis.asyncio import Redis

from ai_consumer.wakeup import CancelWakeup
from chatpipe.keys import Keys
from chatpipe.schemas import ChatCancel
from chatpipe.settings import Settings

TIMEOUT = 5


@contextlib.asynccontextmanager
async def running(wakeup: CancelWakeup) -> AsyncIterator[None]:
    task = asyncio.create_task(wakeup.run())
    try:
        async with asyncio.timeout(TIMEOUT):
            await wakeup.subscribed.wait()
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def api_payload(session_id: str, message_id: str, at: float) -> bytes:
    """What api/service.py ChatService._wake_streamer publishes."""
    return orjson.dumps({"s": session_id, "m": message_id, "at": at})


async def test_every_subscriber_gets_the_cancel_as_a_chat_cancel(
    settings: Settings, redis: Redis
) -> None:
    channel = Keys.from_settings(settings).cancel_wakeup()
    got: list[asyncio.Queue[ChatCancel]] = [asyncio.Queue(), asyncio.Queue()]
    first = CancelWakeup(redis, channel, got[0].put_nowait)
    second = CancelWakeup(redis, channel, got[1].put_nowait)
    at = time.time()
    async with running(first), running(second):
        assert await redis.publish(channel, api_payload("s-1", "m-1", at)) == 2
        for queue in got:
            async with asyncio.timeout(TIMEOUT):
                cancel = await queue.get()
            assert (cancel.session_id, cancel.message_id) == ("s-1", "m-1")
            assert abs(cancel.requested_at.timestamp() - at) < 0.001


async def test_a_malformed_wake_up_is_skipped_and_the_next_one_arrives(
    settings: Settings, redis: Redis
) -> None:
    channel = Keys.from_settings(settings).cancel_wakeup()
    got: asyncio.Queue[ChatCancel] = asyncio.Queue()
    wakeup = CancelWakeup(redis, channel, got.put_nowait)
    async with running(wakeup):
        await redis.publish(channel, b"not json")
        await redis.publish(channel, orjson.dumps({"m": "no session"}))
        await redis.publish(channel, api_payload("s-2", "m-2", time.time()))
        async with asyncio.timeout(TIMEOUT):
            cancel = await got.get()
        assert cancel.message_id == "m-2"
        assert got.empty()
