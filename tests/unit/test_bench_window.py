"""bench/driver.py: timings count only the measured window, integrity counts every stream."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from bench.driver import Driver, Spec, Stream


def spec(**over: object) -> Spec:
    values: dict[str, object] = {
        "name": "t",
        "mode": "chatpipe",
        "targets": ["127.0.0.1:1", "127.0.0.1:2"],
        "concurrency": 2,
        "duration_s": 10.0,
        "tokens": 2,
        "token_delay_ms": 40.0,
        "ramp_s": 5.0,
        "warmup_s": 5.0,
    }
    values.update(over)
    return Spec(**values)  # type: ignore[arg-type]


def stream(d: Driver, t_post: float, *, ttft: float, lost: bool = False) -> Stream:
    s = d._new_stream(len(d.totals.streams), 0)
    s.t_post = t_post
    s.t_accepted = t_post + 0.001
    s.t_first = t_post + ttft
    s.chunks = d.spec.tokens
    s.last_seq = d.spec.tokens
    s.done, s.done_status = 1, "completed"
    if lost:
        s.gaps = 1
    d.totals.streams.append(s)
    return s


def chunk(d: Driver, at: float, now: float) -> None:
    """What the SSE reader does for one chunk event (seq 1 of a fresh stream)."""
    s = Stream(0, "s", "m", 0, 1, 1, expected=[])
    d._on_event(s)(
        now, b"chunk", json.dumps({"seq": 1, "delta": "x", "at": _iso(at)}).encode(), b""
    )


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def test_timings_are_those_of_the_window_and_integrity_of_every_stream() -> None:
    d = Driver(spec())
    t0 = 1_000_000.0
    d.t_lo, d.t_hi = t0 + 5, t0 + 15
    stream(d, t0 + 1, ttft=9.0, lost=True)  # in the ramp: a slow start, and a gap
    stream(d, t0 + 6, ttft=0.05)
    stream(d, t0 + 7, ttft=0.07)
    stream(d, t0 + 16, ttft=3.0)  # after the window
    chunk(d, at=t0 + 2, now=t0 + 4)  # ramp: 2 s late, not timed
    chunk(d, at=t0 + 6, now=t0 + 6.01)
    chunk(d, at=t0 + 7, now=t0 + 7.02)

    r = d.report(t0, t0 + 20, driver_cpu=0.0)

    assert r["streams"]["started"] == 4
    assert r["streams"]["measured"] == 2
    assert r["ttft_ms"]["count"] == 2
    assert r["ttft_ms"]["max"] == 70.0
    assert r["chunks"] == 3  # CPU and Redis per chunk divide by every chunk
    assert r["chunks_measured"] == 2
    assert round(r["token_latency_ms"]["max"]) == 20
    assert r["integrity"]["lost"] == 1  # the ramp's gap still counts
    assert r["window_s"] == [5.0, 15.0]
