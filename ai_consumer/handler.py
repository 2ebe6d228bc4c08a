"""One message, from claim to its single terminal event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from ai_consumer.interrupt import until_set
from ai_consumer.llm import Provider, ProviderError, TokenUsage
from ai_consumer.registry import LocalStream, Registry
from ai_consumer.sink import CANCEL, LOST, WRITTEN, Outgoing, Sink
from ai_consumer.tombstones import Tombstones
from chatpipe.codec import now_rfc3339
from chatpipe.errors import ChatpipeError, Reject, Retry
from chatpipe.history import prompt
from chatpipe.keys import cancel_record_key
from chatpipe.logs import log_context
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatRequest, rfc3339
from chatpipe.settings import Settings
from chatpipe.state import Claim, State
from chatpipe.tracing import Tracing

log = logging.getLogger(__name__)

LEFT = "left"  # what `handle` returns for a message left to the instance streaming it


def _now() -> str:
    return now_rfc3339()  # rfc3339(utcnow()), formatted once per second


@dataclass(frozen=True, slots=True)
class Tokens:
    """An answer's token counts as its terminal event reports them."""

    completion: int
    prompt: int | None

    @classmethod
    def of(cls, usage: TokenUsage | None, chunks: int) -> Tokens:
        counted = usage.completion_tokens if usage is not None else None
        return cls(chunks if counted is None else counted, usage.prompt_tokens if usage else None)

    def usage(self, chunks: int) -> dict[str, int]:
        out = {"completion_tokens": self.completion, "chunks": chunks}
        if self.prompt is not None:
            out["prompt_tokens"] = self.prompt
        return out


class Handler:
    def __init__(
        self,
        settings: Settings,
        state: State,
        sink: Sink,
        tombstones: Tombstones,
        provider: Provider,
        registry: Registry,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing()  # a span per message; no-op: traceparent as it came
        self.instance_id = settings.instance_id
        self.state = state
        self.sink = sink
        self.tombstones = tombstones  # a cancelled message's cancel record, tombstoned after it
        self.provider = provider
        self.registry = registry
        self.metrics = metrics
        self._runs: dict[str, asyncio.Event] = {}  # message id -> set when its run here ends
        self._leaving = asyncio.Event()  # shutting down: wait for no other instance's run

    def stop_waiting(self) -> None:
        """Shutting down: a message another instance streams is left to it (its record stays
        uncommitted, `handle` returns `LEFT`) instead of waited for until that answer ends.
        Runs of this process's own go on."""
        self._leaving.set()

    def _event(
        self, req: ChatRequest, kind: str, seq: int, at: str, **extra: Any
    ) -> dict[str, Any]:
        value: dict[str, Any] = {
            "schema_version": 1,
            "type": kind,
            "message_id": req.message_id,
            "session_id": req.session_id,
            "seq": seq,
            "instance_id": self.instance_id,
            "at": at,
        }
        value.update(extra)
        return value

    async def handle(
        self,
        req: ChatRequest,
        traceparent: str | None = None,
        takeover: bool = False,
        refused: str | None = None,
    ) -> str:
        """Run `req` to its end. Returns what happened: a final state, or `skipped`.
        `takeover`: `req` comes from Redis (its owner's lease lapsed: ai_consumer/takeover.py),
        not from Kafka; when another instance holds it by now, it is left to that one.

        Redis or Kafka being away (RedisError, `Retry`) propagates: the worker retries the
        message. A `Reject` ends it `failed` with its reason. Anything else is a bug met by this message: it ends `failed` (one terminal
        event) instead of staying `streaming` with an offset that never finishes.

        Every log line meanwhile carries the message's ids; with tracing on, its events carry
        the traceparent of this message's span (a child of the request's).

        `refused`: the request is not to run (its `if_busy: reject` met a busy session): it
        ends `failed` with this reason, and no turn is kept."""
        attributes = {"chatpipe.message_id": req.message_id, "chatpipe.session_id": req.session_id}
        with (
            log_context(message_id=req.message_id, session_id=req.session_id),
            self.tracing.span("chat.respond", traceparent, attributes) as traceparent,
        ):
            try:
                if refused is not None:
                    log.info("request refused: %s", refused, extra=attributes)
                    return await self._finish(
                        req, None, "failed", refused, 0, traceparent, turn=False
                    )
                return await self._handle(req, traceparent, takeover)
            except (RedisError, Retry):
                raise  # transient: the worker tries the message again
            except Reject as e:
                log.warning(
                    "message rejected: %s",
                    e.reason,
                    extra={"message_id": req.message_id, "session_id": req.session_id},
                )
                return await self.fail(req, e.reason, traceparent)
            except Exception as e:
                log.exception(
                    "handler crashed; ending the message failed",
                    extra={"message_id": req.message_id, "session_id": req.session_id},
                )
                return await self.fail(req, f"internal error ({type(e).__name__})", traceparent)

    async def fail(self, req: ChatRequest, reason: str, traceparent: str | None = None) -> str:
        """End `req` as `failed` from wherever it stopped (its next seq read from its stream).
        Returns the final state, or `skipped` when it was final already or another instance
        owns it."""
        seq = await self.state.next_seq(req.session_id, req.message_id)
        answer = await self.state.answer_so_far(req.session_id, req.message_id) if seq else ""
        return await self._finish(req, None, "failed", reason, seq, traceparent, answer=answer)

    async def _handle(self, req: ChatRequest, traceparent: str | None, takeover: bool) -> str:
        """One run of a message at a time in this process. A message handed over at shutdown
        comes back twice at once (the takeover scan finds its released lease, the partition
        redelivers its record) and CLAIM lets an instance re-take its own lease: a second run
        would restart the answer again. A takeover leaves it to the run here; the record
        waits for that run to end, then claims (and finds it final, or takes it up if that
        run stopped without an end)."""
        while (running := self._runs.get(req.message_id)) is not None:
            if takeover:
                return "skipped"
            await running.wait()
        ended = self._runs[req.message_id] = asyncio.Event()
        try:
            return await self._claim_and_run(req, traceparent, takeover)
        finally:
            del self._runs[req.message_id]
            ended.set()

    async def _claim_and_run(
        self, req: ChatRequest, traceparent: str | None, takeover: bool
    ) -> str:
        ids = {"message_id": req.message_id, "session_id": req.session_id}
        # kept in Redis while it runs, for a takeover (a takeover's is there already)
        request = b"" if takeover else req.to_json()
        waited = False
        while True:
            claim = await self.state.claim(
                req.message_id,
                req.session_id,
                req.user_id,
                self.instance_id,
                _now(),
                request,
                rfc3339(req.created_at),
            )
            if claim.outcome == "final":
                log.info("already %s, skipped", claim.detail, extra=ids)
                return "skipped"
            if claim.outcome == "forbidden":
                return await self._forbidden(req, claim.detail, traceparent)
            if claim.outcome == "republish":
                return await self._republish(req, claim, traceparent)
            if claim.outcome != "owned":
                break
            if takeover:
                return "skipped"  # another instance took it over first
            # another live instance streams it (a redelivery after a rebalance): wait until it
            # ends, or until its lease lapses and we take over
            if not waited:
                log.info("streamed by %s; waiting for it to end", claim.detail, extra=ids)
                waited = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.lease_ms / 2000):
                    await self._leaving.wait()
            if self._leaving.is_set():
                log.info("left to %s: shutting down", claim.detail, extra=ids)
                return LEFT

        stream = self.registry.start(req.message_id, req.session_id)
        stream.epoch = claim.epoch
        self.metrics.active_streams.inc()
        try:
            return await self._run(
                req, stream, claim.next_seq, claim.restart, claim.outcome == "cancel", traceparent
            )
        finally:
            self.metrics.active_streams.dec()
            self.registry.end(req.message_id)

    async def _forbidden(self, req: ChatRequest, why: str, traceparent: str | None) -> str:
        """Ownership enforced and the request is not its sender's to make (docs/security.md):
        in another user's session (or without a user) it ends `failed` with reason `forbidden`;
        reusing another user's message id it is dropped, leaving that message untouched."""
        ids = {"message_id": req.message_id, "session_id": req.session_id, "why": why}
        self.metrics.forbidden.labels("kafka_request").inc()
        if why == "message":
            log.warning("request reuses another user's message id: dropped", extra=ids)
            return "forbidden"
        log.warning("request in a session the user does not own: failed, forbidden", extra=ids)
        return await self._finish(req, None, "failed", "forbidden", 0, traceparent, turn=False)

    async def _run(
        self,
        req: ChatRequest,
        stream: LocalStream,
        seq: int,
        restart: bool,
        cancelled_before_start: bool,
        traceparent: str | None,
    ) -> str:
        ids = {"message_id": req.message_id, "session_id": req.session_id}
        if restart:
            self.metrics.lease_takeovers.inc()
            log.warning("taking over a stream whose owner's lease lapsed", extra=ids)
        if cancelled_before_start or stream.cancelled.is_set():
            log.info("cancelled before its first token, never started", extra=ids)
            return await self._finish(
                req, stream, "cancelled", "cancelled by user", seq, traceparent, started=False
            )

        # what the model is given: the session's conversation so far and this message
        messages = prompt(await self.state.history(req.session_id), req, self.settings)
        started_at = time.monotonic()
        at = _now()
        kind = "restart" if restart else "started"
        extra = {"restart": True} if restart else {}
        try:
            answer = await self.sink.emit(
                Outgoing(
                    req.message_id,
                    req.session_id,
                    kind,
                    seq,
                    {"seq": seq, "at": at},
                    "chat.started",
                    self._event(req, "chat.started", seq, at, **extra),
                    traceparent,
                    stream.epoch,
                )
            )
        except ChatpipeError as e:
            return await self._finish(req, stream, "failed", str(e), seq + 1, traceparent)
        if answer == LOST:
            log.warning("lease lost to another instance before the start; left to it", extra=ids)
            return "skipped"
        seq += 1

        wanted, reason, chunks = "completed", "", 0
        parts: list[str] = []  # the answer's text, for the session's history
        usage = TokenUsage()  # the model's own counts, as the provider learns them
        flag_seen_at: float | None = None  # when a chunk saw the Redis flag (the flag has no time)
        # every chunk's record: this one, copied, with its seq, at and delta (same fields in the
        # same order as _event's), instead of building it field by field on every chunk
        chunk_value = self._event(req, "chat.chunk", seq, at)
        coalescing = self.sink.coalescing
        held_error: list[ChatpipeError] = []  # COALESCE_MS: a held chunk's write failed

        def flagged() -> None:  # a write saw the message's cancel flag
            nonlocal flag_seen_at
            if not stream.cancelled.is_set():
                flag_seen_at = time.time()
            stream.cancelled.set()

        def answered(done: asyncio.Future[int]) -> None:  # a held chunk was written (or not)
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:
                held_error.append(
                    error if isinstance(error, ChatpipeError) else ChatpipeError(str(error))
                )
                stream.cancelled.set()  # interrupts the model; the run ends failed
            elif done.result() == LOST:
                stream.lost = True
                stream.cancelled.set()  # interrupts the model; the run ends without a terminal
            elif done.result() == CANCEL:
                flagged()

        try:
            async with contextlib.aclosing(
                until_set(self.provider.stream(req, messages, usage), stream.cancelled)
            ) as tokens:
                async for delta in tokens:
                    at = _now()
                    value = chunk_value.copy()
                    value["seq"], value["at"], value["delta"] = seq, at, delta
                    if chunks == 0:
                        self.metrics.ttft.observe(time.monotonic() - started_at)
                    out = Outgoing(
                        req.message_id,
                        req.session_id,
                        "chunk",
                        seq,
                        {"seq": seq, "delta": delta, "at": at},
                        "chat.chunk",
                        value,
                        traceparent,
                        stream.epoch,
                    )
                    if coalescing:  # the answer comes later, through `answered`
                        self.sink.hold(out, answered)
                        answer = WRITTEN
                    else:
                        answer = await self.sink.emit(out)
                    if answer == LOST:  # a later run owns it, or it ended: write nothing more
                        stream.lost = True
                        break
                    seq += 1
                    chunks += 1
                    parts.append(delta)
                    self.metrics.chunks.inc()
                    if answer == CANCEL:
                        flagged()
                        break
                    if stream.lost or held_error:
                        break
            if coalescing:  # the held chunk before anything else of the message
                answer = await self.sink.release(req.message_id)
                if answer == LOST:
                    stream.lost = True
                elif answer == CANCEL:
                    flagged()
            if stream.lost:
                log.warning("lease lost to another instance; leaving the message to it", extra=ids)
                return "skipped"
            if held_error:
                raise held_error[0]
            if stream.cancelled.is_set():
                wanted, reason = "cancelled", "cancelled by user"
                log.info("cancel received, stream stopped after %d chunks", chunks, extra=ids)
        except ProviderError as e:
            wanted, reason = "failed", e.reason
            log.warning("upstream failed: %s", e.reason, extra=ids)
        except ChatpipeError as e:
            wanted, reason = "failed", str(e)
            log.warning("stream failed: %s", e, extra=ids)
        if coalescing:  # on a failure what is held still goes before the terminal (else a no-op)
            with contextlib.suppress(ChatpipeError):
                await self.sink.release(req.message_id)
        return await self._finish(
            req,
            stream,
            wanted,
            reason,
            seq,
            traceparent,
            chunks,
            flag_seen_at,
            "".join(parts),
            usage=usage,
        )

    async def _finish(
        self,
        req: ChatRequest,
        stream: LocalStream | None,
        wanted: str,
        reason: str,
        seq: int,
        traceparent: str | None,
        chunks: int = 0,
        flag_seen_at: float | None = None,
        answer: str = "",
        turn: bool = True,
        usage: TokenUsage | None = None,
        started: bool = True,
    ) -> str:
        """`answer`: the text streamed (the turn the session's history keeps); `turn` False
        for a request that is not the session's to make (no turn is kept). `usage`: the
        model's token counts (unknown ones: one token per chunk, no prompt count);
        `started` False for a message cancelled before its run began (the cancel's phase)."""
        tokens = Tokens.of(usage, chunks)
        ids = {"message_id": req.message_id, "session_id": req.session_id}
        result = await self.state.finish(
            req.message_id,
            req.session_id,
            self.instance_id,
            wanted,
            reason,
            seq,
            _now(),
            epoch=stream.epoch if stream is not None else "",
            chunks=chunks,
            message=req.message if turn else "",
            answer=answer,
            completion_tokens=tokens.completion,
            prompt_tokens=tokens.prompt,
        )
        if stream is not None:
            stream.finished = True  # its lease is released once Kafka acks the terminal event
        if result.already:
            log.info(
                "already final (%s) when finishing, no terminal event", result.state, extra=ids
            )
            return "skipped"
        final = result.state
        if final == "cancelled":
            phase = "streaming" if chunks else "silence" if started else "queued"
            self.metrics.cancels.labels(phase, result.cancel_source or "unknown").inc()
            self.metrics.cancel_tokens.observe(tokens.completion)
        if final == "cancelled" and stream is not None:
            since: float | None
            if stream.cancel_requested_at is not None:
                since, measured = stream.cancel_requested_at, "requested_at"
            else:
                since, measured = flag_seen_at, "flag"
            if since is not None:
                self.metrics.cancel_latency.labels(measured).observe(max(0.0, time.time() - since))
        self.metrics.messages.labels(final).inc()
        extra: dict[str, Any] = {"usage": tokens.usage(chunks)}
        if result.reason:
            extra["reason"] = result.reason
        await self.sink.publish(
            req.session_id,
            f"chat.{final}",
            self._event(req, f"chat.{final}", seq, _now(), **extra),
            traceparent,
        )
        await self._published(req)
        if final == "cancelled":
            # the cancel has done its work: tombstone it (after its record) so the compacted
            # topic forgets it
            self.tombstones.message_cancelled(
                cancel_record_key(req.session_id, req.message_id).encode()
            )
        log.info("message %s", final, extra={**ids, "chunks": chunks})
        return final

    async def _published(self, req: ChatRequest) -> None:
        """Record that the terminal event is acked (so no later claim publishes it again) and
        release the lease FINISH kept. Retried a while: a Redis blip here would make the next
        claim of a redelivered record publish the terminal a second time."""
        delay = 0.1
        for attempt in range(8):
            try:
                await self.state.published(req.session_id, req.message_id, self.instance_id)
                return
            except RedisError as e:
                log.warning(
                    "could not mark the terminal event published (attempt %d): %s",
                    attempt + 1,
                    e,
                    extra={"message_id": req.message_id, "session_id": req.session_id},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _republish(self, req: ChatRequest, claim: Claim, traceparent: str | None) -> str:
        """The message is final in Redis, but its finisher died (or was stopped) before Kafka
        acked its terminal event: publish it again, from what FINISH recorded. The lease we took
        is refreshed meanwhile (the message is in the registry), so nobody else does too."""
        ids = {"message_id": req.message_id, "session_id": req.session_id}
        final = claim.detail
        log.warning(
            "final (%s) without its terminal on Kafka: publishing it again", final, extra=ids
        )
        self.registry.start(req.message_id, req.session_id)
        try:
            extra: dict[str, Any] = {
                "usage": {"completion_tokens": claim.chunks, "chunks": claim.chunks}
            }
            if claim.reason:
                extra["reason"] = claim.reason
            await self.sink.publish(
                req.session_id,
                f"chat.{final}",
                self._event(req, f"chat.{final}", claim.next_seq, _now(), **extra),
                traceparent,
            )
            await self._published(req)
        finally:
            self.registry.end(req.message_id)
        self.metrics.terminals_republished.inc()
        return final
