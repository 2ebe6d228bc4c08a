"""The SSE Hub (api/hub.py) on a real Redis: one XREAD task fanning out to many subscribers.

The hub's reader is built as api/app.py builds it (`make_redis(settings, max_connections=2)`).
`Reads` wraps its `execute_command` to report each XREAD the hub issues and how it ended, so a
test can wait for "the hub is blocked in a read naming stream X" instead of sleeping. The hub
parses XREAD's reply as it comes off the wire, which differs between RESP3 (redis-py's default)
and RESP2 (`?protocol=2` in REDIS_URL): the `protocol` fixture runs the parsing tests over
both."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from api.hub import Entry, Hub, StreamId, Subscription, parse_id
from chatpipe.clients import make_redis
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings

TIMEOUT = 5
SESSION = "s-1"  # the session of the messages of a test, unless it says otherwise


@dataclass
class Read:
    streams: set[str]
    cursors: dict[str, str] = field(default_factory=dict)  # stream key -> id it reads after
    ended: asyncio.Future[BaseException | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Reads:
    """Every XREAD the hub issues, in order, as a queue the test can wait on."""

    def __init__(self, reader: Redis, writer: Redis, name: str) -> None:
        self.issued: asyncio.Queue[Read] = asyncio.Queue()
        self.writer = writer
        self.name = name
        reader.connection_pool.connection_kwargs["client_name"] = name
        real = reader.execute_command

        async def execute_command(*args: Any, **kwargs: Any) -> Any:
            if str(args[0]).upper() != "XREAD":
                return await real(*args, **kwargs)
            words = [(a.encode() if isinstance(a, str) else a).upper() for a in args]
            named = args[words.index(b"STREAMS") + 1 :]
            names = [k if isinstance(k, str) else k.decode() for k in named]
            keys, ids = names[: len(names) // 2], names[len(names) // 2 :]
            read = Read(set(keys), dict(zip(keys, ids, strict=True)))
            self.issued.put_nowait(read)
            try:
                result = await real(*args, **kwargs)
            except BaseException as e:
                read.ended.set_result(e)
                raise
            read.ended.set_result(None)
            return result

        reader.execute_command = execute_command  # type: ignore[method-assign]

    async def blocked(self) -> None:
        """Until Redis shows the hub's connection blocked in XREAD (one CLIENT LIST per round
        trip; the hub gets there within a millisecond of sending the read)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                clients = await self.writer.client_list(_type="normal")
                if any(
                    c["name"] == self.name and c["cmd"] == "xread" and "b" in c["flags"]
                    for c in clients
                ):
                    return

    async def current(self) -> Read:
        """The read the hub is in now (or issues next): the first one not ended yet."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                read = await self.issued.get()
                if not read.ended.done():
                    return read

    async def until(self, stream_key: str, present: bool = True) -> Read:
        """The next read issued that names (or, with present=False, omits) `stream_key`."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                read = await self.issued.get()
                if (stream_key in read.streams) == present:
                    return read


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    return cast(int, request.param)


def with_protocol(settings: Settings, protocol: int) -> Settings:
    """The settings with REDIS_URL asking for this protocol (3 is also redis-py's default)."""
    url = settings.redis_url
    return settings.model_copy(
        update={"redis_url": f"{url}{'&' if '?' in url else '?'}protocol={protocol}"}
    )


def new_hub(settings: Settings, redis: Redis, queue_size: int) -> tuple[Hub, Reads, Metrics]:
    reader = make_redis(settings, max_connections=2)
    metrics = Metrics()
    hub = Hub(reader, redis, Keys.from_settings(settings), "api-test", metrics, queue_size)
    return hub, Reads(reader, redis, f"hub-{settings.key_prefix}"), metrics


async def close_hub(hub: Hub) -> None:
    # bounded: a hub whose stop() hung (test_stop_ends_the_hub_even_when_... guards against
    # that) must not hang the teardown of every test after it
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1):
            await hub.stop()
    await hub.reader.aclose(close_connection_pool=True)


@contextlib.asynccontextmanager
async def running_hub(
    settings: Settings, redis: Redis, queue_size: int = 100
) -> AsyncIterator[tuple[Hub, Reads, Metrics]]:
    hub, reads, metrics = new_hub(settings, redis, queue_size)
    hub.start()
    try:
        yield hub, reads, metrics
        await reads.blocked()
    finally:
        await close_hub(hub)


async def add(
    redis: Redis, keys: Keys, message_id: str, n: int, event: str = "chunk", session: str = SESSION
) -> str:
    fields = {"e": event, "s": n, "d": f'{{"n": {n}}}'}
    raw = await redis.xadd(keys.stream(session, message_id), fields)
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def take(sub: Subscription, count: int) -> list[Entry]:
    """`count` entries from the subscriber's queue."""
    got: list[Entry] = []
    async with asyncio.timeout(TIMEOUT):
        while len(got) < count:
            entry = await sub.queue.get()
            assert entry is not None, "hub stopped"
            got.append(entry)
    return got


async def until_done(sub: Subscription) -> list[Entry]:
    """What a subscriber reads: its backlog, then its queue up to the `done` entry."""
    got = list(sub.backlog)
    async with asyncio.timeout(TIMEOUT):
        while not got or got[-1][1].get(b"e") != b"done":
            entry = await sub.queue.get()
            assert entry is not None, "hub stopped"
            got.append(entry)
    return got


def after(entries: list[Entry], position: StreamId) -> list[str]:
    """Ids of the entries after `position`, asserting the delivery was in order, each once.
    (Entries at or before the position may come too; the SSE route skips them.)"""
    ids = [parse_id(i) for i, _ in entries]
    assert ids == sorted(set(ids)), f"duplicates or disorder: {ids}"
    return [i for i, _ in entries if parse_id(i) > position]


async def test_subscribers_at_different_positions_get_every_later_entry_once_in_order(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    ids = [await add(redis, keys, "m-1", n) for n in range(3)]
    async with running_hub(settings, redis) as (hub, _, _):
        from_start = await hub.subscribe(SESSION, "m-1", (0, 0))
        resumed = await hub.subscribe(SESSION, "m-1", parse_id(ids[1]))  # Last-Event-ID = 2nd entry
        ids += [await add(redis, keys, "m-1", n) for n in range(3, 6)]
        first_six = await take(from_start, 6)
        assert after(first_six, (0, 0)) == ids

        # a third one joins late, behind the hub's position: it gets the gap from Redis (its
        # backlog) and the rest from the hub, nothing twice
        late = await hub.subscribe(SESSION, "m-1", parse_id(ids[3]))
        assert [i for i, _ in late.backlog] == ids[4:6]
        ids.append(await add(redis, keys, "m-1", 6, "done"))

        assert after(first_six + await until_done(from_start), (0, 0)) == ids
        assert after(await until_done(resumed), parse_id(ids[1])) == ids[2:]
        assert after(await until_done(late), parse_id(ids[3])) == ids[4:]
        for sub in (from_start, resumed, late):
            assert sub.queue.empty()


async def test_each_message_goes_only_to_its_own_subscribers(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    # two sessions in two buckets (keys.bucket): one reader reads both
    assert keys.bucket("s-a") != keys.bucket("s-b")
    async with running_hub(settings, redis) as (hub, _, _):
        a = await hub.subscribe("s-a", "m-a", (0, 0))
        b = await hub.subscribe("s-b", "m-b", (0, 0))
        ida = [await add(redis, keys, "m-a", n, session="s-a") for n in range(3)]
        idb = [await add(redis, keys, "m-b", n, session="s-b") for n in range(2)]
        assert [i for i, _ in await take(a, 3)] == ida
        assert [i for i, _ in await take(b, 2)] == idb
        assert a.queue.empty()
        assert b.queue.empty()


async def test_a_new_subscription_wakes_the_blocked_read(settings: Settings, redis: Redis) -> None:
    keys = Keys.from_settings(settings)
    async with running_hub(settings, redis) as (hub, reads, _):
        first = await hub.subscribe(SESSION, "m-1", (0, 0))
        await add(redis, keys, "m-1", 0)
        await take(first, 1)
        # the hub is now blocked in an XREAD (block 10 s) that does not name m-2
        await reads.until(keys.stream(SESSION, "m-1"))
        await reads.blocked()
        second = await hub.subscribe(SESSION, "m-2", (0, 0))
        new_id = await add(redis, keys, "m-2", 0)
        # well within the 10 s block: only the wake-up makes the hub read m-2 this soon
        (got_id, _), *_ = await take(second, 1)
        assert got_id == new_id


async def test_the_last_client_leaving_takes_its_stream_out_of_the_read(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    async with running_hub(settings, redis) as (hub, reads, _):
        keep = await hub.subscribe(SESSION, "m-keep", (0, 0))
        gone = await hub.subscribe(SESSION, "m-gone", (0, 0))
        await reads.until(keys.stream(SESSION, "m-gone"))
        hub.unsubscribe(gone)
        hub.unsubscribe(gone)  # twice is harmless
        await add(redis, keys, "m-keep", 0)  # ends the current read; the next omits m-gone
        await take(keep, 1)
        read = await reads.until(keys.stream(SESSION, "m-gone"), present=False)
        assert keys.stream(SESSION, "m-keep") in read.streams


async def test_a_slow_subscriber_is_dropped_without_holding_up_the_others(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    async with running_hub(settings, redis, queue_size=4) as (hub, _, metrics):
        slow = await hub.subscribe(SESSION, "m-1", (0, 0))  # never reads
        fast = await hub.subscribe(SESSION, "m-1", (0, 0))
        ids = []
        for n in range(10):
            ids.append(await add(redis, keys, "m-1", n))
            (got, _), *_ = await take(fast, 1)  # the fast one gets each entry as it comes
            assert got == ids[-1]
            assert slow.overflowed == (n >= 4), n
        # the slow one kept what fitted and got nothing after it was dropped; it resumes from
        # Redis with Last-Event-ID = ids[3]
        assert [slow.queue.get_nowait()[0] for _ in range(4)] == ids[:4]  # type: ignore[index]
        assert slow.queue.empty()
        dropped = metrics.registry.get_sample_value("chatpipe_sse_slow_clients_dropped_total")
        assert dropped == 1


async def test_stop_ends_every_subscription(settings: Settings, redis: Redis) -> None:
    keys = Keys.from_settings(settings)
    hub, reads, _ = new_hub(settings, redis, 100)
    hub.start()
    try:
        subs = [await hub.subscribe(SESSION, m, (0, 0)) for m in ("m-1", "m-2")]
        await reads.until(keys.stream(SESSION, "m-2"))
        await reads.blocked()
    finally:
        await close_hub(hub)
    for sub in subs:
        assert sub.queue.get_nowait() is None  # the SSE generator ends on it


async def test_stop_ends_the_hub_even_when_the_cancel_lands_while_a_read_is_sent(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    hub, reads, _ = new_hub(settings, redis, 100)
    hub.start()
    try:
        sub = await hub.subscribe(SESSION, "m-1", (0, 0))
        await add(redis, keys, "m-1", 0)
        await take(sub, 1)
        await reads.current()  # right after a delivery the hub is sending its next XREAD
        async with asyncio.timeout(1):  # that read blocks 10 s; its socket times out at 5 s
            await hub.stop()
    finally:
        await close_hub(hub)


async def test_an_idle_read_ends_normally_and_the_hub_stays_healthy(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    async with running_hub(settings, redis) as (hub, reads, _):
        sub = await hub.subscribe(SESSION, "m-1", (0, 0))
        await add(redis, keys, "m-1", 0)
        await take(sub, 1)
        idle = await reads.current()  # nothing more arrives: it blocks for 10 s
        assert keys.stream(SESSION, "m-1") in idle.streams
        async with asyncio.timeout(15):
            error = await idle.ended
        assert error is None, repr(error)
        assert hub.healthy


async def test_stop_with_a_full_subscriber_queue_ends_every_subscription(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    hub, reads, _ = new_hub(settings, redis, 2)
    hub.start()
    try:
        full = await hub.subscribe(SESSION, "m-1", (0, 0))
        reader = await hub.subscribe(SESSION, "m-1", (0, 0))
        other = await hub.subscribe(SESSION, "m-2", (0, 0))
        await add(redis, keys, "m-1", 0)
        await add(redis, keys, "m-1", 1)
        await take(reader, 2)  # delivered to both at once: `full` now holds 2 of 2
        assert full.queue.full()
        assert not full.overflowed
        await reads.blocked()
        await hub.stop()
        left = [full.queue.get_nowait() for _ in range(full.queue.qsize())]
        # its SSE generator ends: after draining (overflowed) or on the end marker
        assert full.overflowed or left[-1] is None
        for sub in (reader, other):
            assert sub.queue.get_nowait() is None
    finally:
        tasks = [g.task for g in hub._groups.values() if g.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await hub.reader.aclose(close_connection_pool=True)


async def test_a_client_joining_just_after_the_last_one_left_gets_the_whole_stream(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys.from_settings(settings)
    async with running_hub(settings, redis) as (hub, reads, _):
        first = await hub.subscribe(SESSION, "m-1", (0, 0))
        ids = [await add(redis, keys, "m-1", 0)]
        await take(first, 1)
        await reads.until(keys.stream(SESSION, "m-1"))  # the hub reads m-1 after ids[0] now
        await reads.blocked()
        hub.unsubscribe(first)  # the old tab's SSE connection closes
        joining = asyncio.create_task(hub.subscribe(SESSION, "m-1", (0, 0)))  # the reloaded page
        ids.append(await add(redis, keys, "m-1", 1))  # the stream goes on meanwhile
        second = await joining
        ids.append(await add(redis, keys, "m-1", 2, "done"))
        assert after(await until_done(second), (0, 0)) == ids


async def test_one_read_of_several_streams_and_the_wakeup_stream_delivers_each_entry_whole(
    settings: Settings, redis: Redis, protocol: int
) -> None:
    """One XREAD, its reply parsed over RESP2 and RESP3: ids with a sequence above 0, several
    streams (of sessions in three buckets: a single Redis reads them in one XREAD), the wake-up
    stream, every field of each entry; then the next read starts after the last id of each
    stream."""
    keys = Keys.from_settings(settings)
    sa, sb, sc = "s-a", "s-b", "s-c"
    assert len({keys.bucket(sa), keys.bucket(sb), keys.bucket(sc)}) == 3
    hub, reads, _ = new_hub(with_protocol(settings, protocol), redis, 100)  # not started
    try:
        fields = {b"e": b"chunk", b"s": b"1", b"d": b'{"text": "h\xc3\xa9"}'}
        await redis.xadd(keys.stream(sa, "m-a"), fields, id="5-1")
        done = {b"e": b"done", b"s": b"2", b"d": b"{}"}
        await redis.xadd(keys.stream(sa, "m-a"), done, id="5-2")
        await redis.xadd(keys.stream(sb, "m-b"), fields, id="7-0")
        a = await hub.subscribe(sa, "m-a", (0, 0))
        b = await hub.subscribe(sb, "m-b", (0, 0))
        c = await hub.subscribe(sc, "m-c", (0, 0))  # nothing in it yet
        (group,) = hub._groups.values()  # a single Redis: one reader for every bucket
        read_from = dict(group.cursors)
        reply = await hub._xread(group, read_from)
        assert isinstance(reply, dict if protocol == 3 else list)  # both shapes are covered
        hub._dispatch(group, reply, read_from)
        assert [a.queue.get_nowait() for _ in range(2)] == [("5-1", fields), ("5-2", done)]
        assert b.queue.get_nowait() == ("7-0", fields)
        for sub in (a, b, c):
            assert sub.queue.empty()
        woken = await redis.xrevrange(group.wake_key, count=1)
        assert group.wake_id == woken[0][0].decode()  # the next read waits for a newer wake-up

        await redis.xadd(keys.stream(sa, "m-a"), fields, id="5-10")
        await redis.xadd(keys.stream(sc, "m-c"), fields, id="9-3")
        read_from = dict(group.cursors)
        hub._dispatch(group, await hub._xread(group, read_from), read_from)
        read, again = reads.issued.get_nowait(), reads.issued.get_nowait()
        assert read.cursors == {
            group.wake_key: "0-0",
            keys.stream(sa, "m-a"): "0-0",
            keys.stream(sb, "m-b"): "0-0",
            keys.stream(sc, "m-c"): "0-0",
        }
        assert again.cursors == {
            group.wake_key: group.wake_id,
            keys.stream(sa, "m-a"): "5-2",
            keys.stream(sb, "m-b"): "7-0",
            keys.stream(sc, "m-c"): "0-0",
        }
        assert a.queue.get_nowait() == ("5-10", fields)
        assert c.queue.get_nowait() == ("9-3", fields)
        assert b.queue.empty()
    finally:
        await close_hub(hub)


async def test_a_running_hub_streams_every_entry_over_either_protocol(
    settings: Settings, redis: Redis, protocol: int
) -> None:
    keys = Keys.from_settings(settings)
    async with running_hub(with_protocol(settings, protocol), redis) as (hub, reads, _):
        early = await hub.subscribe(SESSION, "m-1", (0, 0))
        ids = [await add(redis, keys, "m-1", n) for n in range(3)]
        await take(early, 3)
        await reads.blocked()
        # a client resuming at the 2nd entry, behind the hub: its gap comes as its backlog
        resumed = await hub.subscribe(SESSION, "m-1", parse_id(ids[1]))
        assert [i for i, _ in resumed.backlog] == ids[2:]
        ids.append(await add(redis, keys, "m-1", 3, "done"))
        assert after(await until_done(resumed), parse_id(ids[1])) == ids[2:]
        assert [i for i, _ in await until_done(early)] == ids[3:]
        assert hub.healthy
