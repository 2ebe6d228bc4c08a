"""`POST /v1/chat/completions` on chatpipe's pipeline: the request goes through chat.requests
like any chat (in Kafka, acks=all, before the first byte), the answer is read from the
message's event stream in Redis (any instance can serve it) and written as OpenAI's
`chat.completion.chunk` events, or gathered into one `chat.completion`.

A client that goes away before the answer ended (it closed its stream, an `AbortController`,
a dropped connection) cancels the message as `POST /api/cancel` would, from this instance:
the consumer stops at its next chunk and closes its upstream stream, so the model server
sees the disconnect, as with OpenAI and vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import orjson
from fastapi import Request

from api.auth import Principal
from api.limits import Slot
from api.openai.errors import InvalidRequest, ModelNotFound, UpstreamFailed, error_body
from api.openai.schemas import (
    AnswerMessage,
    Choice,
    ChunkChoice,
    Completion,
    CompletionChunk,
    CompletionRequest,
    CompletionUsage,
    Delta,
    text_of,
    unsupported,
)
from api.service import ChatService, Entry
from chatpipe.schemas import ID_PATTERN, ChatBody, ChatMessage, ChatOptions
from chatpipe.settings import Settings

log = logging.getLogger(__name__)

SESSION_HEADER = "x-chatpipe-session-id"
GONE = "client disconnected"  # the reason of the cancel a client that left causes
DISCONNECT_POLL_S = 0.25  # a non-streamed completion: how often the client's presence is checked


def served_models(settings: Settings) -> list[str]:
    """OPENAI_MODELS (comma-separated), else LLM_MODEL, else `chatpipe`."""
    names = [m.strip() for m in settings.openai_models.split(",") if m.strip()]
    return names or [settings.llm_model or "chatpipe"]


def check_request(model: str, models: list[str], refused: tuple[str, str] | None) -> None:
    """ModelNotFound for a model not served; InvalidRequest naming an unsupported parameter."""
    if model not in models:
        raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.")
    if refused is not None:
        param, why = refused
        raise InvalidRequest(f"Unsupported parameter '{param}': {why}.", param, "unsupported")


def chat_body(body: CompletionRequest, session_header: str | None, models: list[str]) -> ChatBody:
    """The chatpipe chat of an OpenAI request, or InvalidRequest / ModelNotFound."""
    check_request(body.model, models, unsupported(body))
    if body.messages[-1].role != "user":
        raise InvalidRequest("The last message must be a user message.", "messages")
    session_id = (body.metadata or {}).get("session_id") or session_header
    if session_id is None:
        session_id = f"oai-{uuid.uuid4().hex}"
    elif not valid_id(session_id):
        raise InvalidRequest(
            "session_id must be 1-128 of A-Z a-z 0-9 _ . : @ -", "metadata.session_id"
        )
    messages = []
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        messages.append(ChatMessage(role=role, content=text_of(m.content)))
    if not messages[-1].content:
        raise InvalidRequest("The last user message is empty.", "messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    options = ChatOptions(max_tokens=max_tokens, model=body.model, temperature=body.temperature)
    return ChatBody(
        session_id=session_id, message=messages[-1].content, messages=messages, options=options
    )


def valid_id(value: str) -> bool:
    """`value` is a contract id (chatpipe.schemas.ID_PATTERN)."""
    return re.fullmatch(ID_PATTERN, value) is not None


@dataclass
class Answer:
    """What was read of one message's events so far."""

    completion_id: str
    model: str
    created: int
    text: list[str] = field(default_factory=list)
    sent: int = 0  # characters given to the client (a takeover re-streams: skip that many)
    replayed: int = 0  # characters of the current run seen
    status: str | None = None
    reason: str | None = None
    chunks: int = 0

    def delta(self, event: bytes, data: bytes) -> str | None:
        """The text this entry adds for the client (None: nothing), updating the state."""
        if event == b"restart":
            self.replayed = 0
            return None
        if event == b"done":
            done = orjson.loads(data)
            self.status, self.reason = str(done.get("status")), done.get("reason")
            return None
        if event != b"chunk":
            return None
        piece = str(orjson.loads(data).get("delta", ""))
        start = self.replayed
        self.replayed += len(piece)
        if self.replayed <= self.sent:
            return None  # the takeover's run repeats what the client has
        new = piece[max(0, self.sent - start) :]
        self.sent += len(new)
        self.chunks += 1
        self.text.append(new)
        return new

    def usage(self, counted: dict[str, str], prompt: list[ChatMessage]) -> CompletionUsage:
        """The model's own counts, as the ai_consumer recorded them with the final state
        (`completion_tokens`, `prompt_tokens`); what it did not count: one token per chunk,
        and the prompt at 4 characters a token (chatpipe does not run the model's tokenizer)."""
        completion = _count(counted.get("completion_tokens"), self.chunks)
        estimate = max(1, sum(len(m.content) for m in prompt) // 4)
        prompt_tokens = _count(counted.get("prompt_tokens"), estimate)
        return CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        )


def _count(value: str | None, otherwise: int) -> int:
    return int(value) if value and value.isdigit() else otherwise


class Completions:
    def __init__(self, service: ChatService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    @property
    def models(self) -> list[str]:
        return served_models(self.settings)

    async def start(
        self, body: CompletionRequest, request: Request, caller: Principal | None
    ) -> tuple[ChatBody, str, AsyncGenerator[list[Entry], None], Slot]:
        chat = chat_body(body, request.headers.get(SESSION_HEADER), self.models)
        traceparent = request.headers.get("traceparent")
        queued, slot = await self.service.submit_to_stream(chat, caller, traceparent)
        entries, slot = await self.service.open_entries(queued.message_id, caller, slot)
        return chat, queued.message_id, entries, slot

    def answer(self, body: CompletionRequest, message_id: str) -> Answer:
        return Answer(f"chatcmpl-{message_id}", body.model, int(time.time()))

    async def stream(
        self,
        body: CompletionRequest,
        chat: ChatBody,
        message_id: str,
        entries: AsyncGenerator[list[Entry], None],
        caller: Principal | None,
    ) -> AsyncIterator[bytes]:
        """The SSE body: a role chunk, a chunk per delta, the finish chunk (or an error
        object for a failed answer), the usage chunk when asked for, `[DONE]`."""
        answer = self.answer(body, message_id)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        try:
            yield _data(self._chunk(answer, Delta(role="assistant", content="")))
            async with contextlib.aclosing(entries) as batches:
                async for batch in batches:
                    out = []
                    for _, event, data in batch:
                        piece = answer.delta(event, data)
                        if piece:
                            out.append(_data(self._chunk(answer, Delta(content=piece))))
                    if out:
                        yield b"".join(out)
                    if answer.status is not None:
                        break
            if answer.status == "failed":
                message = f"the answer failed: {answer.reason or 'unknown'}"
                yield _data(error_body(502, message, None, "upstream_error"))
            elif answer.status is not None:
                yield _data(self._chunk(answer, Delta(), finish="stop"))
                if include_usage:
                    usage = answer.usage(
                        await counted(self.service, chat.session_id, message_id),
                        chat.messages or [],
                    )
                    last = CompletionChunk(
                        id=answer.completion_id,
                        created=answer.created,
                        model=answer.model,
                        choices=[],
                        usage=usage,
                    )
                    yield _data(last.model_dump(mode="json"))
            yield b"data: [DONE]\n\n"
        finally:
            if answer.status is None:
                self.service.cancel_later(chat.session_id, message_id, caller, GONE)

    async def whole(
        self,
        body: CompletionRequest,
        chat: ChatBody,
        message_id: str,
        entries: AsyncGenerator[list[Entry], None],
        caller: Principal | None,
        request: Request,
    ) -> Completion:
        """Gather the answer; a client gone meanwhile cancels it (as a closed stream does)."""
        answer = self.answer(body, message_id)

        async def read() -> None:
            async with contextlib.aclosing(entries) as batches:
                async for batch in batches:
                    for _, event, data in batch:
                        answer.delta(event, data)
                    if answer.status is not None:
                        return

        reading = asyncio.create_task(read())
        try:
            while not reading.done():
                await asyncio.wait({reading}, timeout=DISCONNECT_POLL_S)
                if not reading.done() and await request.is_disconnected():
                    reading.cancel()
                    break
            await reading
        finally:
            if answer.status is None:
                reading.cancel()
                self.service.cancel_later(chat.session_id, message_id, caller, GONE)
        if answer.status == "failed":
            raise UpstreamFailed(f"the answer failed: {answer.reason or 'unknown'}")
        return Completion(
            id=answer.completion_id,
            created=answer.created,
            model=answer.model,
            choices=[
                Choice(message=AnswerMessage(content="".join(answer.text)), finish_reason="stop")
            ],
            usage=answer.usage(
                await counted(self.service, chat.session_id, message_id), chat.messages or []
            ),
        )

    def _chunk(self, answer: Answer, delta: Delta, finish: str | None = None) -> dict[str, object]:
        chunk = CompletionChunk(
            id=answer.completion_id,
            created=answer.created,
            model=answer.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish)],
        )
        return chunk.model_dump(mode="json", exclude_none=False)


async def counted(service: ChatService, session_id: str, message_id: str) -> dict[str, str]:
    """The message's state hash (its token counts), {} when Redis cannot say now: the answer
    is complete, its usage then falls back to counting."""
    try:
        return await service.state.message(session_id, message_id)
    except Exception as e:
        log.warning("token counts unavailable: %s", e, extra={"message_id": message_id})
        return {}


def _data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
