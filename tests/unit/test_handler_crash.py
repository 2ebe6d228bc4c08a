"""A bug met while handling one message (an exception nobody expected) ends that message
`failed` with one terminal event, marks its offset done, and the consumer goes on.

Fakes stand in for Redis and Kafka (the state scripts and the sink have their own tests); the
Handler, Worker, Lanes, Registry and PartitionOffsets are the real ones. The fake state only
records what the handler asks of it: what the real FINISH script makes of that request (the
message `failed` with its reason, one `done` after the last chunk) is tested on a real Redis in
tests/integration/test_state.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from aiokafka import TopicPartition

from ai_consumer.handler import Handler
from ai_consumer.lanes import Work
from ai_consumer.offsets import PartitionOffsets
from ai_consumer.registry import Registry
from ai_consumer.worker import Worker
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatMessage, ChatRequest
from chatpipe.settings import Settings
from chatpipe.state import Claim, Finish

TP = TopicPartition("chat.requests", 0)
TIMEOUT = 5


class FakeRedis:
    def __init__(self) -> None:
        self.streams: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}

    async def xrevrange(self, key: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return list(reversed(self.streams.get(key, [])))[:count]


class FakeState:
    """Records the handler's `finish` requests and grants each (a new message's claim starts
    it; its finish ends it as asked): no state of its own."""

    def __init__(self, claim_error: Exception | None = None) -> None:
        self.redis = FakeRedis()
        self.keys = Keys("")
        self.claim_error = claim_error
        self.finished: list[dict[str, Any]] = []

    async def claim(self, message_id: str, *args: Any) -> Claim:
        if self.claim_error is not None:
            raise self.claim_error
        return Claim("start")

    async def finish(
        self,
        message_id: str,
        session_id: str,
        instance_id: str,
        wanted: str,
        reason: str,
        seq: int,
        now: str,
        epoch: str = "",
        chunks: int = 0,
        message: str = "",
        answer: str = "",
        completion_tokens: int | None = None,
        prompt_tokens: int | None = None,
    ) -> Finish:
        self.finished.append(
            {"message_id": message_id, "state": wanted, "reason": reason, "seq": seq}
        )
        return Finish(wanted, reason, "1-0")

    async def published(self, session_id: str, message_id: str, instance_id: str) -> None:
        return None

    async def history(self, session_id: str) -> list[Any]:
        return []

    async def next_seq(self, session_id: str, message_id: str) -> int:
        last = await self.redis.xrevrange(self.keys.stream(session_id, message_id), count=1)
        return int(last[0][1][b"s"]) + 1 if last else 0

    async def answer_so_far(self, session_id: str, message_id: str) -> str:
        return ""


class FakeSink:
    coalescing = False  # one emit per token

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.published: list[dict[str, Any]] = []

    async def emit(self, out: Any) -> int:
        key = self.state.keys.stream(out.session_id, out.message_id)
        entries = self.state.redis.streams.setdefault(key, [])
        entries.append((f"{len(entries) + 1}-0".encode(), {b"s": str(out.seq).encode()}))
        return 0  # written

    async def publish(
        self, key: str, kafka_type: str, value: dict[str, Any], tp: Any = None
    ) -> None:
        self.published.append(value)


class BuggyProvider:
    """Two tokens, then an exception no provider is supposed to raise."""

    async def stream(
        self, request: ChatRequest, messages: Sequence[ChatMessage], usage: object = None
    ) -> AsyncIterator[str]:
        yield "a"
        yield " b"
        raise KeyError("bug")

    async def aclose(self) -> None:
        return None


def build(state: FakeState) -> tuple[Handler, FakeSink, Registry]:
    settings = Settings(instance_id="test-1", lease_ms=1000)
    sink = FakeSink(state)
    registry = Registry()
    handler = Handler(
        settings,
        cast(Any, state),
        cast(Any, sink),
        cast(Any, None),
        BuggyProvider(),
        registry,
        Metrics(),
    )
    return handler, sink, registry


def request(message_id: str = "m-1") -> ChatRequest:
    return ChatRequest(message_id=message_id, session_id="s-1", message="hi")


async def test_a_crash_mid_stream_ends_the_message_failed_after_its_last_chunk() -> None:
    state = FakeState()
    handler, sink, registry = build(state)
    async with asyncio.timeout(TIMEOUT):
        outcome = await handler.handle(request())
    assert outcome == "failed"
    # started (seq 0), two chunks (1, 2): the terminal event follows them with seq 3
    assert state.finished == [
        {"message_id": "m-1", "state": "failed", "reason": "internal error (KeyError)", "seq": 3}
    ]
    assert [(e["type"], e["seq"]) for e in sink.published] == [("chat.failed", 3)]
    assert registry.running == {}


async def test_a_crash_before_the_claim_ends_the_message_failed_too() -> None:
    state = FakeState(claim_error=ValueError("unexpected reply"))
    handler, sink, _ = build(state)
    async with asyncio.timeout(TIMEOUT):
        assert await handler.handle(request()) == "failed"
    assert [(e["type"], e["seq"]) for e in sink.published] == [("chat.failed", 0)]


class ExplodingHandler:
    """A handler whose crash even the failed-ending could not catch."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def handle(
        self, req: ChatRequest, traceparent: str | None = None, refused: str | None = None
    ) -> str:
        self.calls.append(req.message_id)
        if req.message_id == "poison":
            raise RuntimeError("bug")
        return "completed"


def worker(handler: Any) -> Worker:
    settings = Settings(instance_id="test-1")
    return Worker(
        settings,
        cast(Any, None),
        cast(Any, None),
        cast(Any, None),
        handler,
        Registry(),
        Metrics(),
    )


async def test_the_worker_marks_a_crashed_message_done_and_goes_on() -> None:
    handler = ExplodingHandler()
    w = worker(handler)
    book = w.offsets[TP] = PartitionOffsets()
    for offset, message_id in enumerate(["poison", "next"]):
        book.add(offset)
        w.lanes.submit(Work(TP, offset, request(message_id), None, book))
    async with asyncio.timeout(TIMEOUT):
        await w.lanes.wait_idle()
    assert handler.calls == ["poison", "next"]
    assert book.committable() == 2  # the poison record no longer holds the partition back


async def test_work_of_an_earlier_assignment_does_not_touch_the_new_one() -> None:
    handler = ExplodingHandler()
    w = worker(handler)
    old = PartitionOffsets()
    old.add(7)
    new = w.offsets[TP] = PartitionOffsets()  # revoked and assigned again; 7 redelivered
    new.add(7)
    w.lanes.submit(Work(TP, 7, request("m-7"), None, old))
    async with asyncio.timeout(TIMEOUT):
        await w.lanes.wait_idle()
    # the redelivered copy of offset 7 has not run yet: the new assignment may not commit it
    assert new.committable() == 7
