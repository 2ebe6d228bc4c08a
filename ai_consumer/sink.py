"""Where chunks go: one Redis round trip per loop tick for all streams, Kafka sends unawaited.

A stream hands its event to `emit()` and waits for the batch it landed in (on a Future of its
own: one shared by the batch would be cancelled for all by one cancelled emitter). The batch
loop takes everything queued since the last round trip into one call of the WRITE script
(one per hash slot on a Redis Cluster), which appends each event fenced by its run's epoch and
answers each one's cancel flag; then it enqueues the batch's Kafka records, in order, as one
item. While a round trip is in flight new events pile up, so the batch grows with load
(measured in notes/field-notes.md: ~40 us of CPU per chunk batched
against ~190 us with a round trip each).

While Kafka is away chunks keep coming (SSE goes on through Redis), so the chunk records
waiting for the broker are bounded: at most SINK_KAFKA_MAX_PENDING wait (the ones beyond are
not produced), and one that waited longer than SINK_CHUNK_MAX_AGE_S is dropped when its turn
comes, so a terminal event does not wait behind minutes of stale chunks once the broker is
back. Both are counted (`chatpipe_sink_dropped_records_total{why}`); a Kafka reader sees the
gap in `seq` and the terminal's `chunks`. Terminal events are never dropped.

With RESPONSES_CHUNK_WINDOW_MS > 0, a message's chunk records within the window leave as one
record (contract 1.7.0: its first chunk's `seq`, `count`, the deltas joined): one Kafka record
and one send of the producer instead of one per token. SSE is not affected (every chunk is its
own Redis entry). A message's started and terminal events close its open record first, so
they never wait for the window and never overtake a chunk.

With COALESCE_MS > 0 (design §4), a stream's tokens go to `hold()` instead of `emit()`: the
first opens a chunk that the tokens of the next COALESCE_MS join, and it is written as one
Redis entry, one SSE event and one Kafka record (`seq` of its first token, `count`, the deltas
joined; contract 1.8.0). `hold()` does not wait: the chunk's answer (cancel requested, run
lost, Redis away) reaches the stream through the callback it gave, and `release()` writes a
stream's held chunk at once and waits for it (before its terminal event). Sequence numbers stay
those of the tokens, so resume and ordering are as without it; the cost is up to COALESCE_MS
of latency for the first token of each chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.partitioner import murmur2
from redis.exceptions import ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatpipe.clients import Producer
from chatpipe.codec import cached_headers, dumps
from chatpipe.errors import Unavailable
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger(__name__)

# Redis errors after which a batch is sent again (WRITE skips a call it ran already): the
# server unreachable, or a Redis Cluster without a primary for a slot for the moment (a
# replica being promoted answers CLUSTERDOWN / TRYAGAIN until the failover completes; the
# script did not run)
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, OSError)


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
    epoch: str = ""  # the run's fencing token (Claim.epoch): its writes are refused once lost
    done: asyncio.Future[int] | None = None  # set by emit(): WRITTEN | CANCEL | LOST


# What emit() answers: written; written and a cancel is requested (the caller stops); the run
# lost the message (nothing written, on Redis or Kafka: the caller stops without a terminal)
WRITTEN, CANCEL, LOST = 0, 1, -1


class Sink:
    def __init__(
        self,
        state: State,
        producer: Producer,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.state = state
        self.keys = Keys.from_settings(settings)
        self.producer = producer
        self.topic = settings.responses_topic
        self.metrics = metrics
        # the events queued for the next round trip (a list, swapped whole by the batch loop)
        self._pending: list[Outgoing] = []
        self._wake = asyncio.Event()
        # Kafka records leave through one queue and one task, in order, so a terminal event
        # never overtakes its chunks and a slow broker never holds up the Redis path (SSE);
        # an item is a batch's records (or a terminal's one)
        self._kafka: asyncio.Queue[list[_Record]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._kafka_errors = 0
        self._queued = 0  # chunk records in self._kafka
        self._max_queued = settings.sink_kafka_max_pending
        self._max_age_s = settings.sink_chunk_max_age_s
        self._dropped = 0
        self._tick_s = settings.sink_tick_ms / 1000
        # the messages of the batch taken last: a message that emits again before the next
        # batch is taken has a model faster than the tick (each chunk waits for its write's
        # answer), and the tick would set its pace; its event cuts the tick short (`_hurry`)
        self._last_batch: set[str] = set()
        self._hurry = asyncio.Event()
        self._recheck_s = settings.lease_ms / 4000
        self._retry_s = settings.sink_redis_retry_s
        # WRITE calls are numbered per writer: a batch sent again keeps its number, so Redis
        # skips it if it ran it already (the only task that writes is _run: calls never overlap)
        self._writer = secrets.token_hex(8)
        self._calls = itertools.count(1)
        # murmur2 of each session key, computed once per message instead of once per chunk
        self._hashes: dict[bytes, int] = {}
        # a message's chunk records waiting for its window to close (RESPONSES_CHUNK_WINDOW_MS)
        self._window_s = settings.responses_chunk_window_ms / 1000
        self._open: dict[str, _Open] = {}
        # a message's tokens joining one chunk for COALESCE_MS (oldest first: the deadlines
        # are in insertion order)
        self._coalesce_s = settings.coalesce_ms / 1000
        self._held: dict[str, _Held] = {}
        self._held_wake = asyncio.Event()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="sink-redis"),
            asyncio.create_task(self._run_kafka(), name="sink-kafka"),
        ]
        if self._window_s > 0:
            self._tasks.append(asyncio.create_task(self._run_window(), name="sink-window"))
        if self._coalesce_s > 0:
            self._tasks.append(asyncio.create_task(self._run_held(), name="sink-coalesce"))

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop; first give queued Kafka records `flush_timeout` seconds to leave."""
        self._enqueue([self._close(m) for m in list(self._open)])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout):
                await self._kafka.join()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def emit(self, out: Outgoing) -> int:
        """Append one event for SSE readers and Kafka, fenced by the run's epoch. Returns
        CANCEL when a cancel of the message was requested at that moment (the caller stops),
        LOST when a later run took the message over or it ended (nothing was written, and its
        Kafka record is not produced: the caller stops), else WRITTEN."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        out.done = done
        if not self._pending:  # the first event of a new batch
            self._wake.set()
        if out.message_id in self._last_batch:
            self._hurry.set()
        self._pending.append(out)
        return await done

    @property
    def coalescing(self) -> bool:
        return self._coalesce_s > 0

    def hold(self, out: Outgoing, answered: Callable[[asyncio.Future[int]], None]) -> None:
        """COALESCE_MS: `out` (a chunk of one token) joins its message's held chunk, or opens
        one that is written COALESCE_MS from now; does not wait. `answered` is called with the
        future of the chunk it opened (WRITTEN, CANCEL, LOST, or an error: Redis away)."""
        held = self._held.get(out.message_id)
        if held is not None and held.first.epoch == out.epoch:
            held.add(out)
            return
        if held is not None:  # an earlier run's chunk still held: it goes first
            self._release(out.message_id)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.add_done_callback(answered)
        out.done = done
        deadline = asyncio.get_running_loop().time() + self._coalesce_s
        self._held[out.message_id] = _Held(out, deadline)
        self._held_wake.set()

    async def release(self, message_id: str) -> int:
        """Write `message_id`'s held chunk now and wait for it: its answer (WRITTEN when none
        was held). Before a terminal event, which must not overtake it."""
        done = self._release(message_id)
        return WRITTEN if done is None else await done

    def _release(self, message_id: str) -> asyncio.Future[int] | None:
        held = self._held.pop(message_id, None)
        if held is None:
            return None
        out = held.merged()
        if not self._pending:
            self._wake.set()
        self._pending.append(out)
        return out.done

    async def _run_held(self) -> None:
        """Write each held chunk when its COALESCE_MS has passed."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._held:
                self._held_wake.clear()
                await self._held_wake.wait()
                continue
            wait = next(iter(self._held.values())).deadline - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            due = []
            for message_id, held in self._held.items():
                if held.deadline > now:
                    break
                due.append(message_id)
            for message_id in due:
                self._release(message_id)

    async def publish(
        self, key: str, kafka_type: str, value: dict[str, Any], traceparent: str | None = None
    ) -> None:
        """Send one record to chat.responses after everything emitted before it, and wait for
        the broker's ack; retried while the broker is away (terminal events must arrive)."""
        delay = 0.2
        while True:
            record = _Record(key.encode(), dumps(value), cached_headers(kafka_type, traceparent))
            record.delivered = asyncio.get_running_loop().create_future()
            self._enqueue([*self._close_open(str(value.get("message_id"))), record])
            try:
                await record.delivered
                return
            except Exception as e:
                log.warning(
                    "terminal event not delivered, retrying in %.1fs: %s",
                    delay,
                    e,
                    extra={"message_id": value.get("message_id")},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            # at most one round trip per tick: what arrives meanwhile rides along; unless a
            # message of the last batch is already back (see `_last_batch`)
            wait = last + self._tick_s - loop.time()
            if wait > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._hurry.wait()
            self._hurry.clear()
            last = loop.time()
            batch, self._pending = self._pending, []
            if batch:
                self._last_batch = {out.message_id for out in batch}
                await self._flush(batch)

    def _partition(self, key: bytes, partitions: Sequence[int] | None = None) -> int | None:
        """The default partitioner's choice (murmur2 of the key), with the hash cached: the
        same partition as without it, without hashing every chunk in pure Python. `partitions`
        (sorted) is `_partitions()`, when the caller read it once for several records."""
        if partitions is None:
            partitions = self._partitions()
        if not partitions:
            return None  # no metadata yet: the producer waits for it and partitions itself
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= 100_000:
                self._hashes.clear()
            h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[h % len(partitions)]

    def _partitions(self) -> list[int] | None:
        """The topic's partitions, sorted, as the producer's metadata knows them now."""
        partitions = self.producer.client.cluster.partitions_for_topic(self.topic)
        return sorted(partitions) if partitions else None

    async def _write_retrying(self, batch: list[Outgoing]) -> list[int]:
        """The batch's writes, sent again while Redis is unreachable for up to
        SINK_REDIS_RETRY_S (a failover, a proxy restart, a reset connection, a cluster down
        while a replica is promoted: the streams pause and go on). Sending again is safe: WRITE
        skips a call Redis ran already (the same call number)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._retry_s
        delay = 0.05
        call = next(self._calls)
        while True:
            try:
                return await self.state.write(batch, self._writer, call)
            except TRANSIENT as e:
                if loop.time() + delay > give_up:
                    raise
                self.metrics.sink_redis_retries.inc()
                log.warning("redis write of %d events failed, retrying: %s", len(batch), e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _flush(self, batch: list[Outgoing]) -> None:
        self.metrics.sink_batch.observe(len(batch))
        try:
            results = await self._write_retrying(batch)
        except Exception as e:  # Redis down for good: every stream in the batch learns it
            err = Unavailable(f"redis: {e}")
            for o in batch:
                if o.done is not None and not o.done.done():
                    o.done.set_exception(err)
            return
        records: list[_Record] = []
        checked_at = asyncio.get_running_loop().time()
        for o, answer in zip(batch, results, strict=True):
            if answer == LOST:  # its record only once Redis said the run still owns it
                self.metrics.fenced_writes.inc()
            elif self._window_s > 0:
                records.extend(self._windowed(o, checked_at))
            else:
                records.append(self._record(o, o.kafka_value, checked_at))
            if o.done is not None and not o.done.done():
                o.done.set_result(answer)
        self._enqueue(records)

    def _record(self, o: Outgoing, value: dict[str, Any], checked_at: float) -> _Record:
        return _Record(
            o.session_id.encode(),
            dumps(value),
            cached_headers(o.kafka_type, o.traceparent),
            message_id=o.message_id,
            epoch=o.epoch,
            checked_at=checked_at,
            chunk=o.kafka_type == "chat.chunk",
        )

    def _windowed(self, o: Outgoing, checked_at: float) -> list[_Record]:
        """The records to send now for `o`: a chunk joins its message's open record (none to
        send, unless an earlier run's record of the message was still open); any other event
        sends the open record first, then its own."""
        if o.kafka_type != "chat.chunk":
            return [*self._close_open(o.message_id), self._record(o, o.kafka_value, checked_at)]
        opened = self._open.get(o.message_id)
        if opened is not None and opened.epoch == o.epoch:
            opened.add(o.kafka_value)
            return []
        out = self._close_open(o.message_id)
        self._open[o.message_id] = _Open(o, checked_at, checked_at + self._window_s)
        return out

    def _close_open(self, message_id: str) -> list[_Record]:
        """`message_id`'s open record, closed (none when it has none): what must leave before
        any other event of the message."""
        return [self._close(message_id)] if message_id in self._open else []

    def _close(self, message_id: str) -> _Record:
        """The one record of `message_id`'s open chunks (taken out of the window)."""
        opened = self._open.pop(message_id)
        first = opened.first
        value = first.kafka_value
        if len(opened.deltas) > 1:
            value = {**value, "delta": "".join(opened.deltas), "count": opened.count}
        return self._record(first, value, opened.checked_at)

    async def _run_window(self) -> None:
        """Close the records whose window passed, every half window."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._window_s / 2)
            now = loop.time()
            due = [m for m, opened in self._open.items() if opened.deadline <= now]
            if due:
                self._enqueue([self._close(m) for m in due])

    def _enqueue(self, records: list[_Record]) -> None:
        """Queue `records` for Kafka as one item, in order; the newest chunk records beyond
        SINK_KAFKA_MAX_PENDING are not produced (terminal events always are)."""
        chunks = sum(1 for r in records if r.chunk)
        room = max(self._max_queued - self._queued, 0)
        if chunks > room:  # the newest chunks beyond the bound are not produced
            self._drop(chunks - room, "full")
            chunks, kept = room, []
            for r in records:
                if r.chunk:
                    if not room:
                        continue
                    room -= 1
                kept.append(r)
            records = kept
        if records:
            self._queued += chunks
            self._kafka.put_nowait(records)

    def _drop(self, count: int, why: str) -> None:
        self.metrics.sink_dropped.labels(why).inc(count)
        before, self._dropped = self._dropped, self._dropped + count
        if before == 0 or before // 10_000 != self._dropped // 10_000:
            log.warning(
                "chunk records for chat.responses dropped (%s; %d so far): Kafka is behind",
                why,
                self._dropped,
            )

    def _fresh(self, records: list[_Record]) -> list[_Record]:
        """Chunk records that waited longer than SINK_CHUNK_MAX_AGE_S are left out."""
        chunks = sum(1 for r in records if r.chunk)
        self._queued -= chunks
        if not chunks:
            return records
        oldest = asyncio.get_running_loop().time() - self._max_age_s
        kept = [r for r in records if not r.chunk or r.checked_at >= oldest]
        if len(kept) < len(records):
            self._drop(len(records) - len(kept), "stale")
        return kept

    async def _run_kafka(self) -> None:
        while True:
            items = [await self._kafka.get()]
            # what queued meanwhile (while the last batches waited for their turn) leaves with it
            while not self._kafka.empty():
                items.append(self._kafka.get_nowait())
            try:
                fresh = [r for item in items for r in self._fresh(item)]
                await self._send_all(await self._still_ours(fresh), self._partitions())
            finally:
                for _ in items:
                    self._kafka.task_done()

    async def _send_all(self, records: list[_Record], partitions: list[int] | None) -> None:
        """Send `records` in order: the chunk records of a partition as one batch (aiokafka's
        create_batch/send_batch: one future per batch, not one per record: under a third of the
        producer's CPU per record); a terminal record alone (its publish() waits for its own
        ack), after the batch of the chunks before it in its partition."""
        batches: dict[int, Any] = {}
        for record in records:
            partition = self._partition(record.key, partitions)
            if partition is None or record.delivered is not None:
                if partition is not None and partition in batches:
                    await self._send_batch(batches.pop(partition), partition)
                await self._send(record, partition)
                continue
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = self.producer.create_batch()
            if not self._append(batch, record):  # full: it leaves, the record opens the next
                await self._send_batch(batch, partition)
                batch = batches[partition] = self.producer.create_batch()
                self._append(batch, record)  # an empty batch takes any record
        for partition, batch in batches.items():
            await self._send_batch(batch, partition)

    @staticmethod
    def _append(batch: Any, record: _Record) -> bool:
        added = batch.append(
            key=record.key, value=record.value, timestamp=None, headers=record.headers
        )
        return added is not None

    async def _send_batch(self, batch: Any, partition: int) -> None:
        try:
            fut = await self.producer.send_batch(batch, self.topic, partition)
        except Exception as e:
            self._failed(e)
        else:
            fut.add_done_callback(self._on_sent)

    async def _still_ours(self, records: list[_Record]) -> list[_Record]:
        """Chunk records whose Redis check is older than a quarter lease (the process was
        frozen, or Kafka slow) are checked again before they leave: a run that lost its message
        meanwhile (a later epoch, or the message ended) sends none of them. Terminal records
        always leave. Fresh batches cost nothing here."""
        now = asyncio.get_running_loop().time()
        stale = {
            (r.key.decode(), r.message_id, r.epoch)
            for r in records
            if r.epoch and r.delivered is None and now - r.checked_at > self._recheck_s
        }
        if not stale:
            return records
        try:
            lost = await self.state.lost_runs(stale)
        except Exception as e:  # Redis away: the write check passed; send as before
            log.warning("could not re-check stale chunk records: %s", e)
            return records
        if not lost:
            return records
        kept = [r for r in records if (r.key.decode(), r.message_id, r.epoch) not in lost]
        self.metrics.fenced_writes.inc(len(records) - len(kept))
        return kept

    async def _send(self, record: _Record, partition: int | None) -> None:
        try:
            fut = await self.producer.send(
                self.topic,
                record.value,
                key=record.key,
                headers=record.headers,
                partition=partition,
            )
        except Exception as e:
            self._failed(e)
            if record.delivered is not None and not record.delivered.done():
                record.delivered.set_exception(e)
        else:
            if record.delivered is not None:  # a terminal: its publish() waits for the ack
                fut.add_done_callback(record.on_sent)
            fut.add_done_callback(self._on_sent)

    def _failed(self, error: BaseException) -> None:
        # a refused sequence (a batch lost while the broker was away) renews the producer
        # itself: chatpipe.clients.Producer
        self._kafka_errors += 1
        if self._kafka_errors in (1, 10, 100) or self._kafka_errors % 1000 == 0:
            log.warning("chat.responses delivery failed (%d so far): %s", self._kafka_errors, error)

    def _on_sent(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._failed(fut.exception())  # type: ignore[arg-type]


@dataclass(slots=True)
class _Record:
    key: bytes  # the session id
    value: bytes
    headers: list[tuple[str, bytes]]
    delivered: asyncio.Future[None] | None = None
    message_id: str = ""  # a chunk's: the run whose Redis check let it out, and when
    epoch: str = ""
    checked_at: float = 0.0
    chunk: bool = False  # a chat.chunk record: the only kind dropped when Kafka is behind

    def on_sent(self, fut: asyncio.Future[Any]) -> None:
        if self.delivered is None or self.delivered.done():
            return
        if fut.cancelled():
            self.delivered.set_exception(Unavailable("kafka: send cancelled"))
        elif fut.exception() is not None:
            self.delivered.set_exception(fut.exception())  # type: ignore[arg-type]
        else:
            self.delivered.set_result(None)


@dataclass(slots=True)
class _Open:
    """A message's chunk records in the window: `first` and the deltas after it."""

    first: Outgoing
    checked_at: float  # the first one's Redis check (the oldest: stale checks go by it)
    deadline: float
    deltas: list[str] = field(default_factory=list)
    count: int = 0  # chunks (a held chunk of COALESCE_MS counts its tokens)

    def __post_init__(self) -> None:
        self.add(self.first.kafka_value)

    def add(self, value: dict[str, Any]) -> None:
        self.deltas.append(str(value.get("delta", "")))
        self.count += int(value.get("count", 1))

    @property
    def message_id(self) -> str:
        return self.first.message_id

    @property
    def epoch(self) -> str:
        return self.first.epoch


@dataclass(slots=True)
class _Held:
    """A message's tokens held for COALESCE_MS: `first` and the deltas after it."""

    first: Outgoing
    deadline: float
    deltas: list[str] = field(default_factory=list)

    def add(self, out: Outgoing) -> None:
        self.deltas.append(out.sse_data["delta"])

    def merged(self) -> Outgoing:
        """`first`, carrying the held tokens (as it is when it holds one)."""
        out = self.first
        if self.deltas:
            count = 1 + len(self.deltas)
            delta = out.sse_data["delta"] + "".join(self.deltas)
            out.sse_data = {**out.sse_data, "delta": delta, "count": count}
            out.kafka_value = {**out.kafka_value, "delta": delta, "count": count}
        return out
