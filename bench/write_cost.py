"""Per-chunk cost of the sink's Redis write, old against new (issue 12 item 8), on a real Redis.

old: one pipeline per batch of MGET (cancel flags) + one XADD per event (unfenced).
new: one WRITE script call per batch, every event fenced by its run's epoch (it also answers
     each one's cancel). Prints client CPU and Redis CPU (INFO commandstats) per event.

    python -m bench.write_cost [--streams 100] [--batches 300]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from chatpipe.codec import dumps
from chatpipe.settings import Settings
from chatpipe.state import State

NOW = "2024-05-01T10:00:00.000000Z"


@dataclass(frozen=True, slots=True)
class Event:
    message_id: str
    session_id: str
    epoch: str
    sse_event: str
    seq: int
    sse_data: dict[str, Any]


async def redis_usec(redis: Redis) -> float:
    """The server's CPU time so far (user + system, its network I/O included), in µs."""
    cpu: dict[str, Any] = await redis.info("cpu")
    return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6


async def run(url: str, streams: int, batches: int) -> None:
    redis = Redis.from_url(url)
    prefix = f"bench-write-{time.time_ns()}:"
    state = State(redis, Settings(key_prefix=prefix))
    ids = [f"m{i}" for i in range(streams)]
    epochs = {}
    for m in ids:
        await state.accept(m, f"s-{m}", "u", NOW)
        epochs[m] = (await state.claim(m, f"s-{m}", "u", "bench", NOW)).epoch
    data = {"seq": 1, "delta": " token", "at": NOW}

    async def old(seq: int) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.mget([state.keys.cancel(f"s-{m}", m) for m in ids])
            for m in ids:
                pipe.xadd(
                    state.keys.stream(f"s-{m}", m),
                    {"e": "chunk", "s": seq, "d": dumps(data)},
                    maxlen=10_000,
                    approximate=True,
                )
            await pipe.execute()

    calls = iter(range(1, 1 << 30))

    async def new(seq: int) -> None:
        events = [Event(m, f"s-{m}", epochs[m], "chunk", seq, data) for m in ids]
        await state.write(events, "bench", next(calls))

    seqs = iter(range(1, 1 << 30))  # every step writes new seqs: a seq written before is skipped
    for name, step in (("old MGET+XADD", old), ("new WRITE script", new)) * 2:
        await step(next(seqs))  # warm up (scripts loaded)
        server0, cpu0, wall0 = await redis_usec(redis), time.process_time(), time.perf_counter()
        for _ in range(batches):
            await step(next(seqs))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        server = await redis_usec(redis) - server0
        n = streams * batches
        print(
            f"{name:18s} {n} events in batches of {streams}: client CPU {cpu / n * 1e6:5.1f} us, "
            f"Redis CPU {server / n:5.1f} us, wall {wall / n * 1e6:5.1f} us per event"
        )
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--batches", type=int, default=300)
    a = ap.parse_args()
    asyncio.run(run(a.redis, a.streams, a.batches))


if __name__ == "__main__":
    main()
