"""Lanes: FIFO per session, sessions in parallel, never more than max_concurrent running.

The fake run function blocks each message on an asyncio.Event the test controls, so every
step waits on an event (with a timeout), never on the clock."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka import TopicPartition

from ai_consumer.lanes import Lanes, Work
from chatpipe.schemas import ChatRequest

TP0 = TopicPartition("chat.requests", 0)
TP1 = TopicPartition("chat.requests", 1)
TIMEOUT = 5


def work(message_id: str, session_id: str, tp: TopicPartition = TP0, offset: int = 0) -> Work:
    return Work(tp, offset, ChatRequest(message_id=message_id, session_id=session_id, message="x"))


class FakeRun:
    """Records start/end order; each message runs until the test releases it."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.log: list[tuple[str, str]] = []
        self.release: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.finished: list[str] = []
        self.fail = fail or set()
        self.left: set[str] = set()  # runs that end without being done (left to another)
        self.running = 0
        self.peak = 0

    async def run(self, w: Work) -> bool:
        m = w.request.message_id
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.log.append(("start", m))
        self.started[m].set()
        try:
            await self.release[m].wait()
            if m in self.fail:
                raise RuntimeError(f"handler bug on {m}")
            return m not in self.left
        finally:
            self.running -= 1
            self.log.append(("end", m))

    def done(self, w: Work) -> None:
        self.finished.append(w.request.message_id)

    async def wait_started(self, *message_ids: str) -> None:
        async with asyncio.timeout(TIMEOUT):
            for m in message_ids:
                await self.started[m].wait()

    def starts(self) -> list[str]:
        return [m for kind, m in self.log if kind == "start"]


async def test_one_session_runs_in_order_one_at_a_time() -> None:
    fake = FakeRun()
    lanes = Lanes(10, fake.run, fake.done)
    for i in range(3):
        lanes.submit(work(f"a{i}", "A", offset=i))
    await fake.wait_started("a0")
    assert fake.starts() == ["a0"]  # a1 waits behind a0 although slots are free
    assert (lanes.running, lanes.waiting, len(lanes)) == (1, 2, 3)
    fake.release["a0"].set()
    await fake.wait_started("a1")
    assert fake.log[:3] == [("start", "a0"), ("end", "a0"), ("start", "a1")]
    fake.release["a1"].set()
    fake.release["a2"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert fake.starts() == ["a0", "a1", "a2"]
    assert fake.finished == ["a0", "a1", "a2"]
    assert lanes.sessions == []
    assert len(lanes) == 0


async def test_sessions_run_in_parallel() -> None:
    fake = FakeRun()
    lanes = Lanes(10, fake.run, fake.done)
    lanes.submit(work("a0", "A"))
    lanes.submit(work("a1", "A"))
    lanes.submit(work("b0", "B"))
    lanes.submit(work("c0", "C"))
    # b0 and c0 start while a0 is still running: one slow answer does not hold up others
    await fake.wait_started("a0", "b0", "c0")
    assert sorted(lanes.sessions) == ["A", "B", "C"]
    assert lanes.running == 3
    for m in ("a0", "a1", "b0", "c0"):
        fake.release[m].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert sorted(fake.finished) == ["a0", "a1", "b0", "c0"]


async def test_a_refused_request_is_ended_at_once_not_behind_its_session() -> None:
    """if_busy reject: refused because the session is busy, so it must not wait for it."""
    fake = FakeRun()
    lanes = Lanes(10, fake.run, fake.done)
    lanes.submit(work("a0", "A"))
    refused = work("a1", "A", offset=1)
    refused.refused = "busy: session A is busy with message a0"
    lanes.submit(refused)
    await fake.wait_started("a0", "a1")  # a1 runs while a0 still runs
    fake.release["a1"].set()
    fake.release["a0"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert sorted(fake.finished) == ["a0", "a1"]


async def test_never_more_than_max_concurrent_streams_run() -> None:
    fake = FakeRun()
    lanes = Lanes(2, fake.run, fake.done)
    sessions = [f"s{i}" for i in range(6)]
    for s in sessions:
        lanes.submit(work(f"m-{s}", s))
    await fake.wait_started("m-s0", "m-s1")
    assert lanes.running == 2
    assert lanes.waiting == 4
    # release one at a time: each release lets exactly one more start
    for i, s in enumerate(sessions):
        fake.release[f"m-{s}"].set()
        if i + 2 < len(sessions):
            await fake.wait_started(f"m-{sessions[i + 2]}")
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    running = 0
    for kind, _ in fake.log:
        running += 1 if kind == "start" else -1
        assert running <= 2, fake.log
    assert fake.peak == 2
    assert lanes.peak_running == 2
    assert sorted(fake.finished) == sorted(f"m-{s}" for s in sessions)


async def test_a_busy_session_does_not_starve_others_waiting_for_a_slot() -> None:
    fake = FakeRun()
    lanes = Lanes(1, fake.run, fake.done)
    for i in range(4):
        lanes.submit(work(f"a{i}", "A", offset=i))
    await fake.wait_started("a0")
    lanes.submit(work("b0", "B", offset=10))  # waits for the only slot
    fake.release["a0"].set()
    await fake.wait_started("b0")
    assert fake.starts() == ["a0", "b0"]  # not a1: the slot goes to the session waiting longest
    for m in ("a1", "a2", "a3", "b0"):
        fake.release[m].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert fake.starts() == ["a0", "b0", "a1", "a2", "a3"]


async def test_drop_partitions_forgets_queued_work_of_revoked_partitions() -> None:
    fake = FakeRun()
    lanes = Lanes(10, fake.run, fake.done)
    lanes.submit(work("a0", "A", TP0, 0))  # running when the revoke comes
    lanes.submit(work("a1", "A", TP1, 0))  # queued, revoked partition
    lanes.submit(work("a2", "A", TP0, 1))  # queued, kept partition
    await fake.wait_started("a0")
    assert lanes.drop_partitions({TP1}) == 1
    assert lanes.drop_partitions({TP1}) == 0  # already dropped: not counted twice
    fake.release["a0"].set()
    fake.release["a2"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert fake.starts() == ["a0", "a2"]  # a1 never starts: the new owner gets it redelivered
    assert fake.finished == ["a0", "a2"]  # and its offset is not reported finished
    assert (lanes.waiting, lanes.running) == (0, 0)


async def test_stop_accepting_lets_running_streams_finish_and_starts_nothing_new() -> None:
    fake = FakeRun()
    lanes = Lanes(1, fake.run, fake.done)
    lanes.submit(work("a0", "A"))
    lanes.submit(work("a1", "A"))  # queued behind a0 in its lane
    lanes.submit(work("b0", "B"))  # waiting for the only slot
    await fake.wait_started("a0")
    lanes.stop_accepting()
    fake.release["a0"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert fake.starts() == ["a0"]
    assert fake.finished == ["a0"]
    assert len(lanes) == 0


async def test_a_crashing_handler_does_not_stop_its_lane(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRun(fail={"a0"})
    lanes = Lanes(10, fake.run, fake.done)
    lanes.submit(work("a0", "A", offset=0))
    lanes.submit(work("a1", "A", offset=1))
    fake.release["a0"].set()
    fake.release["a1"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert fake.starts() == ["a0", "a1"]
    assert "a1" in fake.finished
    assert "handler crashed" in caplog.text


async def test_cancel_all_stops_running_lanes() -> None:
    fake = FakeRun()
    lanes = Lanes(10, fake.run, fake.done)
    lanes.submit(work("a0", "A"))
    lanes.submit(work("b0", "B"))
    await fake.wait_started("a0", "b0")
    async with asyncio.timeout(TIMEOUT):
        await lanes.cancel_all()
        await lanes.wait_idle()
    assert fake.finished == []
    assert lanes.running == 0
    assert [kind for kind, _ in fake.log].count("end") == 2


async def test_new_work_after_a_lane_emptied_starts_a_new_lane() -> None:
    fake = FakeRun()
    lanes = Lanes(10, fake.run, fake.done)
    lanes.submit(work("a0", "A"))
    fake.release["a0"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    lanes.submit(work("a1", "A"))
    fake.release["a1"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert fake.finished == ["a0", "a1"]


async def test_a_run_that_is_not_done_leaves_its_offset_unfinished() -> None:
    """A message left to the instance streaming it (shutdown) is not reported finished: its
    record stays uncommitted for the partition's next owner; the lane goes on."""
    fake = FakeRun()
    fake.left.add("a0")
    lanes = Lanes(10, fake.run, fake.done)
    lanes.submit(work("a0", "A", offset=0))
    lanes.submit(work("a1", "A", offset=1))
    fake.release["a0"].set()
    fake.release["a1"].set()
    async with asyncio.timeout(TIMEOUT):
        await lanes.wait_idle()
    assert fake.starts() == ["a0", "a1"]
    assert fake.finished == ["a1"]
