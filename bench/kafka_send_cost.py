"""Client CPU per chat.responses record, `send()` one by one against one batch per partition
(`create_batch`/`send_batch`), on the real broker (issue 16: the sink's Kafka path).

Both with the ai_consumer's producer settings (idempotent, acks=all, linger 20 ms), a
12-partition topic made for the run (deleted after), a chat.chunk record of the usual size.

    python -m bench.kafka_send_cost [--kafka 127.0.0.1:9092] [--records 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

PARTITIONS = 12
PER_PASS = 500  # records per sink pass (a few loop ticks' worth at n=200)
VALUE = (
    b'{"schema_version":1,"type":"chat.chunk","message_id":"m-123456","session_id":"s-1234",'
    b'"seq":17,"delta":" token","at":"2024-05-01T10:00:00.000000Z","instance_id":"ai-1"}'
)
HEADERS = [("type", b"chat.chunk"), ("schema_version", b"1")]


async def one_by_one(producer: AIOKafkaProducer, topic: str, records: int) -> None:
    futures = []
    for i in range(records):
        key = b"s-%d" % (i % 200)
        fut = await producer.send(topic, VALUE, key=key, partition=i % PARTITIONS, headers=HEADERS)
        futures.append(fut)
        if i % PER_PASS == PER_PASS - 1:
            await asyncio.sleep(0)  # sleep-ok: yield to the sender, as the sink's loop does
    await asyncio.gather(*futures)


async def batched(producer: AIOKafkaProducer, topic: str, records: int) -> None:
    futures = []
    for start in range(0, records, PER_PASS):
        batches: dict[int, Any] = {}
        for i in range(start, min(start + PER_PASS, records)):
            batch = batches.get(i % PARTITIONS)
            if batch is None:
                batch = batches[i % PARTITIONS] = producer.create_batch()
            batch.append(key=b"s-%d" % (i % 200), value=VALUE, timestamp=None, headers=HEADERS)
        for partition, batch in batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*futures)


async def run(kafka: str, records: int) -> None:
    topic = f"bench-send-cost-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka,
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        await producer.partitions_for(topic)
        steps: list[tuple[str, Callable[[AIOKafkaProducer, str, int], Awaitable[None]]]] = [
            ("send() one by one", one_by_one),
            ("batch per partition", batched),
        ]
        for name, step in steps * 2:
            cpu0 = time.process_time()
            await step(producer, topic, records)
            cpu = time.process_time() - cpu0
            print(
                f"{name:20s} {records} records: client CPU {cpu / records * 1e6:5.1f} us per record"
            )
    finally:
        await producer.stop()
        await admin.delete_topics([topic])
        await admin.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kafka", default="127.0.0.1:9092")
    ap.add_argument("--records", type=int, default=50_000)
    a = ap.parse_args()
    asyncio.run(run(a.kafka, a.records))


if __name__ == "__main__":
    main()
