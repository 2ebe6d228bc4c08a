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
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ClusterDownError, RedisError, ResponseError, TryAgainError

from chatpipe.errors import ChatpipeError
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics

# XREAD's reply as the wire gives it (no redis-py response callback): per stream key, its
# entries as [id, [field, value, field, value, ...]]. A dict over RESP3 (redis-py's default
# protocol), a list of [key, entries] pairs over RESP2 (`?protocol=2` in REDIS_URL).
RawEntries = list[list[Any]]
RawReply = dict[bytes, RawEntries] | list[list[Any]] | None

XREAD_COUNT = b"1000"
XREAD_BLOCK_MS = b"10000"

log = logging.getLogger(__name__)

# Refusals that name no stream: a Redis Cluster without a primary for a slot for the moment
# (CLUSTERDOWN while a replica is promoted, TRYAGAIN during a resharding). The read is sent
# again after a backoff; no client is ended for them.
CLUSTER_TRANSIENT = (ClusterDownError, TryAgainError)

StreamId = tuple[int, int]
Entry = tuple[str, dict[bytes, bytes]]  # (id, fields)


U64_MAX = 2**64 - 1
# what Redis itself writes: `<ms>-<seq>`; a plain `<ms>` is read as `<ms>-0` (as XREAD does)
_CLIENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")


class InvalidStreamId(ChatpipeError):
    """A client's Last-Event-ID is not a Redis stream id: 400, fix the header or drop it."""


def parse_id(value: str | bytes) -> StreamId:
    """An id Redis wrote (trusted: no checks)."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def parse_client_id(text: str) -> StreamId:
    """A client's Last-Event-ID: `<ms>-<seq>` or `<ms>`, decimal digits only, each part an
    unsigned 64-bit integer (what Redis accepts as a stream id); InvalidStreamId otherwise.
    Such an id can never make Redis reject the hub's shared read."""
    found = _CLIENT_ID.fullmatch(text)
    if found is not None:
        ms, seq = int(found.group(1)), int(found.group(2) or 0)
        if ms <= U64_MAX and seq <= U64_MAX:
            return ms, seq
    shown = text if len(text) <= 60 else text[:60] + "..."
    raise InvalidStreamId(
        f"Last-Event-ID {shown!r} is not a stream id: send the `id:` of the last event received"
        " (`<ms>-<seq>`, each an unsigned 64-bit decimal integer), or no Last-Event-ID to start"
        " from the beginning"
    )


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def reply_streams(reply: RawReply) -> Iterable[tuple[bytes, RawEntries]]:
    """(stream key, raw entries) of an XREAD reply, whichever protocol it came over."""
    if not reply:
        return ()
    if isinstance(reply, dict):
        return reply.items()
    return cast(list[tuple[bytes, RawEntries]], reply)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def entries_of(raw: RawEntries) -> list[Entry]:
    """The hub's entries from a stream's raw entries: each id decoded once, fields a dict.
    Every entry chatpipe writes has three fields (e, s, d: chatpipe/entries.py); a dict display
    builds their dict in half the time of `dict(zip(...))`; any other count takes that."""
    return [
        (
            i.decode(),
            {f[0]: f[1], f[2]: f[3], f[4]: f[5]} if len(f) == 6 else _pairs(f),
        )
        for i, f in raw
    ]


@dataclass(eq=False)
class Subscription:
    message_id: str
    session_id: str
    after: StreamId
    queue: asyncio.Queue[Entry | None]
    overflowed: bool = False
    backlog: list[Entry] = field(default_factory=list)


@dataclass(eq=False)
class _Group:
    """The messages one XREAD reads: every watched message on a single Redis, a bucket's on a
    Redis Cluster (its keys share a slot: one node can read them in one command). Each group
    has its own reader task, wake-up stream and cursors."""

    wake_key: str
    wake_id: str = "0-0"
    # per watched message: the id the next read starts after, as Redis writes it
    # (`format_id` of a StreamId), and the key of its stream
    cursors: dict[str, str] = field(default_factory=dict)
    stream_keys: dict[str, str] = field(default_factory=dict)
    by_key: dict[bytes, str] = field(default_factory=dict)  # stream key -> message id
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    wake_pending: bool = False
    healthy: bool = True
    task: asyncio.Task[None] | None = None


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
        per_bucket: bool = False,
    ) -> None:
        self.reader = reader  # its own connections: it blocks in XREAD (one per group)
        # the hub reads XREAD's reply as it comes off the wire (it is this client's only
        # command): redis-py's callback would turn a RESP3 reply into the RESP2 shape, and every
        # entry's fields into a dict, in Python, for every entry (docs/benchmarks.md)
        reader.set_response_callback("XREAD", _raw_reply)
        # reads start at least this far apart: a busy hub gets more entries per XREAD
        self.read_interval_s = read_interval_s
        self.writer = writer
        self.keys = keys
        self.instance_id = instance_id
        self.metrics = metrics
        self.queue_size = queue_size
        # a Redis Cluster refuses an XREAD over several slots: one read per bucket there; a
        # single Redis reads every watched stream in one XREAD
        self.per_bucket = per_bucket
        self._groups: dict[int, _Group] = {}
        self._group_of: dict[str, _Group] = {}  # watched message id -> its group
        self._subs: dict[str, set[Subscription]] = {}
        self._started = False
        self._stopping = False

    @property
    def healthy(self) -> bool:
        return all(g.healthy for g in self._groups.values())

    def start(self) -> None:
        self._started = True
        if not self.per_bucket:
            self._group(0)
        for bucket, group in self._groups.items():
            if group.task is None:
                group.task = asyncio.create_task(self._run(group), name=f"sse-hub-{bucket}")

    def _group(self, bucket: int) -> _Group:
        group = self._groups.get(bucket)
        if group is None:
            group = self._groups[bucket] = _Group(self.keys.wakeup(self.instance_id, bucket))
            if self._started and not self._stopping:
                group.task = asyncio.create_task(self._run(group), name=f"sse-hub-{bucket}")
        return group

    async def stop(self) -> None:
        self._stopping = True
        tasks = [g.task for g in self._groups.values() if g.task is not None]
        for group in self._groups.values():
            group.changed.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for subs in self._subs.values():
            for sub in subs:
                try:
                    sub.queue.put_nowait(None)
                except asyncio.QueueFull:
                    sub.overflowed = True

    async def subscribe(self, session_id: str, message_id: str, after: StreamId) -> Subscription:
        sub = Subscription(message_id, session_id, after, asyncio.Queue(self.queue_size))
        key = self.keys.stream(session_id, message_id)
        group = self._group_of.get(message_id)
        start = after
        if group is None and after != (0, 0):
            start = await self._start_at(key, after)
        # no await from here to the cursor's update: a concurrent subscribe sees it set
        group = self._group_of.get(message_id)
        cursor = group.cursors.get(message_id) if group is not None else None
        self._subs.setdefault(message_id, set()).add(sub)
        if group is None or cursor is None:
            group = self._group(self.keys.bucket(session_id) if self.per_bucket else 0)
            self._group_of[message_id] = group
            group.cursors[message_id] = format_id(start)
            group.stream_keys[message_id] = key
            group.by_key[key.encode()] = message_id
            await self._wake(group)
        elif parse_id(cursor) > after:
            # the hub is ahead of this client: fetch (after, cursor] ourselves; the hub
            # delivers everything after cursor to our queue from now on
            raw = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self.writer.xrange(key, min="(" + format_id(after), max=cursor),
            )
            sub.backlog = [(i.decode(), f) for i, f in raw]
        return sub

    async def _start_at(self, key: str, after: StreamId) -> StreamId:
        """The hub's first cursor for a message: `after`, but never past the stream's last
        entry. The cursor is shared by every client of the message: one that joins first with
        an id from the future (valid, but later than anything written) would otherwise hold
        back every later client of it, who would get its backlog and then nothing."""
        last = cast(
            list[tuple[bytes, Any]],
            await self.writer.xrevrange(key, count=1),
        )
        return min(after, parse_id(last[0][0])) if last else (0, 0)

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.message_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.message_id]
            group = self._group_of.pop(sub.message_id)
            del group.cursors[sub.message_id]
            del group.by_key[group.stream_keys.pop(sub.message_id).encode()]

    async def _wake(self, group: _Group) -> None:
        group.changed.set()
        if group.wake_pending:
            return
        group.wake_pending = True
        try:
            async with self.writer.pipeline(transaction=False) as pipe:
                pipe.xadd(group.wake_key, {"w": 1}, maxlen=10, approximate=True)
                pipe.expire(group.wake_key, 3600)
                await pipe.execute()
        except RedisError as e:
            log.warning("sse hub wake-up failed: %s", e)

    async def _run(self, group: _Group) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        last_read = 0.0
        while not self._stopping:
            if not group.cursors:
                await group.changed.wait()
            wait = last_read + self.read_interval_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last_read = loop.time()
            group.changed.clear()
            group.wake_pending = False
            read_from = dict(group.cursors)  # what this read asks for, per message
            try:
                reply = cast(RawReply, await self._xread(group, read_from))
                group.healthy = True
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except ResponseError as e:
                # Redis refused the command (it did answer): if one watched stream is the
                # cause, only its clients end; the others are read again at once
                if self._stopping:
                    return
                if not isinstance(e, CLUSTER_TRANSIENT) and await self._isolate(
                    group, read_from, e
                ):
                    continue
                group.healthy = False
                log.warning("sse hub read refused, retrying in %.1fs: %s", backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception as e:
                if self._stopping:
                    return
                group.healthy = False
                log.warning("sse hub read failed, retrying in %.1fs: %s", backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self._dispatch(group, reply, read_from)

    async def _read_options(self, group: _Group) -> dict[str, Any]:
        """On a cluster: read from the node that owns the group's slot now (the client's map
        follows failovers and moved slots). A blocking XREAD names many keys, which redis-py
        would otherwise ask the server to find (COMMAND GETKEYS) on every read."""
        if not self.per_bucket:
            return {}
        cluster = cast(Any, self.reader)
        await cluster.initialize()  # a no-op once the client knows the cluster's slots
        return {"target_nodes": cluster.get_node_from_key(group.wake_key)}

    async def _isolate(
        self, group: _Group, read_from: dict[str, str], error: ResponseError
    ) -> bool:
        """After Redis refused the shared XREAD: read each stream of it alone (no BLOCK) and end
        the clients of every stream Redis refuses to read. True when at least one was found
        (the rest are fine to read together again)."""
        bad: list[str] = []
        for message_id, cursor in read_from.items():
            key = group.stream_keys.get(message_id)
            if key is None:
                continue
            try:
                await self.reader.execute_command(  # type: ignore[no-untyped-call]
                    "XREAD",
                    b"COUNT",
                    b"1",
                    b"STREAMS",
                    key,
                    cursor,
                    **await self._read_options(group),
                )
            except CLUSTER_TRANSIENT:
                return False  # the cluster, not this stream: the whole read is sent again
            except ResponseError as e:
                log.warning(
                    "sse hub: Redis refuses to read this message's stream after %s (%s): its"
                    " clients are ended, the other streams go on",
                    cursor,
                    e,
                    extra={"message_id": message_id},
                )
                bad.append(message_id)
        for message_id in bad:
            self._end(message_id)
        if not bad:
            log.warning("sse hub read refused for no single stream: %s", error)
        return bool(bad)

    def _end(self, message_id: str) -> None:
        """End every client of one message now (their iterators see None and stop)."""
        for sub in list(self._subs.get(message_id, ())):
            self.unsubscribe(sub)
            try:
                sub.queue.put_nowait(None)
            except asyncio.QueueFull:
                sub.overflowed = True  # it ends once it has drained its queue

    async def _xread(self, group: _Group, read_from: dict[str, str]) -> Any:
        """XREAD BLOCK of the group's wake-up stream and of every stream in `read_from`
        (message id → cursor), the raw reply. The command is built here, not by `Redis.xread`:
        it names every watched stream on every read."""
        keys = group.stream_keys
        args: list[str | bytes] = [
            "XREAD",
            b"COUNT",
            XREAD_COUNT,
            b"BLOCK",
            XREAD_BLOCK_MS,
            b"STREAMS",
            group.wake_key,
        ]
        args.extend(map(keys.__getitem__, read_from))
        args.append(group.wake_id)
        args.extend(read_from.values())
        options = await self._read_options(group)
        return await self.reader.execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def _dispatch(self, group: _Group, reply: RawReply, read_from: dict[str, str]) -> None:
        wake_key = group.wake_key.encode()
        for key, raw in reply_streams(reply):
            if not raw:
                continue
            if key == wake_key:
                group.wake_id = raw[-1][0].decode()
                continue
            message_id = group.by_key.get(key)
            if message_id is None or group.cursors.get(message_id) != read_from.get(message_id):
                # every client left while we read (None), or the last one left and a new one
                # came (a page reload) with its own cursor: these entries start at the old
                # cursor, not at the new one; the next read fetches from the new cursor
                continue
            self._deliver(group, message_id, entries_of(raw))

    def _deliver(self, group: _Group, message_id: str, entries: list[Entry]) -> None:
        group.cursors[message_id] = entries[-1][0]
        for sub in list(self._subs.get(message_id, ())):
            for entry in entries:
                try:
                    sub.queue.put_nowait(entry)
                except asyncio.QueueFull:
                    sub.overflowed = True
                    self.metrics.sse_dropped.inc()
                    self.unsubscribe(sub)
                    break
