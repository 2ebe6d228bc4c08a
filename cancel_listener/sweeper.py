"""Tombstones the cancel records on chat.cancels whose work is done, so the compacted topic
(and every listener's replay of it) stays as small as the cancels still pending.

The ai_consumer that ends a message `cancelled` tombstones its record (ai_consumer/tombstones.py).
That leaves the records no streamer ever ends: a cancel of a message that had already finished,
a cancel from a user who did not send the message (ignored with ownership on), a cancel of a
message that never arrives, and the cancel of a message whose streamer died before its
tombstone. Without this sweeper they stay in the topic for ever and are replayed by every
listener start. The standalone cancel listener runs it; the listeners inside the ai_consumers
do not (one sweeper is enough, and a second tombstone of a key is harmless).

Each record the listener mirrors is reported with the result of its mirror:
- the cancel is another user's: the record is tombstoned at once (and so is a record that is
  not a cancel at all);
- otherwise the key is kept, and every `interval_s` the pending keys are looked up in one
  pipeline: a message that ended `completed` or `failed` is tombstoned (no streamer will: it
  tombstones only what it cancelled); one that ended `cancelled` is its streamer's to tombstone,
  so the sweeper does it only once the record is older than `grace_s` and no tombstone of the
  key has been read meanwhile (the streamer died first) — one cancel, one tombstone, not two;
  one that Redis does not know is tombstoned once its record is older than `max_age_s` (its
  request never came, or its state expired long ago).
A tombstone the listener reads drops its key from the pending set.

Only a record under its canonical key (chatpipe.keys.cancel_record_key) is tombstoned: under
another key (a producer that did not escape `:` in its ids) the same key may name another
message's cancel, so it is left alone (and counted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chatpipe.keys import cancel_record_key, session_cancel_record_key
from chatpipe.metrics import Metrics
from chatpipe.schemas import CancelRecord, ChatSessionCancel
from chatpipe.state import FINAL_STATES, State

log = logging.getLogger(__name__)

SendTombstone = Callable[[bytes], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Seen:
    """A cancel record as read: its key, its Kafka timestamp (ms) and its value."""

    key: bytes
    timestamp_ms: int
    cancel: CancelRecord


@dataclass(frozen=True, slots=True)
class _Pending:
    session_id: str
    message_id: str
    timestamp_ms: int


class CancelSweeper:
    def __init__(
        self,
        state: State,
        send: SendTombstone,
        metrics: Metrics,
        max_age_s: float,
        interval_s: float,
        grace_s: float = 120.0,
        remember: int = 100_000,
        session_ttl_s: float = 3600.0,
    ) -> None:
        self.state = state
        self._send = send  # enqueues the tombstone of one key on a producer
        self.metrics = metrics
        self.max_age_s = max_age_s
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._remember = remember
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        # session-wide cancels: key -> record timestamp (ms); tombstoned after session_ttl_s
        self.session_ttl_s = session_ttl_s
        self._sessions: OrderedDict[bytes, int] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def observed(self, seen: Seen, mirrored: int) -> None:
        """One record mirrored: 1 flag set, 0 the message is final, -1 another user's. A
        session-wide cancel is kept as long as its Redis mark (CANCEL_QUEUED_TTL_S): it
        stands for the messages of the session still to come out of Kafka; then it is
        tombstoned ("session_done")."""
        c = seen.cancel
        if isinstance(c, ChatSessionCancel):
            await self._observed_session(seen, c, mirrored)
            return
        if seen.key != cancel_record_key(c.session_id, c.message_id).encode():
            self.metrics.cancel_tombstones.labels("noncanonical_key_kept").inc()
            return
        if mirrored < 0:
            self._pending.pop(seen.key, None)
            await self._tombstone(seen.key, "forbidden")
            return
        self._pending[seen.key] = _Pending(c.session_id, c.message_id, seen.timestamp_ms)
        self._pending.move_to_end(seen.key)
        while len(self._pending) > self._remember:
            # forgotten here, not in the topic: the next replay (a listener start) finds it
            self._pending.popitem(last=False)

    async def _observed_session(self, seen: Seen, c: ChatSessionCancel, mirrored: int) -> None:
        if seen.key != session_cancel_record_key(c.session_id).encode():
            self.metrics.cancel_tombstones.labels("noncanonical_key_kept").inc()
            return
        if mirrored < 0:
            self._sessions.pop(seen.key, None)
            await self._tombstone(seen.key, "forbidden")
            return
        self._sessions[seen.key] = seen.timestamp_ms
        self._sessions.move_to_end(seen.key)
        while len(self._sessions) > self._remember:
            self._sessions.popitem(last=False)

    def tombstone_seen(self, key: bytes) -> None:
        """The listener read a tombstone of `key` (a streamer's, or ours): nothing left to do."""
        self._pending.pop(key, None)
        self._sessions.pop(key, None)

    async def unreadable(self, key: bytes) -> None:
        """A record under `key` that is not a cancel: it can never do anything, tombstone it."""
        self._pending.pop(key, None)
        self._sessions.pop(key, None)
        await self._tombstone(key, "unreadable")

    async def sweep(self, now_ms: int | None = None) -> int:
        """Look the pending keys up once; tombstone those done. Returns how many."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        done = 0
        for key, timestamp_ms in list(self._sessions.items()):
            if now_ms - timestamp_ms > self.session_ttl_s * 1000:
                del self._sessions[key]
                await self._tombstone(key, "session_done")
                done += 1
        if not self._pending:
            return done
        items = list(self._pending.items())
        states = await self.state.states([(p.session_id, p.message_id) for _, p in items])
        for (key, p), state in zip(items, states, strict=True):
            age_ms = now_ms - p.timestamp_ms
            if state == "cancelled":  # its streamer tombstones it; we do if it did not
                if age_ms <= self.grace_s * 1000:
                    continue
                why = "final"
            elif state in FINAL_STATES:
                why = "final"
            elif state is None and age_ms > self.max_age_s * 1000:
                why = "stale"
            else:
                continue
            if self._pending.get(key) is p:  # not re-reported meanwhile
                del self._pending[key]
                await self._tombstone(key, why)
                done += 1
        return done

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                async with asyncio.timeout(self.interval_s):
                    await stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                swept = await self.sweep()
                if swept:
                    log.info("tombstoned %d cancel records whose work is done", swept)
            except Exception as e:  # Redis or Kafka trouble: the next round tries again
                log.warning("cancel sweep failed, retrying in %ss: %s", self.interval_s, e)

    async def _tombstone(self, key: bytes, why: str) -> None:
        await self._send(key)
        self.metrics.cancel_tombstones.labels(why).inc()
