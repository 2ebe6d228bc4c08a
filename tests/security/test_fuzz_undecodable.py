"""A record the Kafka client itself cannot decode must not stop the consumer (issue 7,
must-show 5; found while fuzzing the record parser).

aiokafka decodes header names as UTF-8 while fetching, so a record with the header name
b"\\xff\\xfe" (kcat, or any non-Java producer, can write one) made every getmany() raise: the
ai_consumer stopped taking requests on every partition it owned, and the cancel listener never
finished its replay. Here such a record sits on every partition of chat.requests and
chat.cancels before real ai_consumer and api processes start: the cancel listeners still finish
their replay, a chat is still answered to the end, and each poisoned request is in the DLQ by
offset with its reason.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from chatpipe.clients import make_consumer
from chatpipe.settings import Settings
from tests.e2e.conftest import cluster_settings, ns  # noqa: F401
from tests.e2e.conftest import cluster_topics as cluster_topics
from tests.support.cluster import Cluster
from tests.support.sse import SSEStream
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

BAD_NAME = b"\xff\xfe"


def kcat_poison(bootstrap: str, topic: str, partition: int, value: bytes) -> None:
    subprocess.run(
        # bytes arguments: a str would be encoded as UTF-8 and the name would be valid
        [
            b"kcat",
            b"-P",
            b"-b",
            bootstrap.encode(),
            b"-t",
            topic.encode(),
            b"-p",
            b"%d" % partition,
            b"-k",
            b"poison",
            b"-H",
            BAD_NAME + b"=x",
        ],
        input=value,
        check=True,
        timeout=30,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def poisoned(cluster_topics: Settings) -> Settings:
    """Every partition of the requests and cancels topics starts with an undecodable record."""
    s = cluster_topics
    request = orjson.dumps({"message_id": "poison-m", "session_id": "poison-s", "message": "x"})
    cancel = orjson.dumps({"message_id": "poison-m", "session_id": "poison-s"})
    for p in range(s.topic_partitions):
        kcat_poison(s.kafka_bootstrap_servers, s.requests_topic, p, request)
        kcat_poison(s.kafka_bootstrap_servers, s.cancels_topic, p, cancel)
    return s


@pytest.fixture(scope="module")
def cluster(poisoned: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {"sim_tokens": 5, "sim_token_delay_ms": 10, "rate_limit_per_minute": 0}
    workdir = tmp_path_factory.mktemp("undecodable")
    # wait_ready requires every cancel listener to log its finished replay: the poisoned
    # chat.cancels must not keep it from that
    with Cluster(poisoned, workdir, apis=1, consumers=1, listener=True, env=env).running(
        timeout=90
    ) as running:
        yield running


async def dlq_records(settings: Settings, want: int) -> list[Any]:
    consumer = make_consumer(settings, settings.dlq_topic, group_id=None)
    await consumer.start()
    got: list[Any] = []
    try:

        async def enough() -> list[Any] | None:
            batch = await consumer.getmany(timeout_ms=500)
            got.extend(r for rs in batch.values() for r in rs)
            return got if len(got) >= want else None

        return await apoll(f"{want} DLQ records", enough, within=60)
    finally:
        await consumer.stop()


async def test_an_undecodable_record_neither_stops_the_consumer_nor_the_listener(
    cluster: Cluster, poisoned: Settings
) -> None:
    api = cluster.api_procs[0]
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        # one chat per partition's worth of sessions: some land behind a poisoned record
        accepted = []
        for i in range(6):
            response = await client.post(
                "/api/chat", json={"session_id": f"after-poison-{i}", "message": "hi"}
            )
            assert response.status_code == 202, response.text
            accepted.append(response.json())

        async def finished(stream_url: str) -> str:
            async with SSEStream(client, stream_url) as stream:
                events = await stream.until_done(within=45)
            return str(events[-1].json()["status"])

        statuses = await asyncio.gather(*(finished(a["stream_url"]) for a in accepted))
    assert statuses == ["completed"] * len(accepted)

    dlq = await dlq_records(poisoned, poisoned.topic_partitions)
    undecodable = [r for r in dlq if dict(r.headers).get("dlq-kind") == b"undecodable"]
    assert len(undecodable) == poisoned.topic_partitions  # each poisoned request, once
    first = dict(undecodable[0].headers)
    assert first["dlq-source-topic"] == poisoned.requests_topic.encode()
    assert first["dlq-source-offset"] == b"0"
    assert b"header name is not UTF-8" in first["dlq-reason"]

    for proc in cluster.consumer_procs + cluster.listener_procs:
        assert proc.find(lambda d: "cannot be decoded, skipped" in str(d.get("msg"))), proc.name
        assert proc.alive(), proc.tail()
