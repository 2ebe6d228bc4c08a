"""The sink's batching with fakes for Redis and Kafka (the real ones are in tests/e2e): events
of one tick share one round trip; each emitter learns its own message's cancel flag; a Redis
failure reaches every emitter of the batch; an emitter cancelled meanwhile harms no other;
Kafka records leave in order, a terminal after its chunks, each with its headers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from ai_consumer.sink import CANCEL, WRITTEN, Outgoing, Sink, _Record
from chatpipe.codec import headers_for
from chatpipe.errors import Unavailable
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State


class FakeRedis:
    def __init__(self) -> None:
        self.flags: dict[str, bytes] = {}
        self.round_trips: list[list[Any]] = []
        self.calls: list[tuple[str, int]] = []  # (writer, call number) of each round trip
        self.down = False
        self.fail_next = 0  # round trips that fail before Redis is back (a blip)


class FakeState:
    """State.write against FakeRedis: one round trip per call, an answer per event (1 a cancel
    is requested, else 0 written)."""

    def __init__(self, keys: Keys, redis: FakeRedis) -> None:
        self.keys = keys
        self.redis = redis

    async def write(self, events: Sequence[Outgoing], writer: str, call: int) -> list[int]:
        ops = [
            (
                "write",
                self.keys.stream(e.session_id, e.message_id),
                {"e": e.sse_event, "s": e.seq, "d": orjson.dumps(e.sse_data)},
                self.keys.cancel(e.session_id, e.message_id),
            )
            for e in events
        ]
        self.redis.round_trips.append(ops)
        self.redis.calls.append((writer, call))
        await asyncio.sleep(0)  # sleep-ok: one loop step, as a real round trip yields
        if self.redis.down:
            raise ConnectionError("redis is away")
        if self.redis.fail_next:
            self.redis.fail_next -= 1
            raise ConnectionError("connection reset by peer")
        return [1 if self.redis.flags.get(op[3]) is not None else 0 for op in ops]


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        cluster = SimpleNamespace(partitions_for_topic=lambda topic: {0, 1, 2})
        self.client = SimpleNamespace(cluster=cluster)

    async def send(self, topic: str, value: bytes, **kw: Any) -> asyncio.Future[None]:
        assert type(kw["headers"]) is list  # aiokafka's record builder takes no other sequence
        self.sent.append({"topic": topic, "value": orjson.loads(value), **kw})
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(
        self, batch: FakeBatch, topic: str, partition: int
    ) -> asyncio.Future[None]:
        for record in batch.records:
            await self.send(topic, partition=partition, **record)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class FakeBatch:
    """aiokafka's BatchBuilder: `append` answers None once full (here: after 4 records)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, *, key: bytes, value: bytes, timestamp: None, headers: Any) -> object | None:
        if len(self.records) == 4:
            return None
        self.records.append({"key": key, "value": value, "headers": headers})
        return object()


def build(**settings_overrides: Any) -> tuple[Sink, FakeRedis, FakeProducer]:
    settings = Settings(**settings_overrides)
    redis, producer = FakeRedis(), FakeProducer()
    state = FakeState(Keys.from_settings(settings), redis)
    sink = Sink(
        cast(State, state),
        cast(AIOKafkaProducer, producer),
        settings,
        Metrics(),
    )
    return sink, redis, producer


def chunk(message_id: str, seq: int, traceparent: str | None = None) -> Outgoing:
    value = {"type": "chat.chunk", "message_id": message_id, "seq": seq}
    data = {"seq": seq, "delta": f" {seq}"}
    return Outgoing(
        message_id, f"s-{message_id}", "chunk", seq, data, "chat.chunk", value, traceparent
    )


async def test_a_tick_is_one_round_trip_and_each_emitter_gets_its_own_flag() -> None:
    sink, redis, producer = build()
    redis.flags[sink.keys.cancel("s-m2", "m2")] = b"1"
    sink.start()
    try:
        async with asyncio.timeout(5):
            results = await asyncio.gather(
                *(sink.emit(chunk(m, seq)) for seq in range(3) for m in ("m1", "m2", "m3"))
            )
            await sink._kafka.join()
    finally:
        await sink.stop(flush_timeout=1)
    assert results == [WRITTEN, CANCEL, WRITTEN] * 3
    assert len(redis.round_trips) == 1
    ops = redis.round_trips[0]
    assert [(op[1], op[2]["s"]) for op in ops] == [
        (sink.keys.stream(f"s-{m}", m), seq) for seq in range(3) for m in ("m1", "m2", "m3")
    ]
    # every record once; each partition's in the order emitted (Kafka's only order)
    sent = [(r["partition"], r["value"]["message_id"], r["value"]["seq"]) for r in producer.sent]
    assert sorted((m, seq) for _, m, seq in sent) == sorted(
        (m, seq) for seq in range(3) for m in ("m1", "m2", "m3")
    )
    for partition in {p for p, _, _ in sent}:
        mine = [(m, seq) for p, m, seq in sent if p == partition]
        assert mine == sorted(mine, key=lambda ms: (ms[1], ms[0]))


async def test_a_full_batch_leaves_and_the_next_record_opens_another_in_order() -> None:
    sink, _, producer = build()
    sink.start()
    try:
        async with asyncio.timeout(5):
            await asyncio.gather(*(sink.emit(chunk("m1", seq)) for seq in range(10)))
            await sink.publish("s-m1", "chat.completed", {"message_id": "m1", "seq": 10})
    finally:
        await sink.stop(flush_timeout=1)
    assert [r["value"]["seq"] for r in producer.sent] == list(range(11))


async def test_a_terminal_leaves_after_its_chunks_with_its_headers() -> None:
    sink, _, producer = build()
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sink.start()
    try:
        async with asyncio.timeout(5):
            for seq in range(4):
                assert await sink.emit(chunk("m1", seq, tp)) == WRITTEN
            await sink.publish("s-m1", "chat.completed", {"message_id": "m1", "seq": 4}, tp)
    finally:
        await sink.stop(flush_timeout=1)
    assert [r["value"]["seq"] for r in producer.sent] == [0, 1, 2, 3, 4]
    assert [list(r["headers"]) for r in producer.sent] == [headers_for("chat.chunk", tp)] * 4 + [
        headers_for("chat.completed", tp)
    ]
    assert {r["key"] for r in producer.sent} == {b"s-m1"}
    assert len({r["partition"] for r in producer.sent}) == 1


async def test_a_redis_blip_is_retried_and_every_emitter_gets_its_answer() -> None:
    sink, redis, producer = build(sink_redis_retry_s=5)
    redis.fail_next = 2
    sink.start()
    try:
        async with asyncio.timeout(5):
            results = await asyncio.gather(*(sink.emit(chunk(m, 0)) for m in ("m1", "m2")))
            await sink._kafka.join()
    finally:
        await sink.stop(flush_timeout=1)
    assert results == [WRITTEN, WRITTEN]
    assert len(redis.round_trips) == 3  # two lost, then the one that landed
    # sent again as the same call (Redis skips a call it ran, had the first one landed)
    assert len(set(redis.calls)) == 1
    assert sorted(r["value"]["message_id"] for r in producer.sent) == ["m1", "m2"]  # once each


async def test_redis_away_reaches_every_emitter_of_the_batch() -> None:
    sink, redis, producer = build(sink_redis_retry_s=0.2)  # gives up after 0.2 s of retries
    redis.down = True
    sink.start()
    try:
        async with asyncio.timeout(5):
            results = await asyncio.gather(
                *(sink.emit(chunk(m, 0)) for m in ("m1", "m2")), return_exceptions=True
            )
    finally:
        await sink.stop(flush_timeout=1)
    assert all(isinstance(r, Unavailable) for r in results)
    assert producer.sent == []


async def test_a_cancelled_emitter_leaves_the_others_of_its_batch_alone() -> None:
    sink, _, producer = build()
    sink.start()
    try:
        async with asyncio.timeout(5):
            doomed = asyncio.create_task(sink.emit(chunk("m1", 0)))
            kept = asyncio.create_task(sink.emit(chunk("m2", 0)))
            await asyncio.sleep(0)  # sleep-ok: one loop step (no waiting): both queued, not flushed
            doomed.cancel()
            assert await kept == WRITTEN
            with pytest.raises(asyncio.CancelledError):
                await doomed
            await sink._kafka.join()
    finally:
        await sink.stop(flush_timeout=1)
    assert sorted(r["value"]["message_id"] for r in producer.sent) == ["m1", "m2"]


class StalledProducer(FakeProducer):
    """A broker that is away: every send waits until `back` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.back = asyncio.Event()

    async def send(self, topic: str, value: bytes, **kw: Any) -> asyncio.Future[None]:
        await self.back.wait()
        return await super().send(topic, value, **kw)

    async def send_batch(
        self, batch: FakeBatch, topic: str, partition: int
    ) -> asyncio.Future[None]:
        await self.back.wait()
        return await super().send_batch(batch, topic, partition)


async def test_chunk_records_waiting_for_kafka_are_bounded_and_terminals_still_leave() -> None:
    settings = Settings(sink_kafka_max_pending=5)
    redis, producer = FakeRedis(), StalledProducer()
    metrics = Metrics()
    sink = Sink(
        cast(State, FakeState(Keys.from_settings(settings), redis)),
        cast(AIOKafkaProducer, producer),
        settings,
        metrics,
    )
    sink.start()
    try:
        async with asyncio.timeout(5):
            for seq in range(1, 21):  # SSE goes on: every emit is written to Redis
                assert await sink.emit(chunk("m1", seq)) == WRITTEN
            dropped = metrics.registry.get_sample_value(
                "chatpipe_sink_dropped_records_total", {"why": "full"}
            )
            # 20 = the one the Kafka task holds (its send waits) + 5 waiting + the dropped
            assert sink._queued == 5
            assert dropped in (14, 15)
            producer.back.set()
            await sink.publish("s-m1", "chat.completed", {"type": "chat.completed", "seq": 21})
    finally:
        await sink.stop(flush_timeout=1)
    seqs = [r["value"]["seq"] for r in producer.sent]
    assert seqs[-1] == 21  # the terminal, after the chunks that were kept, in order
    assert seqs == sorted(seqs)
    assert len(seqs) == 20 - dropped + 1


async def test_chunk_records_older_than_the_max_age_are_dropped_terminals_never() -> None:
    sink, _, _ = build(sink_chunk_max_age_s=30)
    now = asyncio.get_running_loop().time()
    old = _Record(b"k", b"old", [], checked_at=now - 60, chunk=True)
    started = _Record(b"k", b"started", [], checked_at=now - 60)  # chat.started: kept
    fresh = _Record(b"k", b"fresh", [], checked_at=now, chunk=True)
    terminal = _Record(b"k", b"done", [], delivered=asyncio.get_running_loop().create_future())
    sink._queued = 2
    assert sink._fresh([old, started, fresh, terminal]) == [started, fresh, terminal]
    assert sink._queued == 0


async def test_held_tokens_of_a_message_are_one_chunk_and_the_answer_reaches_the_stream() -> None:
    """COALESCE_MS: tokens held for one message leave as one Redis entry and one record (seq
    of the first, `count`, deltas joined); hold() does not wait; the answer (here: a cancel
    requested) reaches the stream's callback; another message's tokens are their own chunk."""
    sink, redis, producer = build(coalesce_ms=20)
    redis.flags[sink.keys.cancel("s-m1", "m1")] = b"1"
    answers: dict[str, asyncio.Future[int]] = {}
    loop = asyncio.get_running_loop()
    for m in ("m1", "m2"):
        answers[m] = loop.create_future()

    def answered(m: str) -> Any:
        return lambda done: answers[m].set_result(done.result())

    sink.start()
    try:
        async with asyncio.timeout(5):
            for seq in (1, 2, 3):
                sink.hold(chunk("m1", seq), answered("m1"))  # returns at once
            sink.hold(chunk("m2", 1), answered("m2"))
            assert redis.round_trips == []  # held, not written yet
            assert await answers["m1"] == CANCEL  # written once the window passed
            assert await answers["m2"] == WRITTEN
            assert await sink.release("m1") == WRITTEN  # nothing held any more
            await sink._kafka.join()
    finally:
        await sink.stop(flush_timeout=1)
    written = [op[2] for trip in redis.round_trips for op in trip]
    assert [orjson.loads(w["d"]) for w in written] == [
        {"seq": 1, "delta": " 1 2 3", "count": 3},
        {"seq": 1, "delta": " 1"},
    ]
    assert [(r["value"]["seq"], r["value"].get("count")) for r in producer.sent] == [
        (1, 3),
        (1, None),
    ]


async def test_release_writes_a_held_chunk_at_once_and_answers_it() -> None:
    sink, redis, _ = build(coalesce_ms=60_000)  # the window never passes in this test
    sink.start()
    try:
        async with asyncio.timeout(5):
            sink.hold(chunk("m1", 1), lambda done: None)
            sink.hold(chunk("m1", 2), lambda done: None)
            assert await sink.release("m1") == WRITTEN
    finally:
        await sink.stop(flush_timeout=1)
    assert [op[2]["s"] for trip in redis.round_trips for op in trip] == [1]
