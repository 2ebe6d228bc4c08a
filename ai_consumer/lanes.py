"""Per-session lanes: FIFO per session, many sessions at once, at most N streams running.

A lane is a queue of one session's requests and at most one task draining it, so two
messages of a session are answered in the order they were consumed, while other sessions on
the same partition go on in parallel (one slow answer does not hold up its partition).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import TopicPartition

from ai_consumer.offsets import PartitionOffsets
from chatpipe.schemas import ChatRequest

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Work:
    tp: TopicPartition
    offset: int
    request: ChatRequest
    traceparent: str | None = None
    book: PartitionOffsets | None = None  # the offsets of the assignment it was taken under
    dropped: bool = False  # its partition was revoked before it started
    refused: str | None = None  # not to run (if_busy reject met a busy session): why


# True when the work is done with (its offset may be committed); False leaves its record
# uncommitted, for the partition's next owner (a message left to the instance streaming it)
Run = Callable[[Work], Awaitable[bool]]
Finished = Callable[[Work], None]


class Lanes:
    def __init__(self, max_concurrent: int, run: Run, finished: Finished) -> None:
        self._queues: dict[str, deque[Work]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_concurrent)
        self._run = run
        self._finished = finished
        self.waiting = 0  # submitted, not started
        self.running = 0
        self.peak_running = 0
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return self.waiting + self.running

    @property
    def sessions(self) -> list[str]:
        """Sessions with queued or running work."""
        return list(self._tasks)

    def submit(self, work: Work) -> None:
        # a refused request (if_busy reject) is not answered, only ended: it does not wait
        # behind the session's open messages (that is what it was refused for)
        session = work.request.session_id
        if work.refused is not None:
            session = f"{session}\0refused:{work.request.message_id}"
        self._queues.setdefault(session, deque()).append(work)
        self.waiting += 1
        self._idle.clear()
        if session not in self._tasks:
            self._tasks[session] = asyncio.create_task(self._drain(session), name=f"lane:{session}")

    def drop_partitions(self, tps: set[TopicPartition]) -> int:
        """Forget queued work of revoked partitions (the new owner will get it redelivered)."""
        n = 0
        for queue in self._queues.values():
            for work in queue:
                if work.tp in tps and not work.dropped:
                    work.dropped = True
                    n += 1
        return n

    def stop_accepting(self) -> None:
        """Start nothing new; running streams go on (graceful shutdown)."""
        self._accepting = False
        for queue in self._queues.values():
            for work in queue:
                work.dropped = True

    async def _drain(self, session: str) -> None:
        queue = self._queues[session]
        try:
            while queue:
                work = queue[0]
                if work.dropped or not self._accepting:
                    queue.popleft()
                    self.waiting -= 1
                    continue
                async with self._slots:
                    if work.dropped or not self._accepting:
                        continue
                    queue.popleft()
                    self.waiting -= 1
                    self.running += 1
                    self.peak_running = max(self.peak_running, self.running)
                    try:
                        done = await self._run(work)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception(
                            "handler crashed", extra={"message_id": work.request.message_id}
                        )
                    else:
                        if done:
                            self._finished(work)
                    finally:
                        self.running -= 1
        finally:
            del self._queues[session]
            del self._tasks[session]
            if not self._tasks:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return when no lane has work (wrap in `asyncio.timeout` to bound it)."""
        await self._idle.wait()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
