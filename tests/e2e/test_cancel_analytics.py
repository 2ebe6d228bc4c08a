"""Issue 14, cancel analytics: every cancelled message is counted by its phase (queued,
silence, streaming) and its source (api, kafka, session, interrupt) on the ai_consumer that
ends it, with the tokens produced before the stop; 2 api + 3 ai_consumer, real processes.

The simulator waits 2 s before its first token here, so "silence" (the answer started, no
token yet) is a window a test can hit: the message is seen `streaming` in Redis first.
"""

from __future__ import annotations

import uuid
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from chatpipe.keys import Keys, cancel_record_key
from chatpipe.schemas import ChatCancel
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.e2e.records import foreign_producer
from tests.support.cluster import Cluster, new_session
from tests.support.keys import msg_key
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

TOKENS = 60  # 2 s of silence, then 6 s of tokens: wide windows for every phase


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "sim_tokens": TOKENS,
        "sim_token_delay_ms": 100,
        "sim_first_token_delay_ms": 2000,
    }


async def consumer_metrics(cluster: Cluster) -> tuple[Counter[tuple[str, str]], float]:
    """chatpipe_cancels_total by (phase, source) and the tokens counted, over every consumer."""
    counts: Counter[tuple[str, str]] = Counter()
    tokens = 0.0
    async with httpx.AsyncClient(timeout=10) as http:
        for proc in cluster.consumer_procs:
            text = (await http.get(proc.metrics_url)).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "chatpipe_cancels_total":
                        key = (sample.labels["phase"], sample.labels["source"])
                        counts[key] += int(sample.value)
                    elif sample.name == "chatpipe_cancel_tokens_sum":
                        tokens += sample.value
    return counts, tokens


async def state_of(redis: Redis, keys: Keys, message_id: str, wanted: bytes) -> bytes:
    async def reached() -> bytes | None:
        state = await redis.hget(await msg_key(redis, keys, message_id), "state")
        return state if state == wanted else None

    return await apoll(f"{message_id} {wanted.decode()}", reached, within=30)


async def test_cancels_are_counted_by_phase_and_source(
    cluster: Cluster, apis: tuple[Api, Api], redis: Redis, settings: Settings
) -> None:
    a, b = apis
    keys = Keys.from_settings(settings)
    before, tokens_before = await consumer_metrics(cluster)

    # api, streaming: stopped after some tokens; api, queued: waiting behind it
    session = new_session()
    streaming = (await a.chat(session))["message_id"]
    queued = (await a.chat(session))["message_id"]
    async with a.stream(streaming) as stream:
        first = await stream.take(3, within=20)
        assert [e.event for e in first] == ["chunk"] * 3
        # the queued one first: once the streaming one ends, its lane claims the next at once
        assert (await b.cancel(session, queued)).status_code == 200
        assert (await b.cancel(session, streaming)).status_code == 200
    for m in (streaming, queued):
        await state_of(redis, keys, m, b"cancelled")

    # api, silence: started, no token yet
    quiet_session = new_session()
    quiet = (await a.chat(quiet_session))["message_id"]
    await state_of(redis, keys, quiet, b"streaming")
    assert (await b.cancel(quiet_session, quiet)).status_code == 200
    await state_of(redis, keys, quiet, b"cancelled")

    # kafka: a chat.cancel record alone (as a Spring frontend sends it), while queued
    kafka_session = new_session()
    busy = (await a.chat(kafka_session))["message_id"]
    waiting = (await a.chat(kafka_session))["message_id"]
    async with foreign_producer(settings) as producer:
        record = ChatCancel(session_id=kafka_session, message_id=waiting)
        key = cancel_record_key(kafka_session, waiting).encode()
        await producer.send_and_wait(settings.cancels_topic, record.to_json(), key=key)

    async def mirrored() -> bool | None:  # the listeners set its flag; it ends behind `busy`
        return (
            True if await redis.hget(keys.msg(kafka_session, waiting), "cancel_requested") else None
        )

    await apoll("the Kafka cancel to be mirrored", mirrored, within=15)

    # session: stop all (the busy one, in silence or streaming by now); interrupt
    assert (await b.client.post(f"/api/sessions/{kafka_session}/cancel")).status_code == 200
    for m in (busy, waiting):
        await state_of(redis, keys, m, b"cancelled")
    int_session = new_session()
    interrupted = (await a.chat(int_session))["message_id"]
    body = {"session_id": int_session, "message": "this instead", "if_busy": "interrupt"}
    assert (
        await b.client.post("/api/chat", json={**body, "message_id": uuid.uuid4().hex})
    ).status_code == 202
    await state_of(redis, keys, interrupted, b"cancelled")

    async def counted() -> Counter[tuple[str, str]] | None:
        now, _ = await consumer_metrics(cluster)
        new = now - before
        return new if sum(new.values()) >= 6 else None

    new = await apoll("the six cancels to be counted", counted, within=20)
    assert new[("streaming", "api")] == 1, new
    assert new[("queued", "api")] == 1, new
    assert new[("silence", "api")] == 1, new
    assert new[("queued", "kafka")] == 1, new
    assert sum(n for (_, source), n in new.items() if source == "session") == 1, new
    assert sum(n for (_, source), n in new.items() if source == "interrupt") == 1, new
    assert sum(new.values()) == 6, new
    _, tokens_after = await consumer_metrics(cluster)
    assert tokens_after - tokens_before >= 3  # the streaming one had produced 3 at least
