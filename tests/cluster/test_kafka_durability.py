"""Issue 13: chatpipe's topics on a real 3-broker Kafka: replication factor 3 and
min.insync.replicas 2 by default, and an acks=all write still acked with one broker killed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from chatpipe.clients import make_admin, make_producer
from chatpipe.settings import Settings
from chatpipe.topics import ensure_topics, topic_specs
from tests.cluster.conftest import ClusterStack
from tests.support.wait import apoll

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster_settings(cluster_stack: ClusterStack) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        kafka_bootstrap_servers=cluster_stack.bootstrap,
        topic_prefix=f"c{uuid.uuid4().hex[:8]}.",
    )


@pytest.fixture
async def admin(cluster_settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    client = make_admin(cluster_settings)
    await client.start()
    try:
        yield client
    finally:
        await client.delete_topics([t.name for t in topic_specs(cluster_settings)])
        await client.close()


async def test_topics_get_three_replicas_two_in_sync_and_survive_a_killed_broker(
    cluster_stack: ClusterStack, cluster_settings: Settings, admin: AIOKafkaAdminClient
) -> None:
    # a broker another test killed may still be registering: the default replication factor
    # follows the brokers registered (3 when there are 3)
    async def three_brokers() -> bool | None:
        return True if len((await admin.describe_cluster())["brokers"]) == 3 else None

    await apoll("3 Kafka brokers registered", three_brokers, within=120, interval=0.5)
    report = await ensure_topics(admin, cluster_settings)
    assert sorted(report.created) == sorted(t.name for t in topic_specs(cluster_settings))
    for topic in await admin.describe_topics(report.created):
        assert all(len(p["replicas"]) == 3 for p in topic["partitions"]), topic
    again = await ensure_topics(admin, cluster_settings)  # the drift check agrees
    assert sorted(again.unchanged) == sorted(report.created)

    producer = make_producer(cluster_settings)
    await producer.start()
    try:
        cluster_stack.kill("kafka-2")  # kill -9: one of three replicas gone
        for i in range(12):  # every partition, whichever its leader was
            await producer.send_and_wait(
                cluster_settings.requests_topic, b"{}", key=f"s-{i}".encode(), partition=i
            )
    finally:
        await producer.stop()
        cluster_stack.start("kafka-2")
