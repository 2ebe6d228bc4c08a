"""The ai_consumer worker: one Kafka consumer, session lanes, offsets, leases, shutdown.

Shape after arq's Worker: `run()` until `request_stop()` (what a signal handler calls), then a
graceful drain. The consume loop never blocks on a stream: records go to session lanes; when
the lanes hold `buffer_limit` records the assigned partitions are paused (getmany keeps the
group membership alive) and resumed at half of it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from redis.exceptions import RedisError

from ai_consumer.dlq import DeadLetter, DeadLetters
from ai_consumer.dlq import dead_letter_headers as dead_letter_headers
from ai_consumer.handler import LEFT, Handler
from ai_consumer.lanes import Lanes, Work
from ai_consumer.offsets import PartitionOffsets
from ai_consumer.registry import Registry
from chatpipe.codec import header, parse_request_record
from chatpipe.errors import InvalidRecord, Retry
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatRequest, rfc3339
from chatpipe.settings import Settings
from chatpipe.state import OBSERVES_QUEUED, State
from chatpipe.unreadable import DECODE_ERRORS, isolate

log = logging.getLogger(__name__)


def decide(record: ConsumerRecord[bytes, bytes]) -> ChatRequest | InvalidRecord:
    """The consume loop's decision for one record: the request for a session lane, or the
    InvalidRecord (with its reason) that sends it to the DLQ. Never raises: an unexpected error
    of the parser is a DLQ reason too, not the end of the consumer (tests/security fuzz it)."""
    try:
        return parse_request_record(record.value, record.timestamp, record.headers)
    except InvalidRecord as e:
        return e
    except Exception as e:
        return InvalidRecord(f"unreadable record ({type(e).__name__}: {e})"[:500], "unreadable")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.on_assigned(set(assigned))


class Worker:
    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        state: State,
        handler: Handler,
        registry: Registry,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.producer = producer
        self.state = state
        self.handler = handler
        self.registry = registry
        self.metrics = metrics
        self.dead_letters = DeadLetters(producer, settings, metrics)
        self.offsets: dict[TopicPartition, PartitionOffsets] = {}
        self.lanes = Lanes(settings.max_concurrent_streams, self._run_work, self._finished)
        self.paused = False
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()  # set once the group gave us partitions

    # --- lifecycle ---------------------------------------------------------------------
    def request_stop(self) -> None:
        """Only flips state: safe from a signal handler."""
        self._stopping.set()

    def subscribe(self) -> None:
        self.consumer.subscribe([self.settings.requests_topic], listener=_Rebalance(self))

    async def run(self) -> None:
        self.subscribe()
        background = [
            asyncio.create_task(self._commit_loop(), name="commits"),
            asyncio.create_task(self._lease_loop(), name="leases"),
        ]
        try:
            await self._consume_loop()
            await self._drain()
        finally:
            for t in background:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.dead_letters.close()
            await self.commit()

    async def _drain(self) -> None:
        """Graceful shutdown: start nothing new, give running streams the grace period, then
        hand the rest over (release our leases; the offsets stay uncommitted, so the group
        redelivers them and the next owner restarts them with a `restart` event)."""
        self.lanes.stop_accepting()
        self.handler.stop_waiting()  # what another instance streams is not ours to wait for
        running = len(self.registry.running)
        log.info(
            "stopping: %d streams running, grace %.1fs", running, self.settings.shutdown_grace_s
        )
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_s):
                await self.lanes.wait_idle()
            return
        except TimeoutError:
            pass
        handed = list(self.registry.running.values())
        await self.lanes.cancel_all()
        if handed:
            try:
                await self.state.release_leases([(s.session_id, s.message_id) for s in handed])
            except RedisError as e:
                log.warning(
                    "could not release leases (they lapse in %d ms): %s", self.settings.lease_ms, e
                )
        log.warning("handed over %d streams still running after the grace period", len(handed))

    # --- consuming ---------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                # never take more than the lanes have room for: the buffer bound holds exactly,
                # not "limit + one batch" (paused partitions return nothing anyway)
                room = self.settings.buffer_limit - len(self.lanes)
                batch = await self.consumer.getmany(
                    timeout_ms=200, max_records=max(1, min(500, room))
                )
            except asyncio.CancelledError:
                raise
            except DECODE_ERRORS as e:  # a record aiokafka cannot decode: see chatpipe/unreadable
                try:
                    await self._skip_unreadable(e, max(1, min(500, room)))
                except asyncio.CancelledError:
                    raise
                except Exception:  # e.g. a rebalance under way: the next fetch tries again
                    log.exception("could not isolate the undecodable record; retrying")
                    await asyncio.sleep(0.5)
                continue
            except Exception:
                log.exception("fetch failed; retrying")
                await asyncio.sleep(0.5)
                continue
            if batch:
                await self._take(batch)
            self._backpressure()

    async def _skip_unreadable(self, error: Exception, room: int) -> None:
        """Take the readable records up to the undecodable one, dead-letter that one by offset
        (its bytes stay in the source topic) and move past it."""
        log.warning("a fetched record cannot be decoded (%s): isolating it", error)
        found = await isolate(self.consumer, limit=room)
        if found.readable:
            await self._take(found.readable)
        if found.bad is None:
            return
        tp, offset = found.bad
        offsets = self.offsets.get(tp)
        if offsets is None:
            return
        reason = (
            f"record cannot be decoded by the Kafka client (a header name is not UTF-8: "
            f"{found.error}); its bytes stay in {tp.topic} partition {tp.partition} at offset "
            f"{offset}"
        )
        offsets.add(offset)
        letter = DeadLetter(tp.topic, tp.partition, offset, reason, "undecodable")
        await self.dead_letters.submit(letter, functools.partial(offsets.done, offset))
        self.consumer.seek(tp, offset + 1)

    async def _take(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        works: list[Work] = []
        for tp, records in batch.items():
            offsets = self.offsets.get(tp)
            if offsets is None:  # revoked between fetch and now
                continue
            for record in records:
                offsets.add(record.offset)
                request = decide(record)
                if isinstance(request, InvalidRecord):
                    await self.dead_letters.submit(
                        DeadLetter.of(record, request),
                        functools.partial(offsets.done, record.offset),
                    )
                    continue
                works.append(
                    Work(tp, record.offset, request, header(record.headers, "traceparent"), offsets)
                )
        if works:
            await self._observe(works)
        for work in works:
            self.lanes.submit(work)

    async def _observe(self, works: list[Work]) -> None:
        """Make consumed requests visible as `queued` (a request produced straight to Kafka has
        no state yet), so SSE readers and cancels find them while they wait in a lane."""
        for attempt in range(50):
            try:
                async with self.state.redis.pipeline(transaction=False) as pipe:
                    for w in works:
                        r = w.request
                        await self.state.observe(
                            pipe,
                            r.message_id,
                            r.session_id,
                            r.user_id,
                            rfc3339(r.created_at),
                            r.message,
                            reject_if_busy=r.if_busy == "reject",
                        )
                    answers = await pipe.execute()
                # State.observe queues OBSERVES_QUEUED commands a request; its answer is the last
                answers = answers[OBSERVES_QUEUED - 1 :: OBSERVES_QUEUED]
                for w, answer in zip(works, answers, strict=True):
                    await self._if_busy(w, answer.decode() if isinstance(answer, bytes) else answer)
                return
            except RedisError as e:
                log.warning(
                    "redis unavailable while taking records (attempt %d): %s", attempt + 1, e
                )
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    async def _if_busy(self, work: Work, observed: str) -> None:
        """A request produced straight to Kafka with `if_busy` (the api decides its own at
        accept): `reject` in a busy session is refused (its handler ends it failed);
        `interrupt` cancels every message of the session created before it first."""
        r = work.request
        if observed.startswith("busy:"):
            busy = observed.removeprefix("busy:")
            work.refused = f"busy: session {r.session_id} is busy with message {busy}"
        elif r.if_busy == "interrupt" and observed == "queued":
            enforce = self.settings.ownership_enforced
            stopped = await self.state.stop_session(
                r.session_id, rfc3339(r.created_at), r.user_id, enforce, source="interrupt"
            )
            log.info(
                "if_busy interrupt: %s",
                "refused (not the session's owner)"
                if stopped is None
                else f"{len(stopped)} stopped",
                extra={"message_id": r.message_id, "session_id": r.session_id},
            )

    def _backpressure(self) -> None:
        size = len(self.lanes)
        self.metrics.buffered.set(self.lanes.waiting)
        limit = self.settings.buffer_limit
        assigned = list(self.consumer.assignment())
        if not self.paused and size >= limit:
            self.consumer.pause(*assigned)
            self.paused = True
            self.metrics.paused.set(1)
            log.info("paused fetching: %d requests in lanes (limit %d)", size, limit)
        elif self.paused and size <= limit // 2:
            self.consumer.resume(*assigned)
            self.paused = False
            self.metrics.paused.set(0)
            log.info("resumed fetching: %d requests in lanes", size)

    async def _run_work(self, work: Work) -> bool:
        """Run `work` to its end; False when it was left to another instance (at shutdown):
        its offset stays uncommitted."""
        delay = 0.1
        while True:
            try:
                outcome = await self.handler.handle(
                    work.request, work.traceparent, refused=work.refused
                )
                return outcome != LEFT
            except (RedisError, Retry) as e:
                if self._stopping.is_set():
                    raise
                log.warning(
                    "redis or kafka unavailable, retrying message in %.1fs: %s",
                    delay,
                    e,
                    extra={
                        "message_id": work.request.message_id,
                        "session_id": work.request.session_id,
                    },
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                # the handler ends a message it crashed on as `failed`; this is the last resort
                # when even that raised: the offset is marked done all the same (a poison message
                # must not hold its partition's commits back forever) and the consumer goes on
                log.exception(
                    "message abandoned after an unexpected error",
                    extra={
                        "message_id": work.request.message_id,
                        "session_id": work.request.session_id,
                    },
                )
                return True

    def _finished(self, work: Work) -> None:
        offsets = self.offsets.get(work.tp)
        # a work of an earlier assignment of this partition (revoked, then assigned again) is not
        # this assignment's: its record was redelivered and that copy decides the commit
        if offsets is not None and offsets is work.book:
            offsets.done(work.offset)

    # --- offsets and rebalances --------------------------------------------------------
    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        todo: dict[TopicPartition, int] = {}
        for tp, offsets in self.offsets.items():
            if only is not None and tp not in only:
                continue
            offset = offsets.committable()
            if offset is not None:
                todo[tp] = offset
            self.metrics.partition_backlog.labels(str(tp.partition)).set(len(offsets))
        self.metrics.lanes.set(len(self.lanes.sessions))
        await self._lag()
        if not todo:
            return
        try:
            await self.consumer.commit(todo)
        except Exception as e:
            log.warning("offset commit failed (will retry): %s", e)
            return
        self.metrics.commits.inc()
        for tp, offset in todo.items():
            self.offsets[tp].committed(offset)

    async def _lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await self.consumer.position(tp)
            except Exception:
                continue
            self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - position))

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.commit_interval_ms / 1000)
            await self.commit()

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        dropped = self.lanes.drop_partitions(revoked)
        await self.commit(revoked)
        for tp in revoked:
            self.offsets.pop(tp, None)
        log.info(
            "partitions revoked: %s (%d queued records left to the next owner)",
            sorted(tp.partition for tp in revoked),
            dropped,
        )

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self.offsets.setdefault(tp, PartitionOffsets())
        if self.paused:
            self.consumer.pause(*assigned)
        log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))
        self.ready.set()

    # --- leases ------------------------------------------------------------------------
    async def _lease_loop(self) -> None:
        """Refresh the leases (and the seed's active keys) of every stream running here."""
        interval = self.settings.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            owned = [(s.message_id, s.session_id, s.epoch) for s in self.registry.running.values()]
            try:
                lost = await self.state.refresh_leases(owned, self.settings.instance_id)
            except RedisError as e:
                log.warning("lease refresh failed: %s", e)
                continue
            for i in lost:
                message_id = owned[i][0]
                stream = self.registry.running.get(message_id)
                if stream is None or stream.finished:
                    continue  # ended, or its lease released with its terminal published
                log.warning(
                    "lost the lease of a running stream; stopping it",
                    extra={"message_id": message_id, "session_id": owned[i][1]},
                )
                stream.lost = True
                stream.cancelled.set()

    def stats(self) -> dict[str, Any]:
        return {"running": self.lanes.running, "waiting": self.lanes.waiting, "paused": self.paused}
