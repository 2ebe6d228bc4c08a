"""The sweeper keeps a session-wide cancel as long as its Redis mark lives, then tombstones it
(it stands for the session's messages still to come out of Kafka); another user's is
tombstoned at once. No Redis is asked: session records are not looked up."""

from __future__ import annotations

from typing import Any, cast

from cancel_listener.sweeper import CancelSweeper, Seen
from chatpipe.keys import session_cancel_record_key
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatSessionCancel

TTL_S = 60


def sweeper(sent: list[bytes]) -> CancelSweeper:
    async def send(key: bytes) -> None:
        sent.append(key)

    return CancelSweeper(
        cast(Any, None), send, Metrics(), max_age_s=3600, interval_s=1, session_ttl_s=TTL_S
    )


def seen(session_id: str, at_ms: int, key: str | None = None) -> Seen:
    record = ChatSessionCancel(session_id=session_id)
    return Seen((key or session_cancel_record_key(session_id)).encode(), at_ms, record)


async def test_a_session_cancel_is_tombstoned_once_its_mark_has_expired() -> None:
    sent: list[bytes] = []
    s = sweeper(sent)
    await s.observed(seen("s:1", 1_000), 1)
    assert await s.sweep(now_ms=1_000 + TTL_S * 1000) == 0  # still standing for the session
    assert sent == []
    assert await s.sweep(now_ms=1_001 + TTL_S * 1000) == 1
    assert sent == [b"s%3A1"]
    assert await s.sweep(now_ms=10**12) == 0  # once


async def test_another_users_session_cancel_is_tombstoned_at_once_and_a_read_one_dropped() -> None:
    sent: list[bytes] = []
    s = sweeper(sent)
    await s.observed(seen("s-2", 1_000), -1)
    assert sent == [b"s-2"]
    await s.observed(seen("s-3", 1_000), 1)
    s.tombstone_seen(b"s-3")  # someone tombstoned it (a DELETE of the session)
    assert await s.sweep(now_ms=10**12) == 0


async def test_a_session_cancel_under_another_key_is_left_alone() -> None:
    sent: list[bytes] = []
    s = sweeper(sent)
    await s.observed(seen("s:1", 1_000, key="s:1"), 1)  # unescaped: may be a message's key
    assert await s.sweep(now_ms=10**12) == 0
    assert sent == []
