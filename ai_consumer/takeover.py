"""Takeover: a surviving instance continues a stream whose owner's lease lapsed, from Redis.

Kafka moves a dead consumer's partitions only after the group's session timeout (10 s by
default, 6 s at the broker's minimum), and its records of running messages are redelivered
then. The stream need not wait that long: every run's lease is also in a sorted set of lapse
times (chatpipe/state.py, CLAIM and REFRESH) and its request in the message hash. Every
`TAKEOVER_INTERVAL_MS` each ai_consumer looks up the leases that lapsed (by Redis's clock) and,
with room for more streams, claims them: CLAIM gives the run a new epoch (the dead or frozen
owner's writes are fenced from then on) and the client sees `restart`, then the answer again,
within about `LEASE_MS` of the kill.

When the partition's new owner gets the Kafka record later, its claim finds the message owned
by the taker (it waits, then skips it as final) or final already; per-session order holds,
since the session's next messages are behind that record on the partition.

A lease also lapses when its owner is alive but could not reach Redis: a failover longer than
`LEASE_MS` (a Redis Cluster promoting a replica takes its node timeout and more), and on a
cluster a refresh of leases in several slots fails whole while one of their primaries is
away. So after a scan Redis did not answer, none is taken over until Redis has answered for
one `LEASE_MS`: every owner still alive re-takes its own lease meanwhile (REFRESH, every third
of a lease), and only the leases of dead owners are left to take.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math

from ai_consumer.handler import Handler
from ai_consumer.registry import Registry
from chatpipe.codec import parse_request
from chatpipe.errors import InvalidRecord
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger(__name__)


class Takeover:
    def __init__(
        self,
        settings: Settings,
        state: State,
        handler: Handler,
        registry: Registry,
        metrics: Metrics,
    ) -> None:
        self.state = state
        self.handler = handler
        self.registry = registry
        self.metrics = metrics
        self.interval_s = settings.takeover_interval_ms / 1000
        self.settle_s = settings.lease_ms / 1000  # no takeover this long after Redis was away
        self.max_streams = settings.max_concurrent_streams
        self._tasks: dict[str, asyncio.Task[str]] = {}

    async def serve(self, stopping: asyncio.Event, grace_s: float) -> None:
        """Scan until `stopping` is set, then give the streams taken over `grace_s` (beside the
        worker's own drain)."""
        if self.interval_s > 0:
            await self.run(stopping)
        await self.stop(grace_s)

    async def run(self, stopping: asyncio.Event) -> None:
        """Look for lapsed leases every interval until `stopping` is set. None is taken over
        until Redis has answered promptly for `settle_s` (see above): after a lookup that
        failed, or one that took longer than half of it (redis-py retrying a lost node)."""
        loop = asyncio.get_running_loop()
        answering_since = -math.inf  # when Redis last came back
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await stopping.wait()
            if stopping.is_set():
                return
            asked = loop.time()
            try:
                lapsed = await self.lapsed()
            except Exception as e:  # Redis away: the next round tries again
                answering_since = math.inf
                log.warning("takeover scan failed: %s", e)
                continue
            now = loop.time()
            if answering_since > now or now - asked > self.settle_s / 2:
                answering_since = now
            if now - answering_since < self.settle_s:
                continue  # its owners may be re-taking these leases right now
            try:
                await self.take(lapsed)
            except Exception as e:
                log.warning("takeover scan failed: %s", e)

    async def scan(self) -> int:
        """Take over the lapsed messages there is room for. Returns how many were started."""
        return await self.take(await self.lapsed())

    async def lapsed(self) -> list[tuple[str, str]]:
        """The messages (session_id, message_id) whose lease lapsed, as many as there is room
        for (Redis is asked also without room: `run` learns whether it answers)."""
        room = self.max_streams - len(self.registry.running)
        return await self.state.lapsed(max(room, 1))

    async def take(self, lapsed: list[tuple[str, str]]) -> int:
        """Take over `lapsed` (those not ours already) while there is room. Returns how many
        were started."""
        room = self.max_streams - len(self.registry.running)
        started = 0
        for session_id, message_id in lapsed[: max(room, 0)]:
            if message_id in self.registry.running or message_id in self._tasks:
                continue
            raw = await self.state.takeover_request(session_id, message_id)
            if raw is None:
                continue
            try:
                req = parse_request(raw)
            except InvalidRecord as e:  # not ours to fix here: Kafka's redelivery handles it
                log.warning("unreadable request kept for a takeover: %s", e.reason)
                continue
            task = asyncio.create_task(
                self.handler.handle(req, takeover=True), name=f"takeover-{message_id}"
            )
            self._tasks[message_id] = task
            task.add_done_callback(functools.partial(self._done, message_id))
            started += 1
        return started

    def _done(self, message_id: str, task: asyncio.Task[str]) -> None:
        self._tasks.pop(message_id, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # Redis or Kafka away mid-stream: the lease lapses again
            log.warning("takeover of %s stopped: %s", message_id, error)
        elif task.result() != "skipped":
            self.metrics.takeovers.labels(task.result()).inc()

    async def stop(self, grace_s: float) -> None:
        """Give the streams taken over `grace_s` to end, then stop them (their leases lapse
        and another instance takes them over in turn)."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
