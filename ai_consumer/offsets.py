"""Per-partition offset bookkeeping: commit up to the first offset not finished yet."""

from __future__ import annotations


class PartitionOffsets:
    """Offsets of one partition taken into work and not finished yet.

    `committable()` is the offset to commit: the lowest unfinished one, or one past the highest
    seen when everything is finished. Committing it never skips an unfinished record, whatever
    order the session lanes finish in.
    """

    __slots__ = ("_committed", "_next", "_pending")

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._next: int | None = None
        self._committed: int | None = None

    def add(self, offset: int) -> None:
        self._pending.add(offset)
        if self._next is None or offset >= self._next:
            self._next = offset + 1

    def done(self, offset: int) -> None:
        self._pending.discard(offset)

    def __len__(self) -> int:
        return len(self._pending)

    def committable(self) -> int | None:
        """The offset to commit now, or None when nothing new is committable."""
        if self._next is None:
            return None
        offset = min(self._pending) if self._pending else self._next
        return None if offset == self._committed else offset

    def committed(self, offset: int) -> None:
        self._committed = offset
