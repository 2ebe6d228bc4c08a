"""One Redis reader per api process, fanning out the message streams to many SSE clients.

A single task runs `XREAD BLOCK` over the streams of every message some client of this
process is watching (plus a private wake-up stream, so a newly watched message joins the read
at once). Each client gets a bounded queue; a client that falls behind is dropped, not waited
for — it reconnects with Last-Event-ID and resumes from Redis, so it loses nothing and slows
no one. No client holds a Redis connection.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chatpipe.keys import Keys
from chatpipe.metrics import Metrics

KeyT = bytes | str | memoryview
StreamIdT = int | bytes | str | memoryview
XReadResponse = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None

log = logging.getLogger(__name__)

StreamId = tuple[int, int]
Entry = tuple[str, dict[bytes, bytes]]  # (id, fields)


def parse_id(value: str | bytes) -> StreamId:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


@dataclass(eq=False)
class Subscription:
    message_id: str
    after: StreamId
    queue: asyncio.Queue[Entry | None]
    overflowed: bool = False
    backlog: list[Entry] = field(default_factory=list)


class Hub:
    def __init__(
        self,
        reader: Redis,
        writer: Redis,
        keys: Keys,
        instance_id: str,
        metrics: Metrics,
        queue_size: int,
        read_interval_s: float = 0.0,
    ) -> None:
        self.reader = reader  # its own connection: it blocks in XREAD
        # reads start at least this far apart: a busy hub gets more entries per XREAD
        self.read_interval_s = read_interval_s
        self.writer = writer
        self.keys = keys
        self.metrics = metrics
        self.queue_size = queue_size
        self.wake_key = keys.wakeup(instance_id)
        self._wake_id = "0-0"
        self._cursors: dict[str, StreamId] = {}
        self._subs: dict[str, set[Subscription]] = {}
        self._changed = asyncio.Event()
        self._wake_pending = False
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sse-hub")

    async def stop(self) -> None:
        self._stopping = True
        self._changed.set()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for subs in self._subs.values():
            for sub in subs:
                try:
                    sub.queue.put_nowait(None)
                except asyncio.QueueFull:
                    sub.overflowed = True

    async def subscribe(self, message_id: str, after: StreamId) -> Subscription:
        sub = Subscription(message_id, after, asyncio.Queue(self.queue_size))
        cursor = self._cursors.get(message_id)
        self._subs.setdefault(message_id, set()).add(sub)
        if cursor is None:
            self._cursors[message_id] = after
            await self._wake()
        elif cursor > after:
            # the hub is ahead of this client: fetch (after, cursor] ourselves; the hub
            # delivers everything after cursor to our queue from now on
            raw = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self.writer.xrange(
                    self.keys.stream(message_id), min="(" + format_id(after), max=format_id(cursor)
                ),
            )
            sub.backlog = [(i.decode(), f) for i, f in raw]
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.message_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.message_id]
            del self._cursors[sub.message_id]

    async def _wake(self) -> None:
        self._changed.set()
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            async with self.writer.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": 1}, maxlen=10, approximate=True)
                pipe.expire(self.wake_key, 3600)
                await pipe.execute()
        except RedisError as e:
            log.warning("sse hub wake-up failed: %s", e)

    async def _run(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        last_read = 0.0
        while not self._stopping:
            if not self._cursors:
                await self._changed.wait()
            wait = last_read + self.read_interval_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last_read = loop.time()
            self._changed.clear()
            self._wake_pending = False
            streams: dict[KeyT, StreamIdT] = {self.wake_key: self._wake_id}
            read_from = dict(self._cursors)  # what this read asks for, per message
            for message_id, cursor in read_from.items():
                streams[self.keys.stream(message_id)] = format_id(cursor)
            try:
                response = cast(
                    XReadResponse, await self.reader.xread(streams, count=1000, block=10_000)
                )
                self.healthy = True
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._stopping:
                    return
                self.healthy = False
                log.warning("sse hub read failed, retrying in %.1fs: %s", backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for key, entries in response or ():
                name = key.decode()
                if name == self.wake_key:
                    self._wake_id = entries[-1][0].decode()
                    continue
                message_id = name[len(self.keys.stream("")) :]
                self._deliver(message_id, read_from.get(message_id), entries)

    def _deliver(
        self,
        message_id: str,
        read_from: StreamId | None,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
    ) -> None:
        if self._cursors.get(message_id) != read_from:
            # every client left while we read (None), or the last one left and a new one came
            # (a page reload) with its own cursor: these entries start at the old cursor, not
            # at the new one; the next read fetches from the new cursor
            return
        self._cursors[message_id] = parse_id(entries[-1][0])
        for sub in list(self._subs.get(message_id, ())):
            for raw_id, fields in entries:
                try:
                    sub.queue.put_nowait((raw_id.decode(), fields))
                except asyncio.QueueFull:
                    sub.overflowed = True
                    self.metrics.sse_dropped.inc()
                    self.unsubscribe(sub)
                    break
