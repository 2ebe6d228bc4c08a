"""Java interop: a Spring Kafka producer and consumer (interop/java) against real chatpipe
processes. The Java side uses Spring's JSON (de)serializers with their default settings, with
Jackson 2 (`JsonSerializer`/`JsonDeserializer`, JavaTimeModule: numeric dates) and Jackson 3
(`JacksonJsonSerializer`/`JacksonJsonDeserializer`, Spring Kafka 4: ISO-8601 dates)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from redis.asyncio import Redis

from chatpipe.codec import headers_for
from chatpipe.keys import Keys
from chatpipe.schemas import (
    ChatCancelled,
    ChatChunk,
    ChatCompleted,
    ChatFailed,
    ChatStarted,
    Usage,
)
from chatpipe.settings import Settings
from tests.interop.contract_files import errors, model_accepts
from tests.interop.jvm import TERMINAL, Java
from tests.interop.stack import chatpipe_stack, headers_of, partitions_of, read_topic
from tests.support.sse import sse_events

pytestmark = pytest.mark.java

Event = ChatStarted | ChatChunk | ChatCompleted | ChatCancelled | ChatFailed
JACKSONS = [pytest.param(2, id="jackson2"), pytest.param(3, id="jackson3")]
Json = dict[str, Any]


def java_events(lines: list[Json]) -> list[Json]:
    """The `event` of every line the Java consumer printed; fails on a deserialization error."""
    failures = [line for line in lines if "error" in line]
    assert not failures, f"the Spring deserializer failed on: {failures}"
    return [line["event"] for line in lines]


async def check_spring_record(
    settings: Settings, topic: str, key: str, sent: Json, name: str, jackson: int
) -> Json:
    """The record the Java producer wrote, read back raw: Spring's defaults, valid per the
    contract, accepted by the model, and on the partition chatpipe's producer would choose."""
    records = [
        r
        for r in await read_topic(settings, topic)
        if r.key == key.encode() and r.value is not None
    ]
    assert len(records) == 1, records
    record = records[0]
    value: Json = json.loads(record.value)
    java_class = {"chat.request": "ChatRequest", "chat.session_cancel": "ChatSessionCancel"}.get(
        name, "ChatCancel"
    )
    assert headers_of(record) == {"__TypeId__": f"dev.chatpipe.interop.{java_class}"}
    assert sent["headers"] == headers_of(record)
    assert (record.partition, record.offset) == (sent["partition"], sent["offset"])
    # kafka-clients' and aiokafka's default partitioners agree (murmur2): a Spring producer and
    # the api put one session's messages on one partition, so per-session order holds
    parts = await partitions_of(settings, topic)
    assert DefaultPartitioner()(key.encode(), parts, parts) == record.partition
    date = value["createdAt" if name == "chat.request" else "requestedAt"]
    if jackson == 2:
        assert isinstance(date, float), value  # 1795880764.280322564: seconds.nanoseconds
    else:
        assert isinstance(date, str), value
        assert date.endswith("Z"), value  # 2026-11-28T15:46:06.757316577Z
    assert all(k[0].islower() and "_" not in k for k in value), value  # camelCase
    assert errors(name, value) == []
    assert model_accepts(name, value)
    return value


def check_event_fields(event: Json, prefix: str) -> None:
    """Every field the contract says is always written arrived in the Java object."""
    assert event["schemaVersion"] == 1
    for name in ("type", "messageId", "sessionId", "seq", "instanceId", "at", "atEpochNanos"):
        assert event[name] is not None, (name, event)
    assert event["instanceId"] == f"ai-{prefix}"
    if event["type"] == "chat.chunk":
        assert event["delta"] is not None
    if event["type"] in TERMINAL:
        assert event["usage"] is not None
        assert event["usage"]["completionTokens"] == event["usage"]["chunks"]


@pytest.mark.parametrize("jackson", JACKSONS)
async def test_a_spring_request_is_answered_to_a_spring_consumer(
    java: Java, topics: Settings, redis: Redis, tmp_path: Path, jackson: int
) -> None:
    settings = topics
    session_id, message_id = "s-spring", f"m-java-{jackson}"
    async with chatpipe_stack(settings, tmp_path, sim_tokens=20, sim_token_delay_ms=5) as stack:
        consumer = java.start_consumer([message_id], jackson=jackson, timeout_s=60)
        sent = await asyncio.to_thread(
            java.produce, "request", session_id, message_id, "--text", "hi", jackson=jackson
        )
        assert await consumer.wait_exit(90) == 0, consumer.tail()
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
            http.stream("GET", f"/api/chat/{message_id}/stream") as sse,
        ):
            browser = [e async for e in sse_events(sse)]

    lines = consumer.json_lines()
    events = java_events(lines)
    assert [e["type"] for e in events] == ["chat.started"] + ["chat.chunk"] * 20 + [
        "chat.completed"
    ]
    assert [e["seq"] for e in events] == list(range(22))
    for line, event in zip(lines, events, strict=True):
        assert line["javaClass"] == "dev.chatpipe.interop.ResponseEvent"
        assert line["key"] == session_id
        assert line["headers"] == {"content-type": "application/json", "event-type": event["type"]}
        assert (event["messageId"], event["sessionId"]) == (message_id, session_id)
        check_event_fields(event, settings.topic_prefix)
    # the simulator counts words: 20 answered, 1 given ("hi")
    assert events[-1]["usage"] == {"completionTokens": 20, "chunks": 20, "promptTokens": 1}
    assert events[-1]["reason"] is None
    assert events[0]["restart"] is None
    # the Spring consumer reads the same answer as the browser
    java_text = "".join(e["delta"] for e in events if e["type"] == "chat.chunk")
    assert java_text == "".join(e.json()["delta"] for e in browser if e.event == "chunk")
    assert browser[-1].event == "done"
    assert browser[-1].json()["status"] == "completed"

    await check_spring_record(
        settings, settings.requests_topic, session_id, sent, "chat.request", jackson
    )
    assert await read_topic(settings, settings.dlq_topic) == []


@pytest.mark.parametrize("jackson", JACKSONS)
async def test_a_spring_cancel_stops_a_spring_request(
    java: Java, topics: Settings, redis: Redis, tmp_path: Path, jackson: int
) -> None:
    settings = topics
    session_id, message_id = "s-spring", f"m-long-{jackson}"
    tokens = 2000  # 40 s at 20 ms a token: the cancel comes long before the end
    async with (
        chatpipe_stack(settings, tmp_path, sim_tokens=tokens, sim_token_delay_ms=20) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        consumer = java.start_consumer([message_id], jackson=jackson, timeout_s=60)
        await asyncio.to_thread(java.produce, "request", session_id, message_id, jackson=jackson)
        chunks: list[int] = []
        done: Json = {}
        sent: Json = {}
        async with asyncio.timeout(60), http.stream("GET", f"/api/chat/{message_id}/stream") as sse:
            assert sse.status_code == 200
            async for sse_event in sse_events(sse):
                if sse_event.event == "chunk":
                    chunks.append(sse_event.json()["seq"])
                    if len(chunks) == 3:
                        sent = await asyncio.to_thread(
                            java.produce, "cancel", session_id, message_id, jackson=jackson
                        )
                elif sse_event.event == "done":
                    done = sse_event.json()
                    break
        assert done["status"] == "cancelled", done
        assert sent, "the stream ended before the cancel was sent"
        assert chunks == sorted(set(chunks))
        assert len(chunks) < tokens
        assert await consumer.wait_exit(30) == 0, consumer.tail()
        state = await redis.hget(Keys.from_settings(settings).msg(session_id, message_id), "state")
        assert state == b"cancelled"

        # chatpipe tombstones the Spring cancel's own key: compaction can drop it
        cancel_key = f"{session_id}:{message_id}".encode()
        async with asyncio.timeout(20):
            while True:
                cancels = await read_topic(settings, settings.cancels_topic)
                if any(c.value is None and c.key == cancel_key for c in cancels):
                    break
                await asyncio.sleep(0.1)  # sleep-ok: poll interval, nothing to wait on

    events = java_events(consumer.json_lines())
    types = [e["type"] for e in events]
    assert types[0] == "chat.started"
    assert types[-1] == "chat.cancelled"
    assert set(types[1:-1]) <= {"chat.chunk"}
    assert [e["seq"] for e in events] == list(range(len(events)))
    for java_event in events:
        check_event_fields(java_event, settings.topic_prefix)
    last = events[-1]
    assert last["reason"] == "cancelled by user"
    assert last["usage"]["chunks"] == len(events) - 2
    # the browser saw every chunk the Spring consumer saw, up to the cancel, and nothing after
    assert len(chunks) == len(events) - 2

    live = [c for c in cancels if c.value is not None]
    assert [c.key for c in live] == [cancel_key]
    await check_spring_record(
        settings, settings.cancels_topic, cancel_key.decode(), sent, "chat.cancel", jackson
    )
    assert await read_topic(settings, settings.dlq_topic) == []


@pytest.mark.parametrize("jackson", JACKSONS)
async def test_a_spring_session_cancel_stops_the_streaming_and_the_queued_request(
    java: Java, topics: Settings, redis: Redis, tmp_path: Path, jackson: int
) -> None:
    """Issue 14: "stop all" from a Spring frontend, a `chat.session_cancel` record alone."""
    settings = topics
    session_id = f"s-spring:{jackson}"  # an id with `:`: the record's key is escaped
    streaming, queued = f"m-long-{jackson}", f"m-queued-{jackson}"
    keys = Keys.from_settings(settings)
    async with (
        chatpipe_stack(settings, tmp_path, sim_tokens=2000, sim_token_delay_ms=20) as stack,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
    ):
        for message_id in (streaming, queued):
            await asyncio.to_thread(
                java.produce, "request", session_id, message_id, jackson=jackson
            )
        sent: Json = {}
        async with asyncio.timeout(60), http.stream("GET", f"/api/chat/{streaming}/stream") as sse:
            async for sse_event in sse_events(sse):
                if sse_event.event == "chunk" and not sent:
                    sent = await asyncio.to_thread(
                        java.produce, "session-cancel", session_id, None, jackson=jackson
                    )
                elif sse_event.event == "done":
                    assert sse_event.json()["status"] == "cancelled", sse_event.json()
                    break
        async with asyncio.timeout(60), http.stream("GET", f"/api/chat/{queued}/stream") as sse:
            events = [e async for e in sse_events(sse)]
        assert [e.event for e in events] == ["done"]  # never started
        assert events[0].json()["status"] == "cancelled"
        assert await redis.hget(keys.msg(session_id, queued), "state") == b"cancelled"
    assert sent["key"] == "s-spring%3A" + str(jackson)
    value = await check_spring_record(
        settings, settings.cancels_topic, sent["key"], sent, "chat.session_cancel", jackson
    )
    assert value["type"] == "chat.session_cancel"
    assert await read_topic(settings, settings.dlq_topic) == []


def _at(n: int) -> datetime:
    return datetime(2025, 1, 2, 3, 4, 5, 678901 + n, tzinfo=UTC)


@pytest.mark.parametrize("jackson", JACKSONS)
async def test_every_event_type_deserialises_in_spring(
    java: Java, topics: Settings, jackson: int
) -> None:
    """chat.failed cannot be provoked cleanly with the simulator (only a Redis or model-server
    failure makes one), and chat.started with `restart` needs a killed owner and a lapsed lease:
    build them with the Python models and produce them as chatpipe's sink does (snake_case JSON,
    headers from chatpipe.codec.headers_for), with every optional field present and absent."""
    settings = topics
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    common: Json = {"session_id": "s-py", "instance_id": f"ai-{settings.topic_prefix}"}
    failed: list[Event] = [
        ChatStarted(**common, message_id="m-failed", seq=0, at=_at(0), restart=True),
        ChatChunk(**common, message_id="m-failed", seq=1, at=_at(1), delta='ünï ✓ "q"\n\t€'),
        ChatFailed(
            **common,
            message_id="m-failed",
            seq=2,
            at=_at(2),
            reason="upstream: connection refused",
            usage=Usage(completion_tokens=1, chunks=1, prompt_tokens=4),
        ),
    ]
    bare: list[Event] = [
        ChatStarted(**common, message_id="m-bare", seq=0, at=_at(3)),
        ChatChunk(**common, message_id="m-bare", seq=1, at=_at(4), delta=""),
        ChatCompleted(**common, message_id="m-bare", seq=2, at=_at(5)),
        ChatCancelled(**common, message_id="m-cancelled", seq=0, at=_at(6)),
    ]
    sent = failed + bare
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for py_event in sent:
            await producer.send_and_wait(
                settings.responses_topic,
                py_event.to_json(),
                key=py_event.session_id.encode(),
                headers=headers_for(py_event.type, traceparent),
            )
    finally:
        await producer.stop()

    consumer = java.start_consumer(
        ["m-failed", "m-bare", "m-cancelled"], jackson=jackson, timeout_s=30
    )
    assert await consumer.wait_exit(60) == 0, consumer.tail()
    lines = consumer.json_lines()
    events = java_events(lines)
    assert len(events) == len(sent)
    for line, java_event, py in zip(lines, events, sent, strict=True):
        value = json.loads(py.to_json())
        assert errors(py.type, value, strict=True) == []
        assert line["headers"] == {
            "content-type": "application/json",
            "event-type": py.type,
            "traceparent": traceparent,
        }
        at_ns = int(py.at.timestamp()) * 1_000_000_000 + py.at.microsecond * 1000
        usage = getattr(py, "usage", None)
        assert java_event == {
            "schemaVersion": 1,
            "type": py.type,
            "messageId": py.message_id,
            "sessionId": py.session_id,
            "seq": py.seq,
            "instanceId": py.instance_id,
            "at": py.at.isoformat().replace("+00:00", "Z"),
            "atEpochNanos": at_ns,
            "delta": getattr(py, "delta", None),
            "reason": getattr(py, "reason", None),
            "usage": None
            if usage is None
            else {
                "completionTokens": usage.completion_tokens,
                "chunks": usage.chunks,
                **({} if usage.prompt_tokens is None else {"promptTokens": usage.prompt_tokens}),
            },
            "restart": getattr(py, "restart", None),
        }


async def test_a_poison_record_on_responses_is_reported_not_fatal(
    java: Java, topics: Settings
) -> None:
    """The Spring consumer's ErrorHandlingDeserializer turns a record that is not JSON into an
    error (our consumer prints it) and goes on with the next record."""
    settings = topics
    done = ChatCompleted(
        message_id="m-after", session_id="s-py", seq=0, instance_id="ai", at=_at(0)
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for value in (b"\xff not json", done.to_json()):
            await producer.send_and_wait(settings.responses_topic, value, key=b"s-py")
    finally:
        await producer.stop()
    consumer = java.start_consumer(["m-after"], timeout_s=30)
    assert await consumer.wait_exit(60) == 4, consumer.tail()
    lines = consumer.json_lines()
    assert "error" in lines[0]
    assert lines[0]["offset"] == 0
    assert lines[1]["event"]["messageId"] == "m-after"


async def test_a_spring_request_with_an_unset_date_is_answered(
    java: Java, topics: Settings, redis: Redis, tmp_path: Path
) -> None:
    """Jackson writes `"createdAt": null` for an unset Instant (no NON_NULL): contract 1.1.0
    reads it as absent, so the request is answered instead of dead-lettered."""
    settings = topics
    session_id, message_id = "s-spring-null", "m-java-null-date"
    async with chatpipe_stack(settings, tmp_path, sim_tokens=3, sim_token_delay_ms=5) as stack:
        await asyncio.to_thread(
            java.produce, "request", session_id, message_id, "--text", "hi", "--null-created-at"
        )
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
            http.stream("GET", f"/api/chat/{message_id}/stream") as sse,
        ):
            browser = [e async for e in sse_events(sse)]
    written = [
        json.loads(r.value)
        for r in await read_topic(settings, settings.requests_topic)
        if r.key == session_id.encode() and r.value is not None
    ]
    assert [w["createdAt"] for w in written] == [None]  # what Jackson wrote
    assert [e.event for e in browser] == ["chunk"] * 3 + ["done"]
    assert browser[-1].json()["status"] == "completed"
    assert await read_topic(settings, settings.dlq_topic) == []
