"""The cancel listener: every instance reads every partition of chat.cancels (no group).

On start, and again whenever Redis comes back empty (a new run_id), it replays the compacted
topic from the beginning up to the end offsets, folding records per key (a later value or a
tombstone replaces an earlier one), and re-creates the flags of the messages that are not final.
Then it tails the topic: each cancel is handed to `on_cancel` at once (the embedded listener
interrupts a local stream there) and mirrored into its Redis flag in one pipeline per batch.
Redis or Kafka trouble is logged and retried, never fatal: a dead stop listener is a bug others
shipped (Open WebUI #26779).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from redis.asyncio import Redis

from chatpipe.codec import parse_cancel
from chatpipe.errors import InvalidRecord
from chatpipe.keys import cancel_record_key
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatCancel
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger(__name__)

OnCancel = Callable[[ChatCancel], None]


class CancelListener:
    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        redis: Redis,
        state: State,
        metrics: Metrics,
        producer: AIOKafkaProducer,
        on_cancel: OnCancel | None = None,
        tombstone_final: bool = False,
    ) -> None:
        self.settings = settings
        self.topic = settings.cancels_topic
        self.consumer = consumer
        self.redis = redis
        self.state = state
        self.metrics = metrics
        self.producer = producer  # metadata lookups; tombstones when tombstone_final
        self.tombstone_final = tombstone_final  # tombstone cancels of messages already final
        self.on_cancel = on_cancel
        self.replayed = asyncio.Event()  # set after each complete replay
        self.replays = 0
        self._stopping = asyncio.Event()
        self._redis_run_id: str | None = None
        self._partitions: list[TopicPartition] = []

    def request_stop(self) -> None:
        self._stopping.set()

    async def _assign(self) -> None:
        """Assign every partition of the topic to this reader (broadcast: no group)."""
        while not self._stopping.is_set():
            try:
                parts = await self.producer.partitions_for(self.topic)
            except Exception as e:
                log.warning("topic %s not readable yet (run `chatpipe topics`?): %s", self.topic, e)
                await asyncio.sleep(1)
                continue
            self._partitions = [TopicPartition(self.topic, p) for p in sorted(parts)]
            self.consumer.assign(self._partitions)
            return

    async def run(self) -> None:
        await self._assign()
        await self._replay()
        next_check = asyncio.get_running_loop().time() + 1
        while not self._stopping.is_set():
            try:
                batch = await self.consumer.getmany(timeout_ms=200, max_records=1000)
                records = [r for rs in batch.values() for r in rs]
                if records:
                    await self._live(records)
                now = asyncio.get_running_loop().time()
                if now >= next_check:
                    next_check = now + 1
                    if await self._redis_was_reset():
                        log.warning("Redis came back empty: replaying %s", self.topic)
                        await self._replay()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancel listener iteration failed; retrying")
                await asyncio.sleep(0.5)

    async def _redis_was_reset(self) -> bool:
        info = await self.redis.info("server")
        run_id = str(info.get("run_id"))
        reset = self._redis_run_id is not None and run_id != self._redis_run_id
        self._redis_run_id = run_id
        return reset

    async def _replay(self) -> None:
        """Fold the topic from the beginning up to the end offsets of now, then mirror it."""
        while not self._stopping.is_set():
            try:
                await self._replay_once()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancel replay failed; retrying")
                await asyncio.sleep(1)

    async def _replay_once(self) -> None:
        self.replayed.clear()
        await self._redis_was_reset()  # remember the run_id the replay writes into
        parts = self._partitions
        await self.consumer.seek_to_beginning(*parts)
        end = await self.consumer.end_offsets(parts)
        latest: dict[bytes, bytes | None] = {}
        while True:
            # compacted gaps and transaction markers mean "last offset + 1" may never be seen:
            # compare positions with the end offsets instead
            behind = [tp for tp in parts if await self.consumer.position(tp) < end[tp]]
            if not behind:
                break
            batch = await self.consumer.getmany(*behind, timeout_ms=500, max_records=5000)
            for records in batch.values():
                for r in records:
                    if r.key is not None:
                        latest[r.key] = r.value
        cancels = []
        for value in latest.values():
            if value is None:
                continue  # tombstone: the message is final
            try:
                cancels.append(parse_cancel(value))
            except InvalidRecord as e:
                log.warning("unreadable cancel record ignored: %s", e.reason)
        await self._mirror(cancels, "replay")
        self.replays += 1
        log.info("replayed %s: %d live cancels re-flagged", self.topic, len(cancels))
        self.replayed.set()

    async def _live(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        cancels = []
        for r in records:
            if r.value is None:
                continue
            try:
                cancel = parse_cancel(r.value)
            except InvalidRecord as e:
                log.warning(
                    "unreadable cancel record at %s-%d@%d ignored: %s",
                    r.topic,
                    r.partition,
                    r.offset,
                    e.reason,
                )
                continue
            cancels.append(cancel)
            if self.on_cancel is not None:
                self.on_cancel(cancel)
        await self._mirror(cancels, "live")

    async def _mirror(self, cancels: list[ChatCancel], source: str) -> None:
        if not cancels:
            return
        self.metrics.cancels_seen.labels(source).inc(len(cancels))
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in cancels:
                await self.state.mirror_cancel(pipe, c.session_id, c.message_id)
            results = await pipe.execute()
        if not self.tombstone_final:
            return
        for c, flagged in zip(cancels, results, strict=True):
            if not int(flagged):
                key = cancel_record_key(c.session_id, c.message_id).encode()
                await self.producer.send(self.topic, None, key=key)
