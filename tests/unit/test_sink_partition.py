"""The sink picks the partition of each chat.responses record itself (the murmur2 hash of the
session key, cached per key): it must be the partition Kafka's default partitioner picks, so
a session's records keep landing where every Kafka client (Java included) expects them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from ai_consumer.sink import Sink
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State


def sink_with(partitions: set[int] | None) -> Sink:
    cluster = SimpleNamespace(partitions_for_topic=lambda topic: partitions)
    producer = cast(AIOKafkaProducer, SimpleNamespace(client=SimpleNamespace(cluster=cluster)))
    settings = Settings()
    return Sink(cast(State, None), producer, settings, Metrics())


@pytest.mark.parametrize("count", [1, 3, 12, 50])
def test_the_partition_is_the_default_partitioners(count: int) -> None:
    sink = sink_with(set(range(count)))
    default: Any = DefaultPartitioner()
    for i in range(500):
        key = f"session-{i}-é".encode()
        expected = default(key, list(range(count)), list(range(count)))
        assert sink._partition(key) == expected
        assert sink._partition(key) == expected  # cached


def test_without_metadata_the_producer_partitions() -> None:
    assert sink_with(None)._partition(b"s-1") is None
