"""The CancelListener on the real compacted topic and Redis: replay on start, live cancels,
garbage records skipped, and a replay when Redis comes back empty.

The listener writes the flags of a batch in one pipeline after handing each cancel to
`on_cancel`. To wait for that write without polling, `mirrored()` wraps the listener's
`_mirror` and reports each completed write on a queue."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError

from cancel_listener.listener import CancelListener
from cancel_listener.sweeper import Seen
from chatpipe.clients import make_consumer, make_producer, make_redis
from chatpipe.keys import cancel_record_key, session_cancel_record_key, split_record_key
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatCancel, ChatSessionCancel
from chatpipe.settings import Settings
from chatpipe.state import State

TIMEOUT = 20
A = "instance-a"
NOW = "2024-05-01T10:00:00.000000Z"
TTLS = {"cancel_ttl_s": 60, "cancel_queued_ttl_s": 7200}


@pytest.fixture
def conf(make_settings: Callable[..., Settings], topics: Settings) -> Settings:
    return make_settings(**TTLS)


@pytest.fixture
def state(conf: Settings, redis: Redis) -> State:
    return State(redis, conf)


Mirrored = asyncio.Queue[tuple[str, list[str]]]


@contextlib.asynccontextmanager
async def running_listener(
    settings: Settings,
    redis: Redis,
    state: State,
    seen: list[ChatCancel],
    records: list[bytes] | None = None,
) -> AsyncIterator[tuple[CancelListener, Mirrored, asyncio.Task[None]]]:
    consumer = make_consumer(settings, group_id=None)
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    listener = CancelListener(
        settings,
        consumer,
        redis,
        state,
        Metrics(),
        producer,
        on_cancel=seen.append,
        on_record=None if records is None else records.append,
    )
    done: Mirrored = asyncio.Queue()
    original = listener._mirror

    async def spy(seen: list[Seen], source: str) -> list[ChatCancel]:
        allowed = await original(seen, source)
        done.put_nowait((source, [getattr(s.cancel, "message_id", "") for s in seen]))
        return allowed

    listener._mirror = spy  # type: ignore[method-assign]
    task = asyncio.create_task(listener.run(), name="listener")
    try:
        yield listener, done, task
    finally:
        listener.request_stop()
        try:
            async with asyncio.timeout(TIMEOUT):
                await task  # re-raises if the listener died
        finally:
            await consumer.stop()
            await producer.stop()


async def cancel(
    producer: AIOKafkaProducer,
    topic: str,
    session_id: str,
    message_id: str,
    reason: str = "stop",
    partition: int | None = None,
) -> None:
    value = ChatCancel(session_id=session_id, message_id=message_id, reason=reason).to_json()
    key = cancel_record_key(session_id, message_id).encode()
    await producer.send_and_wait(topic, value, key=key, partition=partition)


async def tombstone(
    producer: AIOKafkaProducer, topic: str, session_id: str, message_id: str
) -> None:
    key = cancel_record_key(session_id, message_id).encode()
    await producer.send_and_wait(topic, None, key=key)


async def flags(redis: Redis, settings: Settings) -> set[str]:
    """message ids with a cancel flag in this test's namespace (key layout 2: every flag is
    `chat:{<bucket>}:cancel:<session>:<message>`, in its session's bucket)."""
    prefix = f"{settings.key_prefix}chat:"
    flag = re.compile(r"\{\d+\}:cancel:(.*)")
    found = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
    return {
        split_record_key(m.group(1))[1]
        for k in found
        if (m := flag.fullmatch(k.decode()[len(prefix) :]))
    }


async def wait_mirrored(done: Mirrored, message_id: str) -> str:
    """The source ("live"/"replay") of the flag write that included `message_id`."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            source, ids = await done.get()
            if message_id in ids:
                return source


async def test_replay_on_start_restores_flags_of_live_cancels_only(
    conf: Settings, redis: Redis, state: State, producer: AIOKafkaProducer
) -> None:
    topic = conf.cancels_topic
    # messages in every state the replay meets
    await state.accept("m-queued", "s-1", "u", NOW)
    await state.accept("m-streaming", "s-2", "u", NOW)
    assert (await state.claim("m-streaming", "s-2", "u", A, NOW)).outcome == "start"
    await state.accept("m-done", "s-3", "u", NOW)
    assert (await state.claim("m-done", "s-3", "u", A, NOW)).outcome == "start"
    await state.finish("m-done", "s-3", A, "completed", "", 5, NOW)
    # the topic: plain cancels, duplicates of one key, cancels tombstoned since, garbage
    await cancel(producer, topic, "s-1", "m-queued")
    await cancel(producer, topic, "s-2", "m-streaming")
    await cancel(producer, topic, "s-3", "m-done")  # final in Redis, tombstone not written yet
    await cancel(producer, topic, "s-4", "m-spring-only")  # request not consumed by anyone yet
    for reason in ("click 1", "click 2", "click 3"):
        await cancel(producer, topic, "s-5", "m-dup", reason)
    await cancel(producer, topic, "s-6", "m-tomb-1")
    await tombstone(producer, topic, "s-6", "m-tomb-1")
    await cancel(producer, topic, "s-7", "m-tomb-2")
    await cancel(producer, topic, "s-7", "m-tomb-2", "again")
    await tombstone(producer, topic, "s-7", "m-tomb-2")
    await producer.send_and_wait(topic, b"not json at all", key=b"s-8:m-garbage")

    seen: list[ChatCancel] = []
    records: list[bytes] = []
    async with running_listener(conf, redis, state, seen, records) as (listener, _, task):
        async with asyncio.timeout(TIMEOUT):
            await listener.replayed.wait()
        assert await flags(redis, conf) == {"m-queued", "m-streaming", "m-spring-only", "m-dup"}
        # every key whose record is still in the topic (tombstoned ones not), garbage included:
        # an ai_consumer tombstones a cancel only once it knows its record is in
        assert sorted(records) == [
            b"s-1:m-queued",
            b"s-2:m-streaming",
            b"s-3:m-done",
            b"s-4:m-spring-only",
            b"s-5:m-dup",
            b"s-8:m-garbage",
        ]
        keys = state.keys
        assert 7100 < await redis.ttl(keys.cancel("s-1", "m-queued")) <= 7200
        assert 0 < await redis.ttl(keys.cancel("s-2", "m-streaming")) <= 60
        assert 7100 < await redis.ttl(keys.cancel("s-4", "m-spring-only")) <= 7200
        assert listener.replays == 1
        assert seen == []  # replayed cancels only flag; on_cancel is for live records
        assert not task.done()


async def test_live_cancel_reaches_on_cancel_and_sets_the_flag(
    conf: Settings, redis: Redis, state: State, producer: AIOKafkaProducer
) -> None:
    seen: list[ChatCancel] = []
    records: list[bytes] = []
    async with running_listener(conf, redis, state, seen, records) as (listener, done, task):
        async with asyncio.timeout(TIMEOUT):
            await listener.replayed.wait()
        assert await flags(redis, conf) == set()
        await state.accept("m-1", "s-1", "u", NOW)
        await cancel(producer, conf.cancels_topic, "s-1", "m-1", "user clicked stop")
        assert await wait_mirrored(done, "m-1") == "live"
        assert records == [b"s-1:m-1"]
        assert [(c.session_id, c.message_id, c.reason) for c in seen] == [
            ("s-1", "m-1", "user clicked stop")
        ]
        assert await state.check_cancel_flag("s-1", "m-1")
        assert 7100 < await redis.ttl(state.keys.cancel("s-1", "m-1")) <= 7200
        # the listener's cancel is kept in the message: the api's next click is a repeat of it
        # (which the api answers "cancelled", docs/contract.md)
        assert await state.cancel("s-1", "m-1") == "repeated"
        assert not task.done()


async def test_a_session_cancel_undone_by_its_tombstone_leaves_no_mark(
    conf: Settings, redis: Redis, state: State, producer: AIOKafkaProducer
) -> None:
    """`DELETE /api/sessions/{id}` publishes the stop's chat.session_cancel record, removes
    every key of the session, then tombstones the record. A listener that reads both only
    after the removal must not leave the session's cancel mark behind (for an hour)."""
    topic = conf.cancels_topic
    key = session_cancel_record_key("s-del").encode()
    partitions = sorted(await producer.partitions_for(topic))
    partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
    seen: list[ChatCancel] = []
    async with running_listener(conf, redis, state, seen) as (listener, done, _):
        async with asyncio.timeout(TIMEOUT):
            await listener.replayed.wait()
        record = ChatSessionCancel(session_id="s-del").to_json()
        await producer.send_and_wait(topic, record, key=key, partition=partition)
        await producer.send_and_wait(topic, None, key=key, partition=partition)
        # read after both, in the same partition: the listener has applied them
        await cancel(producer, topic, "s-other", "m-after", partition=partition)
        await wait_mirrored(done, "m-after")
    assert await redis.exists(state.keys.session_cancelled("s-del")) == 0


async def test_garbage_records_are_skipped_and_the_listener_goes_on(
    conf: Settings, redis: Redis, state: State, producer: AIOKafkaProducer
) -> None:
    topic = conf.cancels_topic
    seen: list[ChatCancel] = []
    async with running_listener(conf, redis, state, seen) as (listener, done, task):
        async with asyncio.timeout(TIMEOUT):
            await listener.replayed.wait()
        # all on one partition, so the good record after them is read after them
        p = 3
        for value in (
            b"not json",
            b"\xff\xfe\xfd",
            b"[1, 2, 3]",
            b'{"sessionId": "s-1"}',
            b'{"sessionId": "s 1", "messageId": "m/1"}',
            b"{}" * 10,
        ):
            await producer.send_and_wait(topic, value, key=b"junk", partition=p)
        # (a record without a key cannot exist here: the broker refuses it on a compacted topic)
        await producer.send_and_wait(topic, None, key=b"s-1:m-gone", partition=p)  # tombstone
        await cancel(producer, topic, "s-1", "m-good", partition=p)
        assert await wait_mirrored(done, "m-good") == "live"
        assert [c.message_id for c in seen] == ["m-good"]
        assert await flags(redis, conf) == {"m-good"}
        assert not task.done()
        # and it keeps going
        await cancel(producer, topic, "s-2", "m-after", partition=p)
        assert await wait_mirrored(done, "m-after") == "live"
        assert [c.message_id for c in seen] == ["m-good", "m-after"]


async def test_flags_come_back_when_redis_comes_back_empty(
    conf: Settings, redis: Redis, state: State, producer: AIOKafkaProducer
) -> None:
    """Redis restarting empty shows as a new run_id. The shared Redis must not be flushed, so
    the test deletes this test's flags and makes the listener believe the server it replayed
    into was another one (the run_id it remembered), then waits for the replay it triggers."""
    topic = conf.cancels_topic
    await cancel(producer, topic, "s-1", "m-1")
    await cancel(producer, topic, "s-2", "m-2")
    await tombstone(producer, topic, "s-2", "m-2")
    seen: list[ChatCancel] = []
    async with running_listener(conf, redis, state, seen) as (listener, done, task):
        async with asyncio.timeout(TIMEOUT):
            await listener.replayed.wait()
        await cancel(producer, topic, "s-3", "m-3")  # a live one, after the first replay
        await wait_mirrored(done, "m-3")
        assert await flags(redis, conf) == {"m-1", "m-3"}

        await redis.delete(state.keys.cancel("s-1", "m-1"), state.keys.cancel("s-3", "m-3"))
        assert await flags(redis, conf) == set()
        listener.replayed.clear()
        listener._redis_run_ids = frozenset({"run-id-of-the-redis-that-died"})
        async with asyncio.timeout(TIMEOUT):
            await listener.replayed.wait()
        assert listener.replays == 2
        assert await flags(redis, conf) == {"m-1", "m-3"}
        assert not task.done()


async def test_a_redis_blip_during_a_live_batch_loses_no_flag(
    conf: Settings, redis: Redis, producer: AIOKafkaProducer
) -> None:
    flaky = make_redis(conf, max_connections=4)
    failed = asyncio.Event()
    real_pipeline = flaky.pipeline

    def pipeline(transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = real_pipeline(transaction=transaction, shard_hint=shard_hint)
        real_execute = pipe.execute

        async def execute(raise_on_error: bool = True) -> list[Any]:
            if not failed.is_set():
                failed.set()
                raise RedisConnectionError("Connection reset by peer (injected)")
            return await real_execute(raise_on_error)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    flaky.pipeline = pipeline  # type: ignore[method-assign]
    state = State(flaky, conf)
    topic = conf.cancels_topic
    seen: list[ChatCancel] = []
    try:
        async with running_listener(conf, flaky, state, seen) as (listener, done, task):
            async with asyncio.timeout(TIMEOUT):
                await listener.replayed.wait()
            await cancel(producer, topic, "s-1", "m-1", partition=0)  # its write fails
            async with asyncio.timeout(TIMEOUT):
                await failed.wait()
            await cancel(producer, topic, "s-1", "m-2", partition=0)  # Redis answers again
            await wait_mirrored(done, "m-2")
            assert not task.done()
            assert await flags(redis, conf) == {"m-1", "m-2"}
    finally:
        await flaky.aclose(close_connection_pool=True)
