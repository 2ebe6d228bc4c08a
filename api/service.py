"""What the routes do: submit a chat, cancel it, stream it. Routes stay thin."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson

from api.hub import Hub, format_id, parse_id
from chatpipe.clients import ProducerHandle
from chatpipe.codec import headers_for
from chatpipe.errors import ChatpipeError, Unavailable
from chatpipe.keys import cancel_record_key
from chatpipe.metrics import Metrics
from chatpipe.schemas import CancelBody, ChatBody, ChatCancel, ChatRequest, rfc3339, utcnow
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger(__name__)
T = TypeVar("T")

CANCEL_MESSAGES = {
    "cancelled": "Streaming cancelled successfully",
    "completed": "Message already completed",
    "failed": "Message already completed (it failed)",
    "not_found": "No such message in this session",
}


class Conflict(ChatpipeError):
    """The message_id is taken."""


class TooLarge(ChatpipeError):
    """The message is over the size limit."""


class NotFound(ChatpipeError):
    """No such message."""


class ChatService:
    def __init__(
        self,
        settings: Settings,
        state: State,
        producer: ProducerHandle,
        hub: Hub,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.state = state
        self.producer = producer
        self.hub = hub
        self.metrics = metrics

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

    async def submit(self, body: ChatBody, traceparent: str | None = None) -> ChatRequest:
        size = len(body.message.encode())
        if size > self.settings.max_message_bytes:
            raise TooLarge(
                f"message is {size} bytes, the limit is {self.settings.max_message_bytes}"
            )
        request = ChatRequest(
            message_id=body.message_id or uuid.uuid4().hex,
            session_id=body.session_id,
            user_id=body.user_id,
            message=body.message,
            options=body.options,
        )
        answer = await self._bounded(
            "redis",
            self.state.accept(
                request.message_id, request.session_id, request.user_id, rfc3339(request.created_at)
            ),
        )
        if answer != "ok":
            raise Conflict(f"message_id {request.message_id} is already used (state {answer})")
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
            try:
                await self._bounded("redis", self.state.forget(request.message_id))
            except Unavailable:
                log.warning(
                    "could not forget an unsent message", extra={"message_id": request.message_id}
                )
            raise
        log.info(
            "chat queued",
            extra={"message_id": request.message_id, "session_id": request.session_id},
        )
        return request

    async def cancel(self, body: CancelBody) -> str:
        answer: str = await self._bounded(
            "redis", self.state.cancel(body.session_id, body.message_id)
        )
        self.metrics.cancel_requests.labels(answer).inc()
        ids = {"message_id": body.message_id, "session_id": body.session_id}
        if answer != "cancelled":
            log.info("cancel answered %s", answer, extra=ids)
            return answer
        cancel = ChatCancel(
            session_id=body.session_id, message_id=body.message_id, reason=body.reason
        )
        try:
            await self._bounded(
                "kafka",
                self.producer.get().send_and_wait(
                    self.settings.cancels_topic,
                    cancel.to_json(),
                    key=cancel_record_key(body.session_id, body.message_id).encode(),
                    headers=headers_for(cancel.type),
                ),
            )
        except Unavailable as e:
            # the Redis flag is set, and every streaming consumer checks it on every chunk
            log.warning("cancel flagged in Redis but not published: %s", e, extra=ids)
        log.info("cancel accepted", extra=ids)
        return answer

    async def open_stream(
        self, message_id: str, last_event_id: str | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Check the message exists (waiting a moment for one produced straight to Kafka), then
        return the iterator of its SSE events after `last_event_id`."""
        after = (0, 0)
        if last_event_id:
            try:
                after = parse_id(last_event_id.strip())
            except ValueError:
                after = (0, 0)
        if not await self._bounded("redis", self._wait_exists(message_id)):
            raise NotFound(f"no message {message_id}")
        sub = await self._bounded("redis", self.hub.subscribe(message_id, after))
        return self._events(sub)

    async def _wait_exists(self, message_id: str) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.sse_unknown_grace_ms / 1000
        while True:
            if await self.state.exists(message_id):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def _events(self, sub: Any) -> AsyncIterator[dict[str, Any]]:
        self.metrics.sse_clients.inc()
        last = sub.after
        try:
            pending = list(sub.backlog)
            while True:
                if pending:
                    entry = pending.pop(0)
                else:
                    if sub.overflowed and sub.queue.empty():
                        log.info(
                            "slow SSE client dropped; it resumes with Last-Event-ID",
                            extra={"message_id": sub.message_id},
                        )
                        return
                    entry = await sub.queue.get()
                    if entry is None:
                        return
                entry_id, fields = entry
                sid = parse_id(entry_id)
                if sid <= last:
                    continue
                last = sid
                event = fields.get(b"e", b"").decode()
                if event == "started":
                    continue  # on chat.responses only; SSE readers see chunk/restart/done
                self.metrics.sse_events.labels(event).inc()
                yield {
                    "id": format_id(sid),
                    "event": event,
                    "data": fields.get(b"d", b"{}").decode(),
                }
                if event == "done":
                    return
        finally:
            self.metrics.sse_clients.dec()
            self.hub.unsubscribe(sub)


def dumps_text(obj: Any) -> str:
    return orjson.dumps(obj).decode()


__all__ = ["CANCEL_MESSAGES", "ChatService", "Conflict", "NotFound", "TooLarge", "utcnow"]
