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
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError

from cancel_listener.sweeper import CancelSweeper, Seen
from chatpipe.clients import redis_run_ids
from chatpipe.codec import parse_cancel
from chatpipe.errors import InvalidRecord
from chatpipe.keys import split_session_cancel_key
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatCancel, ChatSessionCancel, rfc3339
from chatpipe.settings import Settings
from chatpipe.state import State
from chatpipe.unreadable import DECODE_ERRORS, isolate

log = logging.getLogger(__name__)

OnCancel = Callable[[ChatCancel], None]
OnRecord = Callable[[bytes], None]


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
        sweeper: CancelSweeper | None = None,
        on_record: OnRecord | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.cancels_topic
        self.consumer = consumer
        self.redis = redis
        self.state = state
        self.metrics = metrics
        self.producer = producer  # metadata lookups
        # the standalone listener's: tombstones the records whose work is done (sweeper.py)
        self.sweeper = sweeper
        self.on_cancel = on_cancel
        # the key of every cancel record in the topic, replayed or live, valid or not (the
        # ai_consumer tombstones a cancel only once its record is in: ai_consumer/tombstones.py)
        self.on_record = on_record
        self.replayed = asyncio.Event()  # set after each complete replay
        self.replays = 0
        self._stopping = asyncio.Event()
        self._redis_run_ids: frozenset[str] | None = None
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
        if self.sweeper is None:
            await self._tail()
            return
        sweeping = asyncio.create_task(self.sweeper.run(self._stopping), name="cancel-sweeper")
        try:
            await self._tail()
        finally:
            self._stopping.set()
            await sweeping

    async def _tail(self) -> None:
        next_check = asyncio.get_running_loop().time() + 1
        while not self._stopping.is_set():
            try:
                records = await self._fetch(timeout_ms=200, max_records=1000)
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

    async def _fetch(
        self, *parts: TopicPartition, timeout_ms: int, max_records: int
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """getmany, except that a record aiokafka cannot decode (a header name that is not
        UTF-8, chatpipe/unreadable.py) is skipped with a warning instead of wedging the reader
        (every later fetch would raise the same error, and no cancel would be seen again)."""
        try:
            batch = await self.consumer.getmany(
                *parts, timeout_ms=timeout_ms, max_records=max_records
            )
        except DECODE_ERRORS as e:
            found = await isolate(self.consumer, limit=max_records)
            if found.bad is not None:
                tp, offset = found.bad
                log.warning(
                    "cancel record at %s-%d@%d cannot be decoded, skipped: %s",
                    tp.topic,
                    tp.partition,
                    offset,
                    found.error or e,
                )
                self.consumer.seek(tp, offset + 1)
            batch = found.readable
        return [r for rs in batch.values() for r in rs]

    async def _redis_was_reset(self) -> bool:
        """A Redis server (a cluster: a primary) we wrote to is not the one it was: restarted,
        maybe empty, or a replica promoted that may lack the latest flags. Replay then."""
        run_ids = await redis_run_ids(self.redis)
        reset = self._redis_run_ids is not None and not run_ids <= self._redis_run_ids
        self._redis_run_ids = run_ids
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
        latest: dict[bytes, tuple[bytes | None, int]] = {}
        while True:
            # compacted gaps and transaction markers mean "last offset + 1" may never be seen:
            # compare positions with the end offsets instead
            behind = [tp for tp in parts if await self.consumer.position(tp) < end[tp]]
            if not behind:
                break
            for r in await self._fetch(*behind, timeout_ms=500, max_records=5000):
                if r.key is not None:
                    latest[r.key] = (r.value, r.timestamp)
        cancels = []
        for key, (value, timestamp) in latest.items():
            if value is None:
                continue  # tombstone: the message is final
            if self.on_record is not None:
                self.on_record(key)
            try:
                cancels.append(Seen(key, timestamp, parse_cancel(value)))
            except InvalidRecord as e:
                log.warning("unreadable cancel record ignored: %s", e.reason)
                if self.sweeper is not None:
                    await self.sweeper.unreadable(key)
        await self._mirror(cancels, "replay")
        self.replays += 1
        log.info("replayed %s: %d live cancels re-flagged", self.topic, len(cancels))
        self.replayed.set()

    async def _live(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        cancels: list[Seen] = []
        undone: list[str] = []  # sessions whose session-wide cancel was tombstoned
        for r in records:
            if r.value is None:
                if self.sweeper is not None and r.key is not None:
                    self.sweeper.tombstone_seen(r.key)
                session = None if r.key is None else split_session_cancel_key(r.key.decode())
                if session is not None:  # a session-wide cancel's (a deleted session's, or
                    # one done: the sweeper's): its mark goes too, and so does what came
                    # before it in this batch
                    undone.append(session)
                    cancels = [c for c in cancels if c.key != r.key]
                continue
            if self.on_record is not None and r.key is not None:
                self.on_record(r.key)
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
                if self.sweeper is not None and r.key is not None:
                    await self.sweeper.unreadable(r.key)
                continue
            cancels.append(Seen(r.key or b"", r.timestamp, cancel))
            on_cancel = None if self.settings.ownership_enforced else self.on_cancel
            if on_cancel is not None and isinstance(cancel, ChatCancel):
                on_cancel(cancel)  # at once; with ownership enforced, after the check
        if undone:
            await self.state.forget_session_cancels(undone)
        allowed = await self._mirror_live(cancels)
        if self.on_cancel is not None and self.settings.ownership_enforced:
            for cancel in allowed:
                self.on_cancel(cancel)

    async def _mirror_session(self, one: Seen, c: ChatSessionCancel, source: str) -> None:
        ids = {"session_id": c.session_id}
        enforce = self.settings.ownership_enforced
        # a record without requested_at was requested when its producer sent it (not when it
        # is read: a replay must not cancel the messages sent after it)
        at = c.requested_at
        if "requested_at" not in c.model_fields_set:
            at = datetime.fromtimestamp(one.timestamp_ms / 1000, UTC)
        stopped = await self.state.stop_session(c.session_id, rfc3339(at), c.user_id, enforce)
        self.metrics.cancels_seen.labels(source).inc()
        if self.sweeper is not None:
            await self.sweeper.observed(one, -1 if stopped is None else 1)
        if stopped is None:
            self.metrics.cancels_mirrored.labels("forbidden").inc()
            self.metrics.forbidden.labels("kafka_cancel").inc()
            log.warning(
                "session cancel from a user who does not own the session ignored", extra=ids
            )
            return
        self.metrics.cancels_mirrored.labels("session").inc()
        if source == "live":
            log.info(
                "session cancel mirrored into Redis: %d open messages flagged",
                len(stopped),
                extra=ids,
            )

    async def _mirror_live(self, cancels: list[Seen]) -> list[ChatCancel]:
        """`_mirror` for a live batch, retried until Redis takes it: its records are consumed
        already, so a failed write would lose their flags (a Kafka-only cancel, the Spring
        frontend's, has no other way into Redis short of a replay)."""
        delay = 0.05
        while True:
            try:
                return await self._mirror(cancels, "live")
            except (RedisError, OSError) as e:
                if self._stopping.is_set():
                    raise
                log.warning("could not write %d cancel flags, retrying: %s", len(cancels), e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _mirror(self, records: list[Seen], source: str) -> list[ChatCancel]:
        """Mirror the cancels into their Redis flags; returns those not refused for ownership
        (a refused one, from a user who did not send the message, is ignored and counted).
        A session-wide cancel marks its session and flags its open messages (State.stop_session);
        its local streams stop at their next chunk, on the flag."""
        seen = [s for s in records if isinstance(s.cancel, ChatCancel)]
        for one in records:
            if isinstance(one.cancel, ChatSessionCancel):
                await self._mirror_session(one, one.cancel, source)
        if not seen:
            return []
        cancels = [s.cancel for s in seen if isinstance(s.cancel, ChatCancel)]
        self.metrics.cancels_seen.labels(source).inc(len(cancels))
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in cancels:
                await self.state.mirror_cancel(pipe, c.session_id, c.message_id, c.user_id)
            results = [int(r) for r in await pipe.execute()]
        if self.sweeper is not None:
            for one, flagged in zip(seen, results, strict=True):
                await self.sweeper.observed(one, flagged)
        allowed = []
        for c, flagged in zip(cancels, results, strict=True):
            result = "flagged" if flagged > 0 else "final" if flagged == 0 else "forbidden"
            self.metrics.cancels_mirrored.labels(result).inc()
            if source == "live":  # a replay re-flags many at once: counted, not logged each
                log.info(
                    "cancel record mirrored into Redis: %s",
                    result,
                    extra={"message_id": c.message_id, "session_id": c.session_id},
                )
            if flagged < 0:
                self.metrics.forbidden.labels("kafka_cancel").inc()
                log.warning(
                    "cancel from a user who did not send the message ignored",
                    extra={"message_id": c.message_id, "session_id": c.session_id},
                )
            else:
                allowed.append(c)
        return allowed
