"""Kafka helpers for the e2e tests: read chat.responses as a Spring frontend would, and produce
records straight to the topics as another team's producer would."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from chatpipe.schemas import TERMINAL_TYPES
from chatpipe.settings import Settings

Event = dict[str, Any]


def terminal(events: list[Event], message_id: str | None = None) -> list[Event]:
    return [
        e
        for e in events
        if e.get("type") in TERMINAL_TYPES
        and (message_id is None or e.get("message_id") == message_id)
    ]


def of_message(events: list[Event], message_id: str) -> list[Event]:
    return [e for e in events if e.get("message_id") == message_id]


async def reader(settings: Settings) -> AIOKafkaConsumer:
    """A started consumer without a group that reads from the beginning (the caller stops it)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    return consumer


async def read_responses(
    settings: Settings,
    keys: Collection[str],
    until: Callable[[list[Event]], bool],
    within: float = 20.0,
) -> list[Event]:
    """The events on chat.responses whose record key is one of `keys`, read from the beginning
    of the topic: first until `until(events)` holds (SSEError-like AssertionError after
    `within` seconds), then on up to the end offsets of that moment, so a second terminal event that
    is already in the topic is seen too."""
    wanted = {k.encode() for k in keys}
    consumer = await reader(settings)
    events: list[Event] = []

    def take(batch: dict[TopicPartition, list[Any]]) -> None:
        for records in batch.values():
            for r in records:
                if r.key in wanted and r.value is not None:
                    value = json.loads(r.value)
                    value["_key"] = r.key.decode()
                    value["_partition"] = r.partition
                    value["_headers"] = {k: v.decode() for k, v in r.headers or ()}
                    events.append(value)

    try:
        topic = settings.responses_topic
        # ensure_topics created it with exactly this many partitions (it raises on drift)
        parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        try:
            async with asyncio.timeout(within):
                while not until(events):
                    take(await consumer.getmany(timeout_ms=200, max_records=5000))
        except TimeoutError:
            kinds = [(e.get("type"), e.get("message_id")) for e in events][-10:]
            raise AssertionError(
                f"{topic}: condition not met within {within:g}s; {len(events)} events for "
                f"keys {sorted(keys)[:3]}..., last {kinds}"
            ) from None
        end = await consumer.end_offsets(parts)
        async with asyncio.timeout(within):
            while True:
                behind = [tp for tp in parts if await consumer.position(tp) < end[tp]]
                if not behind:
                    break
                take(await consumer.getmany(*behind, timeout_ms=200, max_records=5000))
        return events
    finally:
        await consumer.stop()


async def latest_cancels(settings: Settings, within: float = 20.0) -> dict[str, bytes | None]:
    """The latest value of each key on chat.cancels (None: a tombstone), read from the
    beginning up to the end offsets of now: what the compacted topic will keep."""
    consumer = await reader(settings)
    latest: dict[str, bytes | None] = {}
    try:
        parts = [
            TopicPartition(settings.cancels_topic, p) for p in range(settings.topic_partitions)
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        async with asyncio.timeout(within):
            while behind := [tp for tp in parts if await consumer.position(tp) < end[tp]]:
                for records in (await consumer.getmany(*behind, timeout_ms=200)).values():
                    for r in records:
                        if r.key is not None:
                            latest[r.key.decode()] = r.value
        return latest
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def foreign_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    """A plain producer (acks=all), standing in for another team's, e.g. Spring's KafkaTemplate."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()
