"""ai_consumer/takeover.py: no stream is taken over until Redis has answered promptly for one
LEASE_MS after a lookup that failed (a Redis failover lapses the leases of owners that are
alive: they re-take them meanwhile). With Redis healthy, a lapsed lease is taken at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

from redis.exceptions import ConnectionError as RedisConnectionError

from ai_consumer.handler import Handler
from ai_consumer.registry import Registry
from ai_consumer.takeover import Takeover
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatRequest
from chatpipe.settings import Settings
from chatpipe.state import State

LEASE_MS = 300


class FakeState:
    """Redis as the takeover sees it: down until `up` is set, then one lapsed lease."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.failures = 0
        self.failed_thrice = asyncio.Event()
        self.request = ChatRequest(message_id="m1", session_id="s1", message="hi").to_json()

    async def lapsed(self, limit: int) -> list[tuple[str, str]]:
        if not self.up.is_set():
            self.failures += 1
            if self.failures >= 3:
                self.failed_thrice.set()
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:27002.")
        return [("s1", "m1")]

    async def takeover_request(self, session_id: str, message_id: str) -> bytes:
        return self.request


class FakeHandler:
    def __init__(self) -> None:
        self.taken: list[tuple[str, float]] = []
        self.took = asyncio.Event()

    async def handle(self, req: ChatRequest, takeover: bool = False) -> str:
        self.taken.append((req.message_id, asyncio.get_running_loop().time()))
        self.took.set()
        await asyncio.sleep(3600)  # sleep-ok: a stream that runs until the test ends
        return "completed"


def takeover(state: FakeState, handler: FakeHandler) -> Takeover:
    settings = Settings(_env_file=None, lease_ms=LEASE_MS, takeover_interval_ms=10)
    return Takeover(settings, cast(State, state), cast(Handler, handler), Registry(), Metrics())


async def until_taken(handler: FakeHandler, within: float) -> float:
    async with asyncio.timeout(within):
        await handler.took.wait()
    return handler.taken[0][1]


async def run_with(
    state: FakeState, handler: FakeHandler, body: Callable[[], Awaitable[None]]
) -> None:
    subject = takeover(state, handler)
    stopping = asyncio.Event()
    task = asyncio.create_task(subject.run(stopping))
    try:
        await body()
    finally:
        stopping.set()
        await task
        await subject.stop(0)


async def test_a_lapsed_lease_is_taken_at_once_while_redis_answers() -> None:
    state, handler = FakeState(), FakeHandler()
    state.up.set()
    loop = asyncio.get_running_loop()

    async def body() -> None:
        started = loop.time()
        taken = await until_taken(handler, within=5)
        assert taken - started < LEASE_MS / 1000, taken - started

    await run_with(state, handler, body)


async def test_after_redis_was_away_no_lease_is_taken_for_one_lease() -> None:
    state, handler = FakeState(), FakeHandler()
    loop = asyncio.get_running_loop()

    async def body() -> None:
        async with asyncio.timeout(5):
            await state.failed_thrice.wait()
        assert not handler.taken
        up_at = loop.time()
        state.up.set()
        taken = await until_taken(handler, within=5)
        assert taken - up_at >= LEASE_MS / 1000, taken - up_at
        assert taken - up_at < 3 * LEASE_MS / 1000, taken - up_at

    await run_with(state, handler, body)
