"""Real chatpipe processes for the interop tests: one `python -m api` and one
`python -m ai_consumer` in a test's namespace, plus small helpers to read topics and SSE.

Everything waits with deadlines: a process's log (tests/support/procs.py) and the api's /ready
are polled until a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from chatpipe.clients import make_admin
from chatpipe.settings import Settings
from tests.support.procs import Proc, free_port, process_env
from tests.support.procs import ProcError as StackError


@dataclass
class Stack:
    settings: Settings
    api: Proc
    consumer: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _wait_ready(stack: Stack, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = ""
    async with httpx.AsyncClient(base_url=stack.url, timeout=2.0) as http:
        while True:
            if not stack.api.alive():
                raise StackError(f"api exited before /ready:\n{stack.api.tail()}")
            try:
                r = await http.get("/ready")
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text}"
            except httpx.TransportError as e:
                last = repr(e)
            if loop.time() >= deadline:
                raise StackError(f"api not ready within {within:g}s ({last}):\n{stack.api.tail()}")
            await asyncio.sleep(0.1)  # sleep-ok: poll interval of /ready, nothing to wait on


@contextlib.asynccontextmanager
async def chatpipe_stack(
    settings: Settings, workdir: Path, **overrides: object
) -> AsyncIterator[Stack]:
    """One api and one ai_consumer (with its in-process cancel listener) for `settings`'
    namespace; yields once the api is ready, the consumer owns every partition of chat.requests
    and its cancel listener has replayed chat.cancels."""
    port = free_port()
    values: dict[str, object] = {
        "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
        "redis_url": settings.redis_url,
        "topic_prefix": settings.topic_prefix,
        "key_prefix": settings.key_prefix,
        "consumer_group": settings.consumer_group,
        "topic_partitions": settings.topic_partitions,
        "api_port": port,
        "log_format": "text",
        "sim_tokens": 20,
        "sim_token_delay_ms": 5,
        "sse_unknown_grace_ms": 10_000,  # a request produced straight to Kafka may lag
    }
    values.update(overrides)
    api = Proc.launch(
        "api",
        [sys.executable, "-m", "api"],
        process_env({**values, "instance_id": f"api-{settings.topic_prefix}"}),
        workdir,
        workdir / "api.log",
    )
    consumer = Proc.launch(
        "ai_consumer",
        [sys.executable, "-m", "ai_consumer"],
        process_env({**values, "instance_id": f"ai-{settings.topic_prefix}"}),
        workdir,
        workdir / "ai_consumer.log",
    )
    stack = Stack(settings, api, consumer, port)
    try:
        # text log lines: each comes as {"msg": line, "raw": True}
        assigned, replayed = "partitions assigned: [", f"replayed {settings.cancels_topic}"
        await consumer.log_line(lambda line: assigned in str(line.get("msg", "")), 60)
        await consumer.log_line(lambda line: replayed in str(line.get("msg", "")), 60)
        await _wait_ready(stack, 60)
        yield stack
    finally:
        await asyncio.gather(api.stop(), consumer.stop())


# --- Kafka and SSE readers ----------------------------------------------------------------


async def partitions_of(settings: Settings, topic: str) -> list[int]:
    admin = make_admin(settings)
    await admin.start()
    try:
        meta = await admin.describe_topics([topic])
    finally:
        await admin.close()
    found = sorted(p["partition"] for t in meta if t["topic"] == topic for p in t["partitions"])
    assert found, f"no partitions for {topic}: {meta}"
    return found


async def read_topic(settings: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` now (from the beginning to the end offsets), in offset order
    per partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        out: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(30):
            while True:
                behind = [tp for tp in parts if await consumer.position(tp) < end[tp]]
                if not behind:
                    break
                batch = await consumer.getmany(*behind, timeout_ms=500)
                for records in batch.values():
                    out.extend(records)
        return out
    finally:
        await consumer.stop()


def headers_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, str]:
    return {k: (v or b"").decode(errors="replace") for k, v in record.headers or ()}
