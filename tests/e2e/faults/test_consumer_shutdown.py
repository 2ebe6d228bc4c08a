"""Issue 4, fault 2: SIGTERM of an ai_consumer during 20 live streams.

The documented behaviour (docs/reliability.md): the consumer stops fetching, lets running
streams finish within SHUTDOWN_GRACE_S, commits what is finished and exits 0; what still runs
after the grace period is handed over (leases released, offsets left uncommitted), and the next
owner restarts it (`restart`, then the whole answer). Restarting the group never re-answers a
finished message: the group's committed offsets are the end offsets.

The module's cluster has no consumer of its own: each test starts the consumers it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api, ClusterShape
from tests.e2e.faults.consumer_support import (
    all_committed,
    kafka_checks,
    kinds,
    recorded,
    sse_checks,
    states,
    wait_assigned,
)
from tests.e2e.records import read_responses
from tests.support.cluster import Cluster, new_session
from tests.support.partitions import one_session_per_partition
from tests.support.procs import Proc
from tests.support.sse import chunks
from tests.support.wait import apoll

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

STREAMS = 20
EVERY_PARTITION = set(range(12))


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "sim_token_delay_ms": 100,
        "sim_first_token_delay_ms": 100,
        "kafka_session_timeout_ms": 6000,
        "lease_ms": 3000,
    }


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """2 api + 1 cancel_listener; no ai_consumer (the tests start and stop their own)."""
    return ClusterShape(consumers=0)


@contextlib.contextmanager
def consumers(cluster: Cluster) -> Iterator[list[Proc]]:
    """Consumers a test starts go into this list; whatever still runs is stopped at the end."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            p.terminate(timeout=20)


async def start_streams(apis: tuple[Api, Api], tokens: int) -> tuple[list[str], list[str]]:
    sessions = [new_session() for _ in range(STREAMS)]
    accepted = await asyncio.gather(
        *(apis[i % 2].chat(s, max_tokens=tokens) for i, s in enumerate(sessions))
    )
    return sessions, [x["message_id"] for x in accepted]


async def all_streaming(redis: Redis, settings: Settings, ids: list[str]) -> None:
    """Wait until the consumer has started every one of `ids` (`streaming` in Redis)."""

    async def check() -> bool | None:
        now = await states(redis, settings, ids)
        return True if set(now.values()) == {"streaming"} else None

    await apoll("every stream started", check, within=20)


async def test_sigterm_lets_running_streams_finish_and_commits_them(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    with consumers(cluster) as started:
        first = cluster.spawn("ai_consumer", "drain-1", {"shutdown_grace_s": 20})
        started.append(first)
        await wait_assigned(first, EVERY_PARTITION)
        # 40 tokens at 100 ms: 4 s answers, well inside the 20 s grace period
        sessions, ids = await start_streams(apis, tokens=40)
        await all_streaming(redis, settings, ids)
        first.signal(signal.SIGTERM)  # every stream is live when the signal lands
        async with recorded(apis[(i + 1) % 2].stream(m) for i, m in enumerate(ids)) as streams:
            code = await asyncio.to_thread(first.terminate, 30)
            assert code == 0, first.tail()
            # the process exited only after answering: every done is already there
            await asyncio.gather(*(s.wait_done(within=5) for s in streams))
            events = {m: s.events for m, s in zip(ids, streams, strict=True)}

        assert first.find(
            lambda r: r.get("msg") == f"stopping: {STREAMS} streams running, grace 20.0s"
        )
        assert not first.find(lambda r: "handed over" in str(r.get("msg")))
        for m in ids:
            sse_checks(m, events[m])
            assert "restart" not in kinds(events[m]), m
            assert len(chunks(events[m])) == 40, m
            assert events[m][-1].json()["status"] == "completed", m
        assert set((await states(redis, settings, ids)).values()) == {"completed"}
        # offsets: everything it finished is committed on the broker
        await all_committed(settings, within=5)

        # restart the group: the new member starts at the committed offsets and answers
        # nothing again (a re-read record would show as "already completed, skipped")
        second = cluster.spawn("ai_consumer", "drain-2")
        started.append(second)
        await wait_assigned(second, EVERY_PARTITION)
        probe_session = new_session()
        probe = await apis[0].chat(probe_session, max_tokens=3)
        async with apis[1].stream(probe["message_id"]) as s:
            await s.until_done(within=15)
        assert not second.find(lambda r: "skipped" in str(r.get("msg"))), second.tail()
        seen = await read_responses(
            settings,
            {*sessions, probe_session},
            lambda evs: any(
                e.get("message_id") == probe["message_id"] and e["type"] == "chat.completed"
                for e in evs
            ),
        )
        for m in ids:
            mine = kafka_checks(m, seen)
            assert [e["type"] for e in mine].count("chat.started") == 1, m
            assert {e["instance_id"] for e in mine} == {first.instance_id}, m


async def test_sigterm_hands_over_what_outlives_the_grace_period(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    with consumers(cluster) as started:
        leaving = cluster.spawn("ai_consumer", "handover-1", {"shutdown_grace_s": 1})
        started.append(leaving)
        await wait_assigned(leaving, EVERY_PARTITION)
        # 60 tokens at 100 ms: 6 s answers, far beyond the 1 s grace period
        sessions, ids = await start_streams(apis, tokens=60)
        await all_streaming(redis, settings, ids)
        # every stream is live when the signal lands (opening 20 SSE connections first took
        # longer than the 6 s answers on a loaded machine: they had all completed by then)
        leaving.signal(signal.SIGTERM)
        async with recorded(apis[(i + 1) % 2].stream(m) for i, m in enumerate(ids)) as streams:
            code = await asyncio.to_thread(leaving.terminate, 20)
            assert code == 0, leaving.tail()
            assert leaving.find(
                lambda r: (
                    r.get("msg")
                    == f"handed over {STREAMS} streams still running after the grace period"
                )
            ), leaving.tail()
            # handed over: still `streaming` (not failed), waiting for the next owner
            assert set((await states(redis, settings, ids)).values()) == {"streaming"}
            taker = cluster.spawn("ai_consumer", "handover-2")
            started.append(taker)
            await asyncio.gather(*(s.wait_done(within=30) for s in streams))
            events = {m: s.events for m, s in zip(ids, streams, strict=True)}

        for m in ids:
            evs = events[m]
            sse_checks(m, evs)
            assert kinds(evs).count("restart") == 1, (m, kinds(evs))
            after = evs[kinds(evs).index("restart") + 1 :]
            assert len(chunks(after)) == 60, f"{m}: the new answer is not whole"
            assert evs[-1].json()["status"] == "completed", m
        seen = await read_responses(
            settings,
            set(sessions),
            lambda evs: sum(e.get("type") == "chat.completed" for e in evs) >= STREAMS,
        )
        for m in ids:
            mine = kafka_checks(m, seen)
            assert mine[-1]["instance_id"] == taker.instance_id, m
        assert set((await states(redis, settings, ids)).values()) == {"completed"}
        await all_committed(settings, within=10)


WAITED_TOKENS = 300  # 100 ms apart: 30 s answers, longer than a consumer takes to join


def waiting_for(proc: Proc) -> int:
    """How many messages `proc` found streamed by another instance (and waited for)."""
    return len(proc.find(lambda r: str(r.get("msg", "")).startswith("streamed by ")))


async def test_sigterm_of_a_consumer_that_only_waits_for_another_leaves_at_once(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    """A consumer that joins while another streams gets those answers' records again (their
    offsets are not committed until they end) and waits for that instance to end them. It
    streams nothing itself: SIGTERM must not keep it, and the partitions it holds, until
    someone else's answers end (or its grace period does)."""
    with consumers(cluster) as started:
        first = cluster.spawn("ai_consumer", "wait-1")
        started.append(first)
        await wait_assigned(first, EVERY_PARTITION)
        sessions = one_session_per_partition(settings.topic_partitions)
        accepted = await asyncio.gather(
            *(apis[i % 2].chat(s, max_tokens=WAITED_TOKENS) for i, s in enumerate(sessions))
        )
        ids = [x["message_id"] for x in accepted]
        await all_streaming(redis, settings, ids)

        second = cluster.spawn("ai_consumer", "wait-2", {"shutdown_grace_s": 60})
        started.append(second)
        share = await wait_assigned(second)

        async def waits_for_its_share() -> bool | None:
            return True if waiting_for(second) >= len(share) else None

        await apoll(f"{second.name} waiting for {len(share)} answers", waits_for_its_share, 30)
        second.signal(signal.SIGTERM)
        code = await asyncio.to_thread(second.terminate, 70)
        assert code == 0, second.tail()
        # it left while the answers it waited for still streamed on the first consumer
        assert set((await states(redis, settings, ids)).values()) == {"streaming"}, second.tail()
        assert second.find(lambda r: r.get("msg") == "stopping: 0 streams running, grace 60.0s")
        assert not second.find(lambda r: "handed over" in str(r.get("msg"))), second.tail()

        # the first consumer still streams them as it did, never restarted; they are stopped
        # here (not awaited: 30 s answers), and the first consumer, back on every partition,
        # answers each record once
        async with recorded(apis[i % 2].stream(m) for i, m in enumerate(ids)) as streams:
            await asyncio.gather(*(s.wait_for(lambda e: bool(chunks(e)), 20) for s in streams))
            cancels = await asyncio.gather(
                *(
                    apis[i % 2].cancel(s, m)
                    for i, (s, m) in enumerate(zip(sessions, ids, strict=True))
                )
            )
            assert {r.status_code for r in cancels} == {200}, [r.text for r in cancels]
            await asyncio.gather(*(s.wait_done(within=30) for s in streams))
            events = {m: s.events for m, s in zip(ids, streams, strict=True)}
        for m in ids:
            sse_checks(m, events[m])
            assert "restart" not in kinds(events[m]), m
            assert [e.seq for e in chunks(events[m])] == list(range(1, len(chunks(events[m])) + 1))
            assert events[m][-1].json()["status"] == "cancelled", m
        assert set((await states(redis, settings, ids)).values()) == {"cancelled"}
        seen = await read_responses(
            settings,
            set(sessions),
            lambda evs: sum(e.get("type") == "chat.cancelled" for e in evs) >= len(ids),
        )
        for m in ids:
            mine = kafka_checks(m, seen)
            assert [e["type"] for e in mine].count("chat.started") == 1, m
            assert {e["instance_id"] for e in mine} == {first.instance_id}, m
