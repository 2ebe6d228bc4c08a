"""Issue 4, fault 5: 500 queued requests against one consumer with max_concurrent_streams=50.

The requests are in chat.requests before the consumer starts (a backlog, produced straight to
Kafka as another frontend would). Watched from outside the process while it works through them:
- streams at once: the `chat:msg:{id}` states in Redis, sampled every ~50 ms. A message is
  `streaming` from its claim to its terminal event, both inside its lane's slot, so the count
  of `streaming` states never exceeds the streams the process runs. The samples must also see
  the bound reached (asserted), which shows they are fine enough to see it crossed.
- records taken in: a request produced straight to Kafka has no state until the consumer takes
  it, so "has a state and is not final" counts the records buffered in its lanes; bounded by
  MAX_BUFFERED_RECORDS (100 here), the partitions paused meanwhile (its log says so).
- memory: VmRSS from /proc/<pid>/status, sampled.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from chatpipe.schemas import rfc3339, utcnow
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, ClusterShape
from tests.e2e.faults.consumer_support import (
    FINAL,
    kafka_checks,
    states,
    wait_assigned,
)
from tests.e2e.records import foreign_producer, read_responses
from tests.support.cluster import Cluster, new_session
from tests.support.wait import apoll

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

REQUESTS = 500
LIMIT = 50
BUFFER = 100
TOKENS = 4


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    # 4 tokens at 150 ms after 100 ms: ~0.55 s answers, 10 rounds of 50
    return {
        **DEFAULT_ENV,
        "sim_tokens": TOKENS,
        "sim_token_delay_ms": 150,
        "sim_first_token_delay_ms": 100,
        "max_concurrent_streams": LIMIT,
        "max_buffered_records": BUFFER,
    }


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """No process yet: the test fills the topic, then starts the one consumer."""
    return ClusterShape(apis=0, consumers=0, listener=False)


def rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


async def test_500_queued_requests_never_run_more_than_50_at_once(
    cluster: Cluster, settings: Settings, redis: Redis
) -> None:
    sessions = [new_session() for _ in range(REQUESTS)]
    ids = [f"m-{uuid.uuid4().hex}" for _ in range(REQUESTS)]
    async with foreign_producer(settings) as producer:
        sent = [
            await producer.send(
                settings.requests_topic,
                json.dumps(
                    {
                        "schema_version": 1,
                        "type": "chat.request",
                        "message_id": m,
                        "session_id": s,
                        "user_id": "u-load",
                        "message": "queued",
                        "created_at": rfc3339(utcnow()),
                    }
                ).encode(),
                key=s.encode(),
            )
            for m, s in zip(ids, sessions, strict=True)
        ]
        await asyncio.gather(*sent)

    consumer = cluster.spawn("ai_consumer", "ai-capacity")
    samples: list[tuple[int, int, int]] = []  # (streaming, taken in and not final, VmRSS KiB)

    pending = set(ids)  # not final yet: a final state never changes, so it is not sampled again

    async def sample() -> bool | None:
        assert consumer.alive(), consumer.tail()
        now = await states(redis, settings, pending)
        rss = rss_kib(consumer.pid) or 0
        streaming = sum(v == "streaming" for v in now.values())
        taken = sum(v not in FINAL and v != "" for v in now.values())
        samples.append((streaming, taken, rss))
        pending.difference_update(m for m, v in now.items() if v in FINAL)
        return None if pending else True

    await wait_assigned(consumer, set(range(settings.topic_partitions)), within=30)
    # 10 rounds of ~1 s at the bound, on a shared machine: generous deadline
    await apoll("all 500 requests final", sample, within=120, interval=0.05)

    peak_streaming = max(s[0] for s in samples)
    peak_taken = max(s[1] for s in samples)
    assert peak_streaming <= LIMIT, f"{peak_streaming} streams at once"
    # the bound was reached (so a consumer over it would have been seen): most of the run
    # has 50 running; 40 leaves headroom for samples between two rounds on a busy machine
    assert peak_streaming >= 40, f"never near the bound: peak {peak_streaming}"
    assert peak_taken <= BUFFER, f"{peak_taken} records taken in at once (bound {BUFFER})"
    assert consumer.find(lambda r: str(r.get("msg", "")).startswith("paused fetching"))
    assert consumer.find(lambda r: str(r.get("msg", "")).startswith("resumed fetching"))
    # memory: what 100 buffered records and 50 streams cost stays small; the first sample is
    # taken once the consumer is assigned and has started taking records in. 64 MiB of growth
    # is far above what this needs and far below what holding the backlog in memory would
    rss = [s[2] for s in samples if s[2]]
    assert max(rss) - rss[0] < 64 * 1024, f"VmRSS grew from {rss[0]} to {max(rss)} KiB"

    assert set((await states(redis, settings, ids)).values()) == {"completed"}
    seen = await read_responses(
        settings,
        set(sessions),
        lambda evs: sum(e.get("type") == "chat.completed" for e in evs) >= REQUESTS,
        within=30,
    )
    for m in ids:
        kafka_checks(m, seen)
    assert consumer.alive()
