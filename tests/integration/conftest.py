"""Fixtures of the integration tests: clients on the real broker and Redis, in the test's
namespace (the shared `settings`, `topics`, `redis` fixtures of tests/conftest.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from ai_consumer.handler import Handler
from ai_consumer.llm.factory import make_provider
from ai_consumer.registry import Registry
from ai_consumer.sink import Sink
from ai_consumer.tombstones import Tombstones
from chatpipe.clients import make_admin, make_producer
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State
from chatpipe.topics import topic_specs


async def wait_visible(settings: Settings, names: list[str]) -> None:
    """Until the broker's metadata lists every topic (aiokafka's own metadata wait, bounded
    by the request timeout)."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for name in names:
            await producer.partitions_for(name)
    finally:
        await producer.stop()


async def delete_topics(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    with contextlib.suppress(Exception):
        await admin.delete_topics([t.name for t in topic_specs(settings)])


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    client = make_admin(settings)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def producer(topics: Settings) -> AsyncIterator[AIOKafkaProducer]:
    """The product's producer (acks=all, idempotent) on this test's topics."""
    p = make_producer(topics)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def handler(topics: Settings, redis: Redis) -> AsyncIterator[Handler]:
    """The ai_consumer's handler as its service builds it (the simulated model), on this
    test's topics and keys."""
    producer = make_producer(topics)
    await producer.start()
    provider = make_provider(topics)
    state = State(redis, topics)
    metrics = Metrics()
    sink = Sink(state, producer, topics, metrics)
    sink.start()

    async def send_tombstone(key: bytes) -> object:
        return await producer.send(topics.cancels_topic, None, key=key)

    tombstones = Tombstones(send_tombstone)
    try:
        yield Handler(topics, state, sink, tombstones, provider, Registry(), metrics)
    finally:
        await tombstones.close()
        await sink.stop()
        await provider.aclose()
        await producer.stop()
