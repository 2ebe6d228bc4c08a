"""Getting past a record that aiokafka itself cannot decode.

aiokafka decodes every header name as UTF-8 while it fetches (Kafka header names are strings,
but a producer can write any bytes). One record whose header name is not UTF-8 makes every
`getmany()` raise UnicodeDecodeError, again and again: without this, all partitions of that
consumer stop (and the records the failed call had already decoded before the bad one would
be skipped silently on the next call). Found while fuzzing (docs/security.md "Fuzzing").

`isolate()` rewinds each partition to its consumed position, then reads partition by partition,
one record at a time, up to the record that fails: the caller gets the readable records read on
the way (to handle as usual) and where the unreadable one is (to dead-letter by offset and
skip with `seek(offset + 1)`). Only records of a batch that holds such a record are affected;
records after it in the same producer batch fail the same way and are skipped one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

DECODE_ERRORS = (UnicodeDecodeError,)
MAX_READ = 500  # readable records collected per call; the caller's loop gets the rest


@dataclass
class Isolated:
    readable: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = field(default_factory=dict)
    bad: tuple[TopicPartition, int] | None = None  # the unreadable record's partition, offset
    error: str = ""


async def isolate(
    consumer: AIOKafkaConsumer, limit: int = MAX_READ, probe_ms: int = 200
) -> Isolated:
    paused = consumer.paused()
    partitions = sorted(
        (tp for tp in consumer.assignment() if tp not in paused),
        key=lambda tp: (tp.topic, tp.partition),
    )
    for tp in partitions:  # refetch what the failed call decoded and dropped
        consumer.seek(tp, await consumer.position(tp))
    out = Isolated()
    taken = 0
    for tp in partitions:
        while taken < limit:
            try:
                batch = await consumer.getmany(tp, timeout_ms=probe_ms, max_records=1)
            except DECODE_ERRORS as e:
                out.bad = (tp, await consumer.position(tp))
                out.error = f"{type(e).__name__}: {e}"
                return out
            records = batch.get(tp, [])
            if not records:
                break
            out.readable.setdefault(tp, []).extend(records)
            taken += len(records)
    return out
