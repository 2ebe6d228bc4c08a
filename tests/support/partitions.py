"""Where chatpipe's producers put a key: aiokafka's default partitioner (murmur2), the same
as Kafka's Java client, so a test can aim records at a partition."""

from __future__ import annotations

from aiokafka.partitioner import murmur2

from tests.support.cluster import new_session


def partition_of(key: str, partitions: int) -> int:
    return int((murmur2(key.encode()) & 0x7FFFFFFF) % partitions)


def sessions_on(partition: int, partitions: int, n: int) -> list[str]:
    """`n` new sessions whose records land on `partition`."""
    found: list[str] = []
    while len(found) < n:
        session = new_session()
        if partition_of(session, partitions) == partition:
            found.append(session)
    return found


def one_session_per_partition(partitions: int) -> list[str]:
    """A new session for each partition, in partition order."""
    return [sessions_on(p, partitions, 1)[0] for p in range(partitions)]
