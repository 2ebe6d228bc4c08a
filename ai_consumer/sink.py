"""Where chunks go: one Redis round trip per loop tick for all streams, Kafka sends unawaited.

A stream hands its event to `emit()` and waits for the batch it landed in. The batch loop
drains everything queued since the last round trip into one pipeline: the cancel flags of the
batch's messages (one MGET) and one XADD per event; then it enqueues the Kafka records. While a
round trip is in flight new events pile up, so the batch grows with load (measured in
notes/field-notes.md: ~40 us of CPU per chunk batched against ~190 us with a round trip each).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from chatpipe.codec import dumps, headers_for
from chatpipe.errors import Unavailable
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outgoing:
    message_id: str
    session_id: str
    sse_event: str  # started | restart | chunk (what the Redis Stream entry is called)
    seq: int
    sse_data: dict[str, Any]
    kafka_type: str
    kafka_value: dict[str, Any]
    traceparent: str | None = None
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Sink:
    def __init__(
        self,
        redis: Redis,
        state: State,
        producer: AIOKafkaProducer,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.redis = redis
        self.state = state
        self.keys = Keys.from_settings(settings)
        self.producer = producer
        self.topic = settings.responses_topic
        self.metrics = metrics
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._kafka_errors = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sink")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def emit(self, out: Outgoing) -> bool:
        """Append one event for SSE readers and Kafka. Returns True when the message's cancel
        flag was set at that moment (the caller stops)."""
        self._queue.put_nowait(out)
        return await out.done

    async def publish(
        self, key: str, kafka_type: str, value: dict[str, Any], traceparent: str | None = None
    ) -> None:
        """Send one record to chat.responses and wait for the broker's ack (terminal events)."""
        await self.producer.send_and_wait(
            self.topic, dumps(value), key=key.encode(), headers=headers_for(kafka_type, traceparent)
        )

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._flush(batch)

    async def _flush(self, batch: list[Outgoing]) -> None:
        self.metrics.sink_batch.observe(len(batch))
        flag_keys = list({self.keys.cancel(o.session_id, o.message_id) for o in batch})
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.mget(flag_keys)
                for o in batch:
                    self.state.append(pipe, o.message_id, o.sse_event, o.seq, o.sse_data)
                results = await pipe.execute()
        except Exception as e:  # Redis down: every stream in the batch learns it
            err = Unavailable(f"redis: {e}")
            for o in batch:
                if not o.done.done():
                    o.done.set_exception(err)
            return
        flags = dict(zip(flag_keys, results[0], strict=True))
        for o in batch:
            key = o.session_id.encode()
            try:
                fut = await self.producer.send(
                    self.topic,
                    dumps(o.kafka_value),
                    key=key,
                    headers=headers_for(o.kafka_type, o.traceparent),
                )
                fut.add_done_callback(self._on_sent)
            except Exception as e:
                log.warning("chat.responses send failed: %s", e, extra={"message_id": o.message_id})
            if not o.done.done():
                o.done.set_result(flags[self.keys.cancel(o.session_id, o.message_id)] is not None)

    def _on_sent(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._kafka_errors += 1
            if self._kafka_errors in (1, 10, 100) or self._kafka_errors % 1000 == 0:
                log.warning(
                    "chat.responses delivery failed (%d so far): %s",
                    self._kafka_errors,
                    fut.exception(),
                )
