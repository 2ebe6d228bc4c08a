"""Which messages this process is streaming, so a cancel record can interrupt one at once."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class LocalStream:
    message_id: str
    session_id: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested_at: float | None = None  # wall clock the user asked to cancel
    lost: bool = False  # another instance holds our lease now: stop without a terminal event
    epoch: str = ""  # the run's fencing token (Claim.epoch), checked by every write of it
    finished: bool = False  # FINISH is done: only its terminal event is left to publish


class Registry:
    """Running streams by message id, plus a bounded memory of recently cancelled ids.

    The memory closes the gap between a cancel record arriving and its Redis flag being
    written: a message claimed in between is still stopped before its first chunk.
    """

    def __init__(self, remember: int = 10_000) -> None:
        self.running: dict[str, LocalStream] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def start(self, message_id: str, session_id: str) -> LocalStream:
        stream = LocalStream(message_id, session_id)
        if message_id in self._cancelled:
            stream.cancelled.set()
        self.running[message_id] = stream
        return stream

    def end(self, message_id: str) -> None:
        self.running.pop(message_id, None)

    def cancel(self, message_id: str, at: float) -> bool:
        """Interrupt `message_id` if it runs here. Returns True when it did."""
        self._cancelled[message_id] = None
        self._cancelled.move_to_end(message_id)
        while len(self._cancelled) > self._remember:
            self._cancelled.popitem(last=False)
        stream = self.running.get(message_id)
        if stream is None or stream.cancelled.is_set():
            return False
        stream.cancel_requested_at = at
        stream.cancelled.set()
        return True
