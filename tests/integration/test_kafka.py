"""The topics on a real broker: keyed partitioning, configs as the design says, group split."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from chatpipe.clients import make_consumer
from chatpipe.settings import Settings

TIMEOUT = 30

# Kafka's own reference values for murmur2 (clients UtilsTest.testMurmur2): the Java producer
# of the Spring frontend puts key k on partition (murmur2(k) & 0x7fffffff) % partitions. Ours
# must agree, or one session's messages would be split across partitions (and reordered).
JAVA_MURMUR2 = {"21": -973932308, "foobar": -790332482, "a-little-bit-long-string": -985981536}


def java_partition(key: str, partitions: int) -> int:
    return (JAVA_MURMUR2[key] & 0x7FFFFFFF) % partitions


async def read_all(
    consumer: AIOKafkaConsumer, expected: int
) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """(partition, offset, key, value) of `expected` records, fetched with a deadline."""
    out: list[tuple[int, int, bytes | None, bytes | None]] = []
    async with asyncio.timeout(TIMEOUT):
        while len(out) < expected:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                out += [(tp.partition, r.offset, r.key, r.value) for r in records]
    return out


async def test_records_keyed_by_session_stay_on_one_partition_in_order(
    topics: Settings, producer: AIOKafkaProducer
) -> None:
    sessions = [*JAVA_MURMUR2, *(f"s-{i}" for i in range(21))]
    per_session = 5
    sent_on: dict[str, set[int]] = defaultdict(set)
    for n in range(per_session):
        futures = [
            (s, await producer.send(topics.requests_topic, f"{s}#{n}".encode(), key=s.encode()))
            for s in sessions
        ]
        for s, fut in futures:
            sent_on[s].add((await fut).partition)

    consumer = make_consumer(topics, group_id=None)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topics.requests_topic, p) for p in range(12)])
        await consumer.seek_to_beginning()
        records = await read_all(consumer, len(sessions) * per_session)
    finally:
        await consumer.stop()

    assert len(records) == len(sessions) * per_session
    received: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for partition, offset, key, value in records:
        assert key is not None
        assert value is not None
        received[key.decode()].append((partition, offset, value.decode()))
    for s in sessions:
        got = sorted(received[s], key=lambda r: r[1])
        assert len({p for p, _, _ in got}) == 1, f"{s} split over partitions: {got}"
        assert {got[0][0]} == sent_on[s]
        assert [v for _, _, v in got] == [f"{s}#{n}" for n in range(per_session)]
    for session in JAVA_MURMUR2:
        assert received[session][0][0] == java_partition(session, 12), session
    used = {rs[0][0] for rs in received.values()}
    assert len(used) >= 6, f"24 sessions landed on only {sorted(used)}"


async def describe(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, tuple[int, dict[str, str]]]:
    meta = await admin.describe_topics(names)
    partitions = {t["topic"]: len(t["partitions"]) for t in meta if t["error_code"] == 0}
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    ):
        for error_code, _message, _type, name, entries in response.resources:
            assert error_code == 0, name
            configs[name] = {e[0]: e[1] for e in entries}
    return {n: (partitions[n], configs[n]) for n in names}


async def test_topics_have_the_designed_partitions_and_cleanup_policies(
    topics: Settings, admin: AIOKafkaAdminClient
) -> None:
    t = topics
    actual = await describe(
        admin, [t.requests_topic, t.cancels_topic, t.responses_topic, t.dlq_topic]
    )
    assert actual[t.cancels_topic][1]["cleanup.policy"] == "compact"
    for name in (t.requests_topic, t.responses_topic, t.dlq_topic):
        assert actual[name][1]["cleanup.policy"] == "delete", name
    assert {n: p for n, (p, _) in actual.items()} == {
        t.requests_topic: 12,
        t.cancels_topic: 12,
        t.responses_topic: 12,
        t.dlq_topic: 1,
    }


class Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, changed: asyncio.Event) -> None:
        self.changed = changed

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.changed.set()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.changed.set()


async def test_a_group_of_three_splits_the_twelve_partitions(topics: Settings) -> None:
    changed = asyncio.Event()
    members = [
        make_consumer(topics, group_id=topics.consumer_group, client_id=f"member-{i}")
        for i in range(3)
    ]

    async def poll(consumer: AIOKafkaConsumer) -> None:
        while True:
            await consumer.getmany(timeout_ms=200)

    pollers: list[asyncio.Task[None]] = []
    try:
        for consumer in members:
            await consumer.start()
            consumer.subscribe([topics.requests_topic], listener=Assigned(changed))
            pollers.append(asyncio.create_task(poll(consumer)))

        def split() -> list[set[int]]:
            return [{tp.partition for tp in c.assignment()} for c in members]

        def settled(parts: list[set[int]]) -> bool:
            union = set().union(*parts)
            return all(parts) and union == set(range(12)) and sum(map(len, parts)) == 12

        async with asyncio.timeout(TIMEOUT):
            while not settled(split()):
                await changed.wait()
                changed.clear()
        parts = split()
        for a in range(3):
            for b in range(a + 1, 3):
                assert not parts[a] & parts[b], parts
        assert sorted(len(p) for p in parts) == [4, 4, 4], parts
        assert not any(t.done() for t in pollers)
    finally:
        for t in pollers:
            t.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        for consumer in members:
            with contextlib.suppress(Exception):
                await consumer.stop()
