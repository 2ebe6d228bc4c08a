"""What the routes do: submit a chat, cancel it, stream it. Routes stay thin."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from datetime import datetime
from typing import Any, TypeVar

import orjson

from api.auth import Forbidden, Principal
from api.hub import Hub, parse_client_id, parse_id
from api.limits import RateLimiter, Slot, StreamLimits
from chatpipe import entries as stream_entries
from chatpipe.clients import ProducerHandle
from chatpipe.codec import headers_for
from chatpipe.errors import ChatpipeError, Unavailable
from chatpipe.history import SessionMessages, page
from chatpipe.keys import cancel_record_key, session_cancel_record_key
from chatpipe.metrics import Metrics
from chatpipe.schemas import (
    CancelBody,
    ChatBody,
    ChatCancel,
    ChatRequest,
    ChatSessionCancel,
    MessageInfo,
    SessionCancelled,
    SessionDeleted,
    rfc3339,
    utcnow,
)
from chatpipe.settings import Settings
from chatpipe.state import State
from chatpipe.tracing import Tracing

log = logging.getLogger(__name__)

Entry = tuple[bytes, bytes, bytes]  # a stream entry for a reader: SSE id, event, JSON data
T = TypeVar("T")

CANCEL_MESSAGES = {
    "cancelled": "Streaming cancelled successfully",
    "completed": "Message already completed",
    "failed": "Message already completed (it failed)",
    "not_found": "No such message in this session",
}


class Conflict(ChatpipeError):
    """The message_id is taken."""


class Busy(Conflict):
    """if_busy=reject and the session has a queued or streaming message: wait for it, or send
    with if_busy=enqueue or interrupt (409)."""


class TooLarge(ChatpipeError):
    """The message is over the size limit."""


class NotFound(ChatpipeError):
    """No such message."""


FORBIDDEN_SESSION = "forbidden: this session or message id belongs to another user"
FORBIDDEN_MESSAGE = "forbidden: this message belongs to another user"


class ChatService:
    def __init__(
        self,
        settings: Settings,
        state: State,
        producer: ProducerHandle,
        hub: Hub,
        metrics: Metrics,
        rate: RateLimiter,
        streams: StreamLimits,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing()  # a span per chat; no-op: traceparent as it came
        self.state = state
        self.producer = producer
        self.hub = hub
        self.metrics = metrics
        self.rate = rate
        self.streams = streams
        self._background: set[asyncio.Task[None]] = set()  # cancel_later's tasks, kept alive

    def _enforce(self, caller: Principal | None) -> bool:
        """Ownership is checked for authenticated callers (AUTH_MODE on), unless turned off."""
        return caller is not None and self.settings.ownership_enforced

    async def _bounded(self, what: str, aw: Awaitable[T]) -> T:
        """Kafka and Redis calls end within the bound: a 503, never a hung request."""
        try:
            async with asyncio.timeout(self.settings.api_kafka_timeout_s):
                return await aw
        except TimeoutError:
            raise Unavailable(
                f"{what} did not answer within {self.settings.api_kafka_timeout_s:g}s"
            ) from None
        except ChatpipeError:
            raise
        except Exception as e:
            raise Unavailable(f"{what} unavailable: {type(e).__name__}: {e}") from None

    async def submit(
        self, body: ChatBody, caller: Principal | None = None, traceparent: str | None = None
    ) -> ChatRequest:
        size = len(body.message.encode())
        if size > self.settings.max_message_bytes:
            raise TooLarge(
                f"message is {size} bytes, the limit is {self.settings.max_message_bytes}"
            )
        given = sum(len(m.content.encode()) for m in body.messages or ())
        if given > self.settings.max_history_bytes:
            raise TooLarge(
                f"messages hold {given} bytes, the limit is {self.settings.max_history_bytes}"
            )
        user_id = body.user_id
        if caller is not None:
            if body.user_id is not None and body.user_id != caller.user_id:
                self.metrics.forbidden.labels("api_chat").inc()
                raise Forbidden("forbidden: user_id in the body is not the authenticated user")
            user_id = caller.user_id
            await self._bounded("redis", self.rate.hit(caller.user_id))
        request = ChatRequest(
            message_id=body.message_id or uuid.uuid4().hex,
            session_id=body.session_id,
            user_id=user_id,
            message=body.message,
            messages=body.messages,
            options=body.options,
        )
        if body.if_busy == "interrupt":  # everything of the session before this one stops
            await self.cancel_session(
                body.session_id, caller, before=request.created_at, source="interrupt"
            )
        answer = await self._bounded(
            "redis",
            self.state.accept(
                request.message_id,
                request.session_id,
                request.user_id,
                rfc3339(request.created_at),
                enforce=self._enforce(caller),
                reject_if_busy=body.if_busy == "reject",
                message=request.message,
            ),
        )
        if answer.startswith("busy:"):
            busy = answer.removeprefix("busy:")
            raise Busy(f"session {body.session_id} is busy with message {busy} (if_busy=reject)")
        if answer == "forbidden":
            self.metrics.forbidden.labels("api_chat").inc()
            log.warning(
                "chat refused: session or message id of another user",
                extra={"message_id": request.message_id, "session_id": request.session_id},
            )
            raise Forbidden(FORBIDDEN_SESSION)
        if answer != "ok":
            raise Conflict(f"message_id {request.message_id} is already used (state {answer})")
        attributes = {
            "chatpipe.message_id": request.message_id,
            "chatpipe.session_id": request.session_id,
        }
        with self.tracing.span("chat.submit", traceparent, attributes) as traceparent:
            try:
                await self._bounded(
                    "kafka",
                    self.producer.get().send_and_wait(
                        self.settings.requests_topic,
                        request.to_json(),
                        key=request.session_id.encode(),
                        headers=headers_for(request.type, traceparent),
                    ),
                )
            except Unavailable:
                # 503 means "not queued": the record, should Kafka take it late, is skipped
                ids = {"message_id": request.message_id, "session_id": request.session_id}
                try:
                    if not await self._bounded(
                        "redis", self.state.withdraw(request.message_id, request.session_id)
                    ):
                        log.info("chat queued after all (a consumer has it)", extra=ids)
                        return request
                except Unavailable:
                    log.warning("could not withdraw an unsent message", extra=ids)
                raise
        log.info(
            "chat queued",
            extra={"message_id": request.message_id, "session_id": request.session_id},
        )
        return request

    async def cancel(
        self, body: CancelBody, caller: Principal | None = None, source: str = "api"
    ) -> str:
        """Cancel one message; `source` (api, session, interrupt) is counted by the consumer
        that ends it (chatpipe_cancels_total)."""
        user_id = caller.user_id if caller is not None else None
        answer: str = await self._bounded(
            "redis",
            self.state.cancel(
                body.session_id,
                body.message_id,
                user_id,
                enforce=self._enforce(caller),
                instance_id=self.settings.instance_id,
                source=source,
            ),
        )
        self.metrics.cancel_requests.labels(answer).inc()
        ids = {"message_id": body.message_id, "session_id": body.session_id}
        if answer == "forbidden":
            self.metrics.forbidden.labels("api_cancel").inc()
            log.warning("cancel refused: message of another user", extra=ids)
            raise Forbidden(FORBIDDEN_MESSAGE)
        if answer == "repeated":
            # accepted before (or already cancelled): same answer, nothing published again
            log.info("cancel repeated", extra=ids)
            return "cancelled"
        if answer != "cancelled":
            log.info("cancel answered %s", answer, extra=ids)
            return answer
        await self._wake_streamer(body)
        cancel = ChatCancel(
            session_id=body.session_id,
            message_id=body.message_id,
            user_id=user_id,
            reason=body.reason,
        )
        # the Redis flag is set, and every streaming consumer checks it on every chunk
        await self._publish_cancel(cancel, cancel_record_key(body.session_id, body.message_id), ids)
        log.info("cancel accepted", extra=ids)
        return answer

    async def _publish_cancel(
        self, record: ChatCancel | ChatSessionCancel, key: str, ids: dict[str, str]
    ) -> None:
        """Write a cancel record on chat.cancels; Kafka away is logged, not raised: Redis has
        the cancel already (a flag, or the session's cancel time), which is what stops it."""
        try:
            await self._bounded(
                "kafka",
                self.producer.get().send_and_wait(
                    self.settings.cancels_topic,
                    record.to_json(),
                    key=key.encode(),
                    headers=headers_for(record.type),
                ),
            )
        except Unavailable as e:
            log.warning("cancel set in Redis but not published: %s", e, extra=ids)

    def cancel_later(
        self, session_id: str, message_id: str, caller: Principal | None, reason: str
    ) -> None:
        """Cancel a message in a task of its own (its client went away: the request's own task
        is being cancelled, the cancel must still run to its end)."""
        body = CancelBody(session_id=session_id, message_id=message_id, reason=reason)
        ids = {"message_id": message_id, "session_id": session_id}

        async def cancel() -> None:
            try:
                status = await self.cancel(body, caller)
                log.info("%s: message %s", reason, status, extra=ids)
            except Exception as e:
                log.warning("could not cancel after %s: %s", reason, e, extra=ids)

        task = asyncio.create_task(cancel(), name=f"cancel-later:{message_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def cancel_session(
        self,
        session_id: str,
        caller: Principal | None = None,
        before: datetime | None = None,
        source: str = "session",
    ) -> SessionCancelled:
        """Cancel every message of the session created before `before` (now when None): the
        queued and streaming ones Redis knows each as `cancel` does (its flag, the streamer
        woken, its record on chat.cancels), and those still only in Kafka by the session's
        cancel time (they end cancelled when a consumer reaches them), which a
        `chat.session_cancel` record on chat.cancels also carries."""
        await self._own_session(session_id, caller, "api_cancel")
        user_id = caller.user_id if caller is not None else None
        record = ChatSessionCancel(session_id=session_id, user_id=user_id)
        if before is not None:
            record.requested_at = before
        cancelled: list[str] = []
        ended: list[str] = []

        async def stop(message_ids: list[str]) -> list[str]:
            stopped: list[str] = []
            for message_id in message_ids:
                answer = await self.cancel(
                    CancelBody(session_id=session_id, message_id=message_id), caller, source
                )
                (stopped if answer == "cancelled" else ended).append(message_id)
            cancelled.extend(stopped)
            return stopped

        until = rfc3339(record.requested_at)
        await self._bounded(
            "redis",
            self.state.stop_session(
                session_id, until, user_id, self._enforce(caller), source, flag=stop
            ),
        )
        await self._publish_cancel(
            record, session_cancel_record_key(session_id), {"session_id": session_id}
        )
        log.info(
            "session cancelled: %d stopped, %d had ended",
            len(cancelled),
            len(ended),
            extra={"session_id": session_id},
        )
        return SessionCancelled(session_id=session_id, cancelled=cancelled, ended=ended)

    async def delete_session(
        self, session_id: str, caller: Principal | None = None
    ) -> SessionDeleted:
        """Stop everything of the session, wait until it has stopped, then remove its history
        and the state and event streams of its messages, and tombstone their cancel records.
        A message still queued in Kafka keeps its state until it has ended (else its record
        would start it anew): when that takes longer than SESSION_DELETE_WAIT_S, Unavailable
        (503: the client sends the DELETE again; it is idempotent)."""
        stopped = await self.cancel_session(session_id, caller)
        await self._until_ended(session_id, stopped.cancelled)
        history = await self._bounded("redis", self.state.history(session_id))
        ids = list(
            dict.fromkeys([*(t.message_id for t in history), *stopped.cancelled, *stopped.ended])
        )
        await self._bounded("redis", self.state.forget_session(session_id, ids))
        producer = self.producer.get()
        keys = [cancel_record_key(session_id, m) for m in ids]
        keys.append(session_cancel_record_key(session_id))
        sent = [
            await producer.send(self.settings.cancels_topic, None, key=key.encode()) for key in keys
        ]
        await self._bounded("kafka", asyncio.gather(*sent))
        log.info(
            "session deleted: %d messages removed, %d stopped first",
            len(ids),
            len(stopped.cancelled),
            extra={"session_id": session_id},
        )
        return SessionDeleted(session_id=session_id, cancelled=stopped.cancelled, removed=ids)

    async def _until_ended(self, session_id: str, stopped: list[str]) -> None:
        """Return once the session has no queued or streaming message and the `stopped` ones
        are done with (their terminal event acked, so their finisher writes nothing more)."""
        wait = self.settings.session_delete_wait_s
        deadline = time.monotonic() + wait
        while await self._bounded("redis", self.state.open_messages(session_id)) or not (
            await self._bounded("redis", self.state.settled(session_id, stopped))
        ):
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"session {session_id} is still stopping after {wait:g}s; send the DELETE again"
                )
            await asyncio.sleep(0.05)

    async def describe(self, message_id: str, caller: Principal | None) -> MessageInfo:
        """Who did what for one message: the api that served its stream last, the one that
        took its cancel, the ai_consumer that generated it (the demo page shows them)."""
        fields = await self._bounded("redis", self.message(message_id))
        if not fields or fields.get("state") == "withdrawn":
            raise NotFound(f"no message {message_id}")
        if self._enforce(caller) and caller is not None and fields.get("user") != caller.user_id:
            self.metrics.forbidden.labels("api_stream").inc()
            raise Forbidden(FORBIDDEN_MESSAGE)
        return MessageInfo(
            message_id=message_id,
            session_id=fields.get("session", ""),
            status=fields.get("state", ""),
            generated_by=fields.get("owner") or None,
            served_by=fields.get("served_by") or None,
            cancelled_by=fields.get("cancelled_by") or None,
            restarts=max(0, int(fields.get("epoch", "1") or 1) - 1),
            created_at=fields.get("created") or None,
            finished_at=fields.get("finished") or None,
            chunks=int(fields.get("chunks", "0") or 0),
        )

    async def session_messages(
        self, session_id: str, caller: Principal | None, limit: int, before: str | None
    ) -> SessionMessages:
        """The session's conversation, oldest first: its ended turns, then the queued and
        streaming ones (read first, so a message ending meanwhile is in one or the other)."""
        await self._own_session(session_id, caller, "api_messages")
        open_ = await self._bounded("redis", self.state.open_turns(session_id))
        ended = await self._bounded("redis", self.state.history(session_id))
        seen = {t.message_id for t in ended}
        turns, more = page([*ended, *(t for t in open_ if t.message_id not in seen)], limit, before)
        return SessionMessages(session_id=session_id, messages=turns, has_more=more)

    async def _own_session(self, session_id: str, caller: Principal | None, what: str) -> None:
        """With ownership enforced, another user's session is Forbidden (nothing changes)."""
        if not self._enforce(caller):
            return
        assert caller is not None
        owner = await self._bounded("redis", self.state.session_owner(session_id))
        if owner is not None and owner != caller.user_id:
            self.metrics.forbidden.labels(what).inc()
            raise Forbidden(FORBIDDEN_SESSION)

    async def _wake_streamer(self, body: CancelBody) -> None:
        """Tell every ai_consumer at once (Redis Pub/Sub) so the one streaming the message stops
        it now, without waiting for its next token or for chat.cancels. A wake-up only: the
        flag (set) and the Kafka record (next) carry the cancel if this is lost."""
        payload = orjson.dumps({"s": body.session_id, "m": body.message_id, "at": time.time()})
        try:
            await self.state.redis.publish(self.state.keys.cancel_wakeup(), payload)
        except Exception as e:
            log.warning(
                "cancel wake-up not published: %s", e, extra={"message_id": body.message_id}
            )

    async def take_slot(self, caller: Principal | None) -> Slot:
        """A stream slot (per-process connections, per-user streams) or Limited / Full."""
        return await self._bounded(
            "redis", self.streams.acquire(caller.user_id if caller is not None else None)
        )

    async def submit_to_stream(
        self, body: ChatBody, caller: Principal | None, traceparent: str | None
    ) -> tuple[ChatRequest, Slot]:
        """`submit` for a caller that streams the answer in the same response: its stream
        slot is taken first (a stream limit refuses before anything is queued)."""
        slot = await self.take_slot(caller)
        try:
            return await self.submit(body, caller, traceparent), slot
        except BaseException:
            await slot.release()
            raise

    async def open_stream(
        self,
        message_id: str,
        last_event_id: str | None,
        caller: Principal | None = None,
        slot: Slot | None = None,
    ) -> tuple[AsyncIterator[bytes], Slot]:
        """Check the message exists (waiting a moment for one produced straight to Kafka) and is
        the caller's, take a stream slot (limits), then return the iterator of its SSE events
        after `last_event_id` and the slot (released when the response ends). A `slot` taken
        beforehand (`take_slot`) is used instead, and released on failure too."""
        # absent or blank (an EventSource whose last event had no id): from the start
        try:
            after = (
                parse_client_id(last_event_id.strip())
                if last_event_id and last_event_id.strip()
                else (0, 0)
            )
            sub, slot = await self._subscribe(message_id, after, caller, slot)
        except BaseException:
            if slot is not None:
                await slot.release()
            raise
        return self._events(sub, slot), slot

    async def open_entries(
        self, message_id: str, caller: Principal | None = None, slot: Slot | None = None
    ) -> tuple[AsyncGenerator[list[Entry], None], Slot]:
        """`open_stream` from the start, as entries (`entries`) instead of SSE text: for the
        OpenAI-compatible routes, which write events of their own."""
        try:
            sub, slot = await self._subscribe(message_id, (0, 0), caller, slot)
        except BaseException:
            if slot is not None:
                await slot.release()
            raise
        return self.entries(sub, slot), slot

    async def _subscribe(
        self,
        message_id: str,
        after: tuple[int, int],
        caller: Principal | None,
        slot: Slot | None,
    ) -> tuple[Any, Slot]:
        session_id = await self._bounded("redis", self._wait_exists(message_id))
        if session_id is None:
            raise NotFound(f"no message {message_id}")
        if caller is not None and self._enforce(caller):
            fields = await self._bounded("redis", self.state.message(session_id, message_id))
            owner = fields.get("user")
            if owner != caller.user_id:
                self.metrics.forbidden.labels("api_stream").inc()
                log.warning(
                    "stream refused: message of another user", extra={"message_id": message_id}
                )
                raise Forbidden(FORBIDDEN_MESSAGE)
        if slot is None:
            slot = await self.take_slot(caller)
        try:
            served = self.state.served(session_id, message_id, self.settings.instance_id)
            await self._bounded("redis", served)
            sub = await self._bounded("redis", self.hub.subscribe(session_id, message_id, after))
        except BaseException:
            await slot.release()
            raise
        return sub, slot

    async def _wait_exists(self, message_id: str) -> str | None:
        """The session of the message once Redis knows it (waiting SSE_UNKNOWN_GRACE_MS for
        one produced straight to Kafka), or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.sse_unknown_grace_ms / 1000
        while True:
            session_id = await self.state.locate(message_id)
            if session_id is not None and await self.state.exists(session_id, message_id):
                return session_id
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def message(self, message_id: str) -> dict[str, str]:
        """The state hash of a message named by its id alone ({} when Redis does not know it)."""
        session_id = await self.state.locate(message_id)
        return {} if session_id is None else await self.state.message(session_id, message_id)

    async def _events(self, sub: Any, slot: Slot) -> AsyncIterator[bytes]:
        """The SSE text of the message's events, encoded here once (`id`, `event`, `data`, as
        sse-starlette writes them). Everything already queued for this client leaves as one
        piece, so a client that fell behind catches up with one write, not one per event."""
        async with contextlib.aclosing(self.entries(sub, slot)) as batches:  # closed with us
            async for batch in batches:
                yield b"".join(
                    b"id: %s\r\nevent: %s\r\ndata: %s\r\n\r\n" % (entry_id, event, data)
                    for entry_id, event, data in batch
                )

    async def entries(self, sub: Any, slot: Slot) -> AsyncGenerator[list[Entry], None]:
        """The message's events after the subscription's cursor, in batches of what is there
        (entry id, event, JSON data), up to and with `done`; `started` is left out (SSE readers
        see chunk, restart, done). The subscription and `slot` are released however it ends."""
        self.metrics.sse_clients.inc()
        last = sub.after
        counters: dict[bytes, Any] = {}  # event -> its metric child (labels() once per client)
        try:
            pending = collections.deque(sub.backlog)
            ended = False
            while not ended:
                if not pending:
                    if sub.overflowed and sub.queue.empty():
                        log.info(
                            "slow SSE client dropped; it resumes with Last-Event-ID",
                            extra={"message_id": sub.message_id},
                        )
                        return
                    first = await sub.queue.get()
                    if first is None:
                        return
                    pending.append(first)
                while not sub.queue.empty():
                    more = sub.queue.get_nowait()
                    if more is None:
                        ended = True  # the hub stopped: send what came before, then end
                        break
                    pending.append(more)
                out: list[Entry] = []
                while pending:
                    entry_id, fields = pending.popleft()
                    sid = parse_id(entry_id)
                    if sid <= last:
                        continue
                    last = sid
                    event = stream_entries.event_of(fields)
                    if event == b"started":
                        continue  # on chat.responses only; SSE readers see chunk/restart/done
                    counter = counters.get(event)
                    if counter is None:
                        counter = counters[event] = self.metrics.sse_events.labels(event.decode())
                    counter.inc()
                    out.append((entry_id.encode(), event, stream_entries.data_of(fields)))
                    if event == b"done":
                        ended = True
                        break
                if out:
                    yield out
        finally:
            self.metrics.sse_clients.dec()
            self.hub.unsubscribe(sub)
            await slot.release()


def dumps_text(obj: Any) -> str:
    return orjson.dumps(obj).decode()


__all__ = ["CANCEL_MESSAGES", "Busy", "ChatService", "Conflict", "NotFound", "TooLarge", "utcnow"]
