"""Issue 12, item 2: no record stops a consumer, also one whose dead letter cannot be written whole.

chat.requests and chat.requests.dlq both take records up to `max.message.bytes` (10 MiB,
chatpipe/topics.py). A request of 10 MiB minus 300 bytes fits its topic, but its dead letter
(the same bytes plus the dlq-* headers) does not fit the DLQ: the broker refuses it with
MESSAGE_TOO_LARGE. The consumer must stay up, write a reference instead (source topic,
partition, offset and the reason, in headers; the bytes stay in the source topic), count it,
and answer the next request of the same partition.

A real ai_consumer process and the real broker; the records are produced straight to Kafka,
as another team's producer would.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from chatpipe.settings import Settings
from chatpipe.topics import MAX_BYTES
from tests.e2e.conftest import ClusterShape
from tests.e2e.records import of_message, read_responses, terminal
from tests.support.cluster import Cluster, new_session

pytestmark = [pytest.mark.e2e]

OVERSIZED = int(MAX_BYTES) - 300  # under the topic's max.message.bytes; the DLQ copy is not
# what a Spring KafkaTemplate with Jackson and tracing writes
SPRING_HEADERS = [
    ("__TypeId__", b"com.example.chat.messaging.ChatRequestMessage"),
    ("contentType", b"application/json"),
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """One ai_consumer owning every partition: "it stays up" is about it."""
    return ClusterShape(apis=1, consumers=1, listener=False, ready_timeout=90)


def valid(session: str, message_id: str) -> bytes:
    return (
        b'{"schema_version":1,"type":"chat.request","message_id":"%s","session_id":"%s",'
        b'"message":"hello","options":{"max_tokens":3}}' % (message_id.encode(), session.encode())
    )


async def dlq_record(
    settings: Settings, source_offset: int, within: float = 30.0
) -> ConsumerRecord[bytes, bytes]:
    """The record of chat.requests.dlq whose dlq-source-offset is `source_offset`."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tp = TopicPartition(settings.dlq_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(within):
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for r in batch.get(tp, []):
                    if dict(r.headers).get("dlq-source-offset") == str(source_offset).encode():
                        return r
    finally:
        await consumer.stop()


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url)).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


async def test_a_dead_letter_too_large_for_the_dlq_is_written_as_a_reference_and_the_consumer_goes_on(
    cluster: Cluster, settings: Settings
) -> None:
    consumer = cluster.consumer_procs[0]
    pid = consumer.pid
    session = new_session()
    key = session.encode()
    oversized = b'{"pad": "' + b"x" * (OVERSIZED - 11) + b'"}'
    assert len(oversized) == OVERSIZED
    message_id = f"m-{uuid.uuid4().hex[:10]}"
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        max_request_size=11 * 1024 * 1024,
    )
    await producer.start()
    try:
        big = await producer.send_and_wait(
            settings.requests_topic, oversized, key=key, headers=SPRING_HEADERS
        )
        after = await producer.send_and_wait(
            settings.requests_topic, valid(session, message_id), key=key
        )
    finally:
        await producer.stop()
    assert big.partition == after.partition  # the valid one waits behind the oversized one

    try:
        seen = await read_responses(
            settings, {session}, lambda evs: bool(terminal(evs, message_id)), within=30
        )
    except AssertionError as e:
        raise AssertionError(
            f"{e}\nai_consumer alive: {consumer.alive()} (exit {consumer.returncode()})\n"
            f"{consumer.tail(15)}"
        ) from None
    assert [t["type"] for t in terminal(of_message(seen, message_id))] == ["chat.completed"]
    assert consumer.alive()
    assert consumer.pid == pid

    record = await dlq_record(settings, big.offset)
    headers = {k: v.decode(errors="replace") for k, v in record.headers}
    assert headers["dlq-source-topic"] == settings.requests_topic
    assert int(headers["dlq-source-partition"]) == big.partition
    assert headers["dlq-kind"] == "too_large"
    assert f"{OVERSIZED} bytes" in headers["dlq-reason"], headers
    assert int(headers["dlq-value-omitted"]) == OVERSIZED, headers  # a reference: the bytes
    assert record.value == b""  # stay in the source
    assert record.key == key
    # counted where an operator looks
    assert await metric(consumer.metrics_url, 'chatpipe_dlq_degraded_total{how="reference"}') == 1
