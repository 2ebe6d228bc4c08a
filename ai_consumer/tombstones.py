"""Tombstoning a cancel on the compacted chat.cancels topic, after its record.

A cancelled message's cancel record has done its work once the message ended; a tombstone
(same key, null value) lets compaction forget it. The tombstone must land *after* the record:
compaction keeps a key's last record, so a cancel record that arrives after its tombstone stays
in the topic for good (and is replayed into a flag on every listener start). That order is not
given: the api publishes the record after it set the Redis flag and woke the streamer, so the
stream can end, and its tombstone be sent, before the record is in Kafka.

So a process sends the tombstone when both happened: the message ended `cancelled` here, and
this process's own listener (which reads every partition) has seen the record. A record seen
first (a cancel that came while the message waited) makes the tombstone go at once; a message
that ends first waits for its record, and after `wait_s` without one (the api could not
publish it: the flag alone carried the cancel) the tombstone goes anyway — a tombstone of a key
with no record is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[object]]


class Tombstones:
    def __init__(self, send: Send, wait_s: float = 30.0, remember: int = 10_000) -> None:
        self._send = send  # sends the tombstone of a key (enqueues it on the producer)
        self.wait_s = wait_s
        self._remember = remember
        self._seen: OrderedDict[bytes, None] = OrderedDict()  # records seen, not yet ended
        self._waiting: dict[bytes, asyncio.TimerHandle] = {}  # ended, record not seen yet
        self._tasks: set[asyncio.Task[None]] = set()

    def record_seen(self, key: bytes) -> None:
        """This process's listener read a cancel record with this key."""
        timer = self._waiting.pop(key, None)
        if timer is not None:
            timer.cancel()
            self._fire(key)
            return
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    def message_cancelled(self, key: bytes) -> None:
        """A message ended `cancelled` here: tombstone its cancel once its record is in."""
        if key in self._seen:
            del self._seen[key]
            self._fire(key)
            return
        if key in self._waiting:
            return
        loop = asyncio.get_running_loop()
        self._waiting[key] = loop.call_later(self.wait_s, self._expired, key)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def close(self) -> None:
        """Shutting down: send what still waits for its record, and wait for the sends."""
        for key, timer in list(self._waiting.items()):
            timer.cancel()
            self._fire(key)
        self._waiting.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _expired(self, key: bytes) -> None:
        if self._waiting.pop(key, None) is not None:
            self._fire(key)

    def _fire(self, key: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._send_one(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_one(self, key: bytes) -> None:
        try:
            await self._send(key)
        except Exception as e:
            log.warning("cancel tombstone not sent (the record stays until its flag ends): %s", e)
