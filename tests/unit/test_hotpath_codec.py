"""The per-chunk shortcuts in chatpipe.codec must produce exactly what the plain code does: the
timestamp formatter (cached per second) the text of `rfc3339(utcnow())`, the cached headers
`headers_for`'s."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from chatpipe import codec
from chatpipe.codec import cached_headers, headers_for, now_rfc3339, rfc3339_us
from chatpipe.schemas import rfc3339, utcnow

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# 0001-01-01 .. 9999-12-31, in microseconds from the epoch
LOW = int((datetime(1, 1, 1, tzinfo=UTC) - EPOCH) / timedelta(microseconds=1))
HIGH = int((datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - EPOCH) / timedelta(microseconds=1))


def expected(epoch_us: int) -> str:
    return rfc3339(EPOCH + timedelta(microseconds=epoch_us))


@given(st.integers(min_value=LOW, max_value=HIGH))
def test_any_instant_is_formatted_as_rfc3339_does(epoch_us: int) -> None:
    assert rfc3339_us(epoch_us) == expected(epoch_us)


def test_instants_in_the_same_and_in_the_next_second_reuse_no_stale_prefix() -> None:
    rng = random.Random(7)
    now_us = int((utcnow() - EPOCH) / timedelta(microseconds=1))
    # walk forwards and backwards over second, minute, day and year boundaries, so the cached
    # second is hit, then missed, many times
    points = [now_us, 0, -1, 999_999, 1_000_000, 86_400_000_000 - 1, 86_400_000_000]
    points += [
        int(
            (datetime(y, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC) - EPOCH).total_seconds()
            * 1_000_000
        )
        for y in (1999, 2024, 2026)
    ]
    for _ in range(20_000):
        base = rng.choice(points)
        us = base + rng.randint(-2_000_000, 2_000_000)
        assert rfc3339_us(us) == expected(us)
        assert rfc3339_us(us) == expected(us)  # the cached second


def test_now_is_rfc3339_of_now() -> None:
    before = utcnow()
    text = now_rfc3339()
    after = utcnow()
    assert text.endswith("Z")
    assert len(text) == len(rfc3339(before))
    at = datetime.fromisoformat(text)
    assert before - timedelta(microseconds=1) <= at <= after
    assert text == rfc3339(at)


def test_the_cache_is_one_second() -> None:
    rfc3339_us(1_700_000_000_123_456)
    assert codec._second[0] == 1_700_000_000
    assert rfc3339_us(1_700_000_001_000_000) == "2023-11-14T22:13:21.000000Z"
    assert codec._second[0] == 1_700_000_001


@given(
    st.sampled_from(["chat.chunk", "chat.started", "chat.completed", "chat.failed"]),
    st.none() | st.just("") | st.text(min_size=1, max_size=60),
)
def test_cached_headers_are_headers_for(event_type: str, traceparent: str | None) -> None:
    assert cached_headers(event_type, traceparent) == headers_for(event_type, traceparent)
    assert cached_headers(event_type, traceparent) is cached_headers(event_type, traceparent)
