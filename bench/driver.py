"""The load driver, in its own process: `python -m bench.driver --spec SPEC.json --out OUT.json`.

It keeps `concurrency` streams open for `duration_s` (closed loop: each slot starts its next
answer when the previous one ends; slots start spread over `ramp_s`), through the targets
round-robin like a load balancer without stickiness. What is measured (chunk latencies, TTFT,
accept and cancel times) is what happens in the window that starts `warmup_s` after the first
slot started and lasts `duration_s`; integrity (lost, duplicated, errors) is checked over every
stream. With `ramp_s` = `warmup_s` = one answer's length ("steady" arrivals, the default of
`python -m bench`), the n answers are spread evenly over their length when the window opens,
and the closed loop keeps them spread: the window sees n streams at every phase of an answer.
With a short ramp and no warm-up ("burst"), all n answers start, and end, together — and,
being the same length, start together again one answer later: a thundering herd every
`answer_s`, measured as such.

- chatpipe: `POST /api/chat` on target i, `GET stream_url` on target i+1, cancel with
  `POST /api/cancel` on a target other than the one streaming;
- seed, limit: `POST /chat` answers with the SSE stream itself (target i); the cancel goes to
  `POST /cancel` on target i+1 (the other instance; the limit has only one).

A `cancel_fraction` of the answers is cancelled at a random moment of `cancel_window_s` after
the request was sent. Every chunk's latency is its arrival time minus its `at` stamp; every
stream is checked for sequence gaps and duplicates, for exactly one `done`, for its text, and
for what arrived after the cancel was answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson
import psutil

from ai_consumer.llm.simulated import simulated_tokens
from bench.http import JSONClient
from bench.sse import HTTPStatusError, OnEvent, open_sse
from bench.stats import summary
from chatpipe.schemas import ChatRequest

Mode = Literal["chatpipe", "seed", "limit"]


@dataclass
class Spec:
    name: str
    mode: Mode
    targets: list[str]  # "127.0.0.1:port"
    concurrency: int
    duration_s: float
    tokens: int
    token_delay_ms: float
    first_token_delay_ms: float = 0.0
    ramp_s: float = 1.0
    warmup_s: float = 0.0  # the measured window starts this long after the first slot
    cancel_fraction: float = 0.2
    # when to cancel, seconds after the request was sent; default: anywhere in the answer
    cancel_window_s: tuple[float, float] | None = None
    max_streams: int = 100_000
    stream_timeout_s: float = 60.0
    seed: int = 1
    run_id: str = "bench"

    @property
    def answer_s(self) -> float:
        return (self.first_token_delay_ms + self.tokens * self.token_delay_ms) / 1000

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Spec:
        window = raw.get("cancel_window_s")
        raw = {**raw, "cancel_window_s": tuple(window) if window else None}
        return cls(**raw)


@dataclass
class Stream:
    index: int
    session_id: str
    message_id: str
    post_target: int
    stream_target: int
    cancel_target: int
    expected: list[str]
    t_post: float = 0.0
    t_accepted: float | None = None  # chatpipe: the 202 arrived
    t_first: float | None = None
    t_done: float | None = None
    chunks: int = 0
    last_seq: int = 0
    gaps: int = 0
    duplicates: int = 0
    mismatches: int = 0
    done: int = 0
    done_status: str = ""
    after_done: int = 0
    restarts: int = 0
    cancel_planned: float | None = None  # seconds after t_post
    t_cancel_sent: float | None = None
    t_cancel_answer: float | None = None
    cancel_answer: str = ""
    after_cancel_answer: int = 0
    error: str = ""


@dataclass
class Totals:
    chunks: int = 0  # every chunk received (CPU and Redis per chunk divide by this)
    # the chunks received within the measured window
    latencies: array[float] = field(default_factory=lambda: array("d"))
    # chatpipe only: an SSE id is the Redis Stream entry id, whose first part is the Redis
    # server's clock (ms) at the XADD; it splits a chunk's latency in two (ms resolution)
    to_redis: array[float] = field(default_factory=lambda: array("d"))
    from_redis: array[float] = field(default_factory=lambda: array("d"))
    per_second: Counter[int] = field(default_factory=Counter)
    streams: list[Stream] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    loop_lag: array[float] = field(default_factory=lambda: array("d"))

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{kind}: {detail}"[:300])


def _stamp(at: str) -> float:
    return datetime.fromisoformat(at).timestamp()


class Driver:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.totals = Totals()
        self.hosts = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in spec.targets]
        self._next = 0
        self._texts: dict[str, list[str]] = {}
        self.http = JSONClient(timeout_s=30.0)
        # the measured window (set by run())
        self.t_lo = 0.0
        self.t_hi = float("inf")

    # --- one answer ----------------------------------------------------------------------
    def _new_stream(self, slot: int, k: int) -> Stream:
        spec = self.spec
        n = len(self.hosts)
        i = self._next
        self._next += 1
        session_id = f"{spec.run_id}-s{slot}"
        message_id = f"{spec.run_id}-m{slot}-{k}"
        text = f"benchmark question {slot}-{k}"
        if text not in self._texts:
            req = ChatRequest(message_id=message_id, session_id=session_id, message=text)
            self._texts[text] = simulated_tokens(req, spec.tokens)
        if spec.mode == "chatpipe":
            post_target, stream_target = i % n, (i + 1) % n
        else:
            post_target = stream_target = i % n
        s = Stream(
            index=i,
            session_id=session_id,
            message_id=message_id,
            post_target=post_target,
            stream_target=stream_target,
            cancel_target=(stream_target + 1) % n,
            expected=self._texts[text],
        )
        if self.rng.random() < spec.cancel_fraction:
            lo, hi = spec.cancel_window_s or (0.0, spec.answer_s)
            s.cancel_planned = self.rng.uniform(lo, hi)
        return s

    def _on_event(self, s: Stream) -> OnEvent:
        totals = self.totals

        split = self.spec.mode == "chatpipe"

        def on_event(now: float, event: bytes, data: bytes, ident: bytes) -> None:
            if s.done:
                s.after_done += 1
                return
            if event == b"chunk":
                d = orjson.loads(data)
                seq = d["seq"]
                # a chunk of `count` tokens (COALESCE_MS) counts as that many; each of them
                # is given the latency of its first (the oldest: an upper bound for the rest)
                count = d.get("count", 1)
                totals.chunks += count
                if self.t_lo <= now <= self.t_hi:
                    at = _stamp(d["at"])
                    for _ in range(count):
                        totals.latencies.append(now - at)
                    if split and ident:
                        xadd = int(ident.partition(b"-")[0]) / 1000
                        totals.to_redis.append(xadd - at)
                        totals.from_redis.append(now - xadd)
                totals.per_second[int(now)] += count
                if s.t_first is None:
                    s.t_first = now
                    if s.restarts == 0 and seq != 1:
                        s.gaps += 1
                elif seq <= s.last_seq:
                    s.duplicates += 1
                elif seq != s.last_seq + 1:
                    s.gaps += seq - s.last_seq - 1
                s.last_seq = max(s.last_seq, seq + count - 1)
                s.chunks += count
                if 1 <= seq <= len(s.expected) and d["delta"] != "".join(
                    s.expected[seq - 1 : seq - 1 + count]
                ):
                    s.mismatches += 1
                if s.t_cancel_answer is not None and now > s.t_cancel_answer:
                    s.after_cancel_answer += 1
            elif event == b"done":
                s.done += 1
                s.t_done = now
                s.done_status = orjson.loads(data).get("status", "")
            elif event == b"restart":
                s.restarts += 1

        return on_event

    async def _cancel(self, s: Stream) -> None:
        assert s.cancel_planned is not None
        delay = s.t_post + s.cancel_planned - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if s.done:
            return  # ended before its cancel moment: not a cancel
        host, port = self.hosts[s.cancel_target]
        path = "/api/cancel" if self.spec.mode == "chatpipe" else "/cancel"
        s.t_cancel_sent = time.time()
        try:
            r = await self.http.post(
                host, port, path, {"session_id": s.session_id, "message_id": s.message_id}
            )
            s.t_cancel_answer = time.time()
            answer = r.json()
            s.cancel_answer = (
                str(answer.get("status", r.status_code))
                if r.status_code in (200, 404) and isinstance(answer, dict)
                else f"http {r.status_code}"
            )
        except (OSError, ValueError) as e:
            s.t_cancel_answer = time.time()
            s.cancel_answer = "error"
            self.totals.error("cancel_request", f"{type(e).__name__}: {e}")

    async def run_one(self, slot: int, k: int) -> None:
        spec = self.spec
        s = self._new_stream(slot, k)
        self.totals.streams.append(s)
        body = {
            "session_id": s.session_id,
            "message_id": s.message_id,
            "message": f"benchmark question {slot}-{k}",
            "options": {"max_tokens": spec.tokens},
        }
        canceller: asyncio.Task[None] | None = None
        s.t_post = time.time()
        try:
            async with asyncio.timeout(spec.stream_timeout_s):
                if spec.mode == "chatpipe":
                    host, port = self.hosts[s.post_target]
                    r = await self.http.post(host, port, "/api/chat", body)
                    if r.status_code != 202:
                        raise HTTPStatusError(r.status_code, r.content)
                    s.t_accepted = time.time()
                    accepted = r.json()
                    if not isinstance(accepted, dict):
                        raise HTTPStatusError(r.status_code, r.content)
                    method, path, payload = "GET", accepted["stream_url"], None
                else:
                    method, path, payload = "POST", "/chat", orjson.dumps(body)
                if s.cancel_planned is not None:
                    canceller = asyncio.create_task(self._cancel(s))
                host, port = self.hosts[s.stream_target]
                proto = await open_sse(host, port, method, path, payload, self._on_event(s))
                try:
                    await proto.closed
                finally:
                    proto.close()
                if canceller is not None and not canceller.done():
                    await canceller
        except TimeoutError:
            s.error = "timeout"
            self.totals.error("timeout", f"{s.message_id}: no end within {spec.stream_timeout_s}s")
        except HTTPStatusError as e:
            s.error = f"http_{e.status}"
            self.totals.error(s.error, f"{s.message_id}: {e}")
        except OSError as e:
            s.error = "connection"
            self.totals.error("connection", f"{s.message_id}: {type(e).__name__}: {e}")
        finally:
            if canceller is not None and not canceller.done():
                canceller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await canceller

    async def slot(self, slot: int, start_at: float, end_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        k = 0
        while time.time() < end_at and len(self.totals.streams) < self.spec.max_streams:
            await self.run_one(slot, k)
            k += 1

    async def lag_probe(self, end_at: float) -> None:
        loop = asyncio.get_running_loop()
        while time.time() < end_at:
            t = loop.time()
            await asyncio.sleep(0.05)
            self.totals.loop_lag.append(loop.time() - t - 0.05)

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        proc = psutil.Process()
        cpu0 = proc.cpu_times()
        t0 = time.time() + 0.2
        self.t_lo = t0 + spec.warmup_s
        end_at = self.t_hi = self.t_lo + spec.duration_s
        n = spec.concurrency
        probe = asyncio.create_task(self.lag_probe(end_at))
        await asyncio.gather(*(self.slot(i, t0 + spec.ramp_s * i / n, end_at) for i in range(n)))
        t1 = time.time()
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        await self.http.aclose()
        cpu1 = proc.cpu_times()
        driver_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return self.report(t0, t1, driver_cpu)

    # --- the report ----------------------------------------------------------------------
    def report(self, t_start: float, t1: float, driver_cpu: float) -> dict[str, Any]:
        """The run's numbers. Timings count what happened in the measured window
        [`t_lo`, `t_hi`]; integrity counts every stream."""
        t0 = self.t_lo
        spec, totals = self.spec, self.totals
        streams = totals.streams
        integrity: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        answers: Counter[str] = Counter()
        cancel_lat: list[float] = []
        answer_lat: list[float] = []
        after_answer: list[int] = []
        ttft: list[float] = []
        accept: list[float] = []
        missed = 0
        measured = 0
        for s in streams:
            in_window = self.t_lo <= s.t_post <= self.t_hi
            if in_window:
                measured += 1
                if s.t_first is not None:
                    ttft.append(s.t_first - s.t_post)
                if s.t_accepted is not None:
                    accept.append(s.t_accepted - s.t_post)
            if s.error:
                outcomes["error"] += 1
                continue
            integrity["gaps"] += s.gaps
            integrity["duplicates"] += s.duplicates
            integrity["content_mismatch"] += s.mismatches
            integrity["events_after_done"] += s.after_done
            if s.done == 0:
                integrity["missing_done"] += 1
            elif s.done > 1:
                integrity["extra_done"] += s.done - 1
            outcomes[s.done_status or "no_done"] += 1
            if s.done_status == "completed" and s.chunks < spec.tokens and not s.restarts:
                integrity["short_completed"] += 1
            if s.t_cancel_sent is None:
                continue
            if s.cancel_answer == "cancelled" and s.done_status != "cancelled":
                missed += 1  # answered cancelled, yet the stream went on to another end
            elif s.cancel_answer == "completed" and s.after_cancel_answer > 1:
                # answered "already completed" while the answer went on (the seed's bug when
                # the cancel lands before the stream registered); one chunk may be in flight
                missed += 1
            if not in_window:
                continue  # its timings are outside the measured window
            answers[s.cancel_answer] += 1
            if s.t_cancel_answer is not None:
                answer_lat.append(s.t_cancel_answer - s.t_cancel_sent)
            answered = s.cancel_answer == "cancelled" and s.done_status == "cancelled"
            if answered and s.t_done is not None:
                cancel_lat.append(s.t_done - s.t_cancel_sent)
                after_answer.append(s.after_cancel_answer)
        lost = integrity["gaps"] + integrity["missing_done"] + integrity["short_completed"]
        dup = integrity["duplicates"] + integrity["extra_done"] + integrity["events_after_done"]
        steady_from = int(max(t0, t_start + spec.ramp_s)) + 1
        steady_to = int(self.t_hi)
        window = [totals.per_second.get(sec, 0) for sec in range(steady_from, steady_to)]
        if not window:
            window = [totals.per_second.get(sec, 0) for sec in range(int(t0), int(t1) + 1)]
        chunks = totals.chunks
        lat = summary(totals.latencies)
        return {
            "name": spec.name,
            "mode": spec.mode,
            "spec": asdict(spec),
            "wall_s": round(t1 - t_start, 3),
            "window_s": [round(t0 - t_start, 3), round(self.t_hi - t_start, 3)],
            "streams": {"started": len(streams), "measured": measured, **dict(outcomes)},
            "chunks": chunks,
            "chunks_measured": len(totals.latencies),
            "chunks_per_s_sustained": round(sum(window) / len(window), 1) if window else 0.0,
            "chunks_per_s_offered": round(spec.concurrency * 1000 / spec.token_delay_ms, 1),
            "token_latency_ms": lat,
            "token_latency_split_ms": {
                "produced_to_redis_xadd": summary(totals.to_redis),
                "redis_xadd_to_client": summary(totals.from_redis),
            }
            if totals.to_redis
            else None,
            "ttft_ms": summary(ttft),
            "accept_ms": summary(accept),
            "cancel": {
                "sent": sum(answers.values()),
                "answers": dict(answers),
                "latency_ms": summary(cancel_lat),
                "answer_ms": summary(answer_lat),  # cancel request sent -> its HTTP answer
                "chunks_after_answer_total": sum(after_answer),
                "chunks_after_answer_max": max(after_answer, default=0),
                "streams_over_1_chunk_after_answer": sum(1 for a in after_answer if a > 1),
                "missed": missed,
            },
            "integrity": {
                **{k: integrity[k] for k in sorted(integrity)},
                "lost": lost,
                "duplicated": dup,
            },
            "errors": dict(totals.errors),
            "error_samples": totals.error_samples,
            "driver": {
                "cpu_s": round(driver_cpu, 2),
                "cpu_pct": round(100 * driver_cpu / max(t1 - t0, 1e-9), 1),
                "loop_lag_ms": summary(totals.loop_lag),
            },
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.driver", description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON file with the run's Spec")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = Spec.from_json(json.load(f))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(Driver(spec).run())
    else:
        result = uvloop.run(Driver(spec).run())
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    lat = result["token_latency_ms"]
    print(
        f"{spec.name}: {result['chunks']} chunks, token p50 {lat['p50']} p99 {lat['p99']} ms, "
        f"errors {sum(result['errors'].values())}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
