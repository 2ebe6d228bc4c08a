"""What the consumer fault tests (test_consumer_*.py) check, seen from outside the processes:
SSE events as a browser gets them, chat.responses as a Spring frontend reads it, the message
states in Redis, the consumer group's committed offsets on the broker, and log lines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from chatpipe.keys import Keys
from chatpipe.settings import Settings
from tests.e2e.records import Event, of_message, terminal
from tests.support.cluster import ASSIGNED, parse_partitions
from tests.support.keys import msg_keys
from tests.support.procs import Proc
from tests.support.sse import SSEEvent, SSEStream
from tests.support.wait import apoll

FINAL = {"completed", "cancelled", "failed"}


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def assignment_times(proc: Proc) -> list[datetime]:
    """When `proc` logged each of its partition assignments, oldest first."""
    return [
        at(str(line["at"]))
        for line in proc.lines()
        if str(line.get("msg", "")).startswith(ASSIGNED)
    ]


async def live_at(
    redis: Redis, settings: Settings, message_ids: Iterable[str], moment: datetime
) -> int:
    """How many of `message_ids` were streaming at `moment`, after the fact: their `started`
    and `finished` times in `chat:msg:{id}` (the consumer's clock, the same host's)."""
    keys = Keys.from_settings(settings)
    ids = list(message_ids)
    names = [n for n in await msg_keys(redis, keys, ids) if n is not None]
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hmget(name, ["started", "finished"])
        values = await pipe.execute()
    live = 0
    for started, finished in values:
        if started and finished and at(started.decode()) <= moment < at(finished.decode()):
            live += 1
    return live


def assignments(proc: Proc) -> list[set[int]]:
    """Every partition assignment `proc` logged, oldest first."""
    return [
        parse_partitions(str(line["msg"]))
        for line in proc.lines()
        if str(line.get("msg", "")).startswith(ASSIGNED)
    ]


async def wait_assigned(
    proc: Proc, partitions: set[int] | None = None, after: int = 0, within: float = 30.0
) -> set[int]:
    """The first assignment `proc` logged after its `after` first ones (that is `partitions`,
    when given). Fails when the process exits meanwhile."""

    async def check() -> set[int] | None:
        assert proc.alive(), f"{proc.name} exited ({proc.returncode()}):\n{proc.tail()}"
        for share in assignments(proc)[after:]:
            if partitions is None or share == partitions:
                return share
        return None

    return await apoll(f"{proc.name} assigned {partitions or 'partitions'}", check, within)


def sse_checks(message_id: str, events: list[SSEEvent]) -> None:
    """What one SSE connection must show whatever happened to the consumers: ids and seqs
    strictly increasing (nothing delivered twice), exactly one `done`, and it is the last."""
    ids = [tuple(int(x) for x in (e.id or "").split("-")) for e in events]
    assert ids == sorted(set(ids)), f"{message_id}: SSE ids not strictly increasing: {ids}"
    seqs = [e.seq for e in events if e.event in ("chunk", "restart")]
    assert seqs == sorted(set(seqs)), f"{message_id}: seqs not strictly increasing: {seqs}"
    names = [e.event for e in events]
    assert names.count("done") == 1, f"{message_id}: events {names}"
    assert names[-1] == "done", f"{message_id}: events {names}"


def kafka_checks(message_id: str, events: list[Event]) -> list[Event]:
    """chat.responses for one message: exactly one terminal event, the last, seqs strictly
    increasing in partition order. Returns the message's events."""
    mine = of_message(events, message_id)
    assert len(terminal(mine)) == 1, f"{message_id}: terminal events {terminal(mine)}"
    assert mine[-1] is terminal(mine)[0], f"{message_id}: {[e['type'] for e in mine]}"
    seqs = [int(e["seq"]) for e in mine]
    assert seqs == sorted(set(seqs)), f"{message_id}: chat.responses seqs {seqs}"
    return mine


async def msg_field(
    redis: Redis, settings: Settings, message_ids: Iterable[str], field: str
) -> dict[str, str]:
    """One field of each message's `chat:msg:{id}` ("" when it has none)."""
    keys = Keys.from_settings(settings)
    ids = list(message_ids)
    names = await msg_keys(redis, keys, ids)
    known = [(m, n) for m, n in zip(ids, names, strict=True) if n is not None]
    async with redis.pipeline(transaction=False) as pipe:
        for _, name in known:
            pipe.hget(name, field)
        values = await pipe.execute()
    found = {m: v.decode() for (m, _), v in zip(known, values, strict=True) if v is not None}
    return {m: found.get(m, "") for m in ids}


async def states(redis: Redis, settings: Settings, message_ids: Iterable[str]) -> dict[str, str]:
    """The state of each message ("" when it has none)."""
    return await msg_field(redis, settings, message_ids, "state")


async def owners(redis: Redis, settings: Settings, message_ids: Iterable[str]) -> dict[str, str]:
    """The instance that owns (or owned) each message."""
    return await msg_field(redis, settings, message_ids, "owner")


async def group_offsets(settings: Settings) -> tuple[dict[int, int], dict[int, int]]:
    """(committed offset of the consumer group, end offset) per partition of chat.requests,
    as the broker has them (-1: nothing committed)."""
    topic = settings.requests_topic
    parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    await consumer.start()
    try:
        raw = await admin.list_consumer_group_offsets(settings.consumer_group)
        end = await consumer.end_offsets(parts)
    finally:
        await consumer.stop()
        await admin.close()
    committed = {tp.partition: meta.offset for tp, meta in raw.items() if tp.topic == topic}
    return (
        {p: committed.get(p, -1) for p in range(settings.topic_partitions)},
        {tp.partition: off for tp, off in end.items()},
    )


async def all_committed(settings: Settings, within: float = 15.0) -> dict[int, int]:
    """Wait until the group's committed offset is the end offset of every partition that has
    records; returns the end offsets."""
    seen: list[tuple[dict[int, int], dict[int, int]]] = []

    async def check() -> dict[int, int] | None:
        committed, end = await group_offsets(settings)
        seen[:] = [(committed, end)]
        behind = {p for p, e in end.items() if e > 0 and committed[p] != e}
        return None if behind else end

    try:
        return await apoll("committed offsets at the end offsets", check, within, interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}: committed, end = {seen}") from None


@contextlib.asynccontextmanager
async def recorded(streams: Iterable[SSEStream]) -> AsyncIterator[list[SSEStream]]:
    """Open SSE connections concurrently and record each in the background."""
    # Not `gather(stack.enter_async_context(...))`: when one open fails, the stack unwinds while
    # the other opens still run, and those push their exits onto a stack already closed (their
    # sockets leak). Every open is awaited, then each opened one is registered.
    wanted = list(streams)
    async with contextlib.AsyncExitStack() as stack:
        results = await asyncio.gather(*(s.__aenter__() for s in wanted), return_exceptions=True)
        for stream, result in zip(wanted, results, strict=True):
            if not isinstance(result, BaseException):
                stack.push_async_exit(stream.__aexit__)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        yield [s.record() for s in wanted]  # closed by the stack (SSEStream.close waits for
        # the server to end a stream that got its `done`: see there)


def texts_after_last_restart(events: list[SSEEvent]) -> str:
    """The answer text a client shows at the end: the chunks after the last `restart`."""
    start = max((i for i, e in enumerate(events) if e.event == "restart"), default=-1)
    return "".join(str(e.json()["delta"]) for e in events[start + 1 :] if e.event == "chunk")


def kinds(events: list[Any]) -> list[str]:
    return [e.event for e in events]
