"""OpenAI's Responses API in background mode, on chatpipe's pipeline: `POST /v1/responses`,
`GET /v1/responses/{id}` (also `?stream=true&starting_after=N`), `POST .../cancel`.

The response id is chatpipe's message id (`resp_<hex>`): the answer streams, resumes and
stops from any instance as every chatpipe message does. What the response was asked (model,
the conversation given, instructions, metadata) is kept in Redis beside it
(`chat:response:{id}`, HISTORY_TTL_S), so any instance can describe it and
`previous_response_id` can continue it.

The stream's events are a pure function of the message's event stream (`ResponseEvents`):
the lifecycle events, one `response.output_text.delta` per chunk that adds text, the closing
events. Every instance numbers them the same way, so `starting_after=N` resumes exactly after
event N (the events are recomputed from the start of the message's stream and those up to N
skipped): no gap, no duplicate. A takeover's re-streamed text is skipped as far as the client
has it (exact for a deterministic model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from api.auth import Forbidden, Principal
from api.limits import Slot
from api.openai.completions import (
    GONE,
    Answer,
    check_request,
    counted,
    served_models,
    valid_id,
)
from api.openai.errors import InvalidRequest
from api.openai.schemas import ResponseRequest, response_unsupported, text_of
from api.service import ChatService, Entry, NotFound
from chatpipe.schemas import (
    MAX_MESSAGES,
    CancelBody,
    ChatBody,
    ChatMessage,
    ChatOptions,
)
from chatpipe.settings import Settings

log = logging.getLogger(__name__)

Json = dict[str, Any]
STATUS = {"queued": "queued", "streaming": "in_progress", "withdrawn": "failed"}
FINAL = ("completed", "cancelled", "failed")
CANCEL_WAIT_S = 2.0  # a cancel answers once the response has ended, or after this long


@dataclass
class Asked:
    """What a response was asked, as kept in Redis."""

    id: str
    model: str
    session_id: str
    messages: list[ChatMessage]
    created_at: int
    background: bool
    instructions: str | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    temperature: float | None = None
    max_output_tokens: int | None = None

    def to_json(self) -> bytes:
        value = {**self.__dict__, "messages": [m.model_dump() for m in self.messages]}
        return orjson.dumps(value)

    @classmethod
    def from_json(cls, raw: bytes) -> Asked:
        value = orjson.loads(raw)
        value["messages"] = [ChatMessage.model_validate(m) for m in value["messages"]]
        return cls(**value)


def response_object(
    asked: Asked, status: str, text: str, usage: Json | None, error: Json | None
) -> Json:
    """The `response` object (what the official SDKs parse)."""
    item: list[Json] = []
    if text or status in FINAL:
        item = [
            {
                "type": "message",
                "id": f"msg_{asked.id}",
                "status": "completed" if status in FINAL else "in_progress",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    return {
        "id": asked.id,
        "object": "response",
        "created_at": asked.created_at,
        "status": status,
        "background": asked.background,
        "model": asked.model,
        "output": item,
        "instructions": asked.instructions,
        "previous_response_id": asked.previous_response_id,
        "metadata": asked.metadata,
        "temperature": asked.temperature,
        "max_output_tokens": asked.max_output_tokens,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "top_p": None,
        "error": error,
        "incomplete_details": None,
        "usage": usage,
    }


class ResponseEvents:
    """The numbered stream events of one response, from the message's entries."""

    def __init__(self, asked: Asked) -> None:
        self.asked = asked
        self.answer = Answer(asked.id, asked.model, asked.created_at)
        self.seq = -1

    def _event(self, kind: str, **fields: Any) -> Json:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def opening(self) -> list[Json]:
        first = "queued" if self.asked.background else "in_progress"
        item = {
            "type": "message",
            "id": f"msg_{self.asked.id}",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        ids = {"item_id": item["id"], "output_index": 0}
        return [
            self._event("response.created", response=self._snapshot(first)),
            self._event("response.in_progress", response=self._snapshot("in_progress")),
            self._event("response.output_item.added", output_index=0, item=item),
            self._event(
                "response.content_part.added",
                **ids,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]

    def feed(self, batch: list[Entry]) -> list[Json]:
        """The events these entries make (the closing ones with `done`)."""
        out = []
        ids = {"item_id": f"msg_{self.asked.id}", "output_index": 0, "content_index": 0}
        for _, event, data in batch:
            piece = self.answer.delta(event, data)
            if piece:
                out.append(
                    self._event("response.output_text.delta", **ids, delta=piece, logprobs=[])
                )
        return out

    def closing(self, counted: dict[str, str]) -> list[Json]:
        text = "".join(self.answer.text)
        ids = {"item_id": f"msg_{self.asked.id}", "output_index": 0}
        status = self.answer.status or "failed"
        final = self.final(counted)
        part = {"type": "output_text", "text": text, "annotations": []}
        # a stopped response ends with `response.incomplete` (a lifecycle event the SDKs parse;
        # OpenAI has no `response.cancelled`), its `response.status` is `cancelled`
        kind = {"completed": "response.completed", "cancelled": "response.incomplete"}.get(
            status, "response.failed"
        )
        return [
            self._event(
                "response.output_text.done", **ids, content_index=0, text=text, logprobs=[]
            ),
            self._event("response.content_part.done", **ids, content_index=0, part=part),
            self._event("response.output_item.done", output_index=0, item=final["output"][0]),
            self._event(kind, response=final),
        ]

    def final(self, counted: dict[str, str]) -> Json:
        status = self.answer.status or "failed"
        error = None
        if status == "failed":
            error = {"code": "server_error", "message": self.answer.reason or "failed"}
        usage = self.answer.usage(counted, self.asked.messages)
        incomplete = {"reason": "cancelled"} if status == "cancelled" else None
        tokens = {
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        final = response_object(self.asked, status, "".join(self.answer.text), tokens, error)
        final["incomplete_details"] = incomplete
        return final

    def _snapshot(self, status: str) -> Json:
        return response_object(self.asked, status, "", None, None)


class Responses:
    def __init__(self, service: ChatService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    # --- create --------------------------------------------------------------------------
    async def create(
        self, body: ResponseRequest, caller: Principal | None, traceparent: str | None
    ) -> Asked:
        """Queue the response (in Kafka before this returns) and keep what it was asked."""
        check_request(body.model, served_models(self.settings), response_unsupported(body))
        earlier: list[ChatMessage] = []
        session_id = (body.metadata or {}).get("session_id") or f"oai-{uuid.uuid4().hex}"
        if body.previous_response_id is not None:
            previous = await self.asked(body.previous_response_id, caller, "previous_response_id")
            session_id = previous.session_id
            earlier = [m for m in previous.messages if m.role != "system"]  # not carried over
            earlier.append(ChatMessage(role="assistant", content=await self._text(previous)))
        if not valid_id(session_id):
            raise InvalidRequest("session_id must be 1-128 of A-Z a-z 0-9 _ . : @ -", "metadata")
        given = (
            [ChatMessage(role="user", content=body.input)]
            if isinstance(body.input, str)
            else [
                ChatMessage(
                    role="system" if i.role == "developer" else i.role, content=text_of(i.content)
                )
                for i in body.input
            ]
        )
        if not given or given[-1].role != "user" or not given[-1].content:
            raise InvalidRequest("The input must end with a user message.", "input")
        system = (
            [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
        )
        messages = [*system, *earlier, *given]
        if len(messages) > MAX_MESSAGES:  # a long chain of previous_response_id
            raise InvalidRequest(
                f"The conversation would hold {len(messages)} messages; at most "
                f"{MAX_MESSAGES} (start a new one without previous_response_id).",
                "previous_response_id" if earlier else "input",
            )
        asked = Asked(
            id=f"resp_{uuid.uuid4().hex}",
            model=body.model,
            session_id=session_id,
            messages=messages,
            created_at=int(time.time()),
            background=bool(body.background),
            instructions=body.instructions,
            previous_response_id=body.previous_response_id,
            metadata=dict(body.metadata or {}),
            temperature=body.temperature,
            max_output_tokens=body.max_output_tokens,
        )
        options = ChatOptions(
            max_tokens=body.max_output_tokens, model=body.model, temperature=body.temperature
        )
        chat = ChatBody(
            session_id=session_id,
            message=given[-1].content,
            messages=messages,
            message_id=asked.id,
            options=options,
        )
        await self.service.state.save_response(session_id, asked.id, asked.to_json())
        await self.service.submit(chat, caller, traceparent)
        return asked

    # --- read ------------------------------------------------------------------------------
    async def asked(self, response_id: str, caller: Principal | None, param: str = "") -> Asked:
        """What the response was asked; NotFound for an unknown id or another user's (a 404
        either way: whether someone else's response exists is not told)."""
        session_id = await self.service.state.locate(response_id)
        raw = (
            None
            if session_id is None
            else await self.service.state.response(session_id, response_id)
        )
        if session_id is None or raw is None:
            raise ResponseNotFound(f"No response found with id '{response_id}'.", param or None)
        asked = Asked.from_json(raw)
        if caller is not None and self.service.settings.ownership_enforced:
            owner = (await self.service.state.message(session_id, response_id)).get("user")
            if owner is None:
                owner = await self.service.state.session_owner(asked.session_id)
            if owner is not None and owner != caller.user_id:
                raise ResponseNotFound(f"No response found with id '{response_id}'.", param or None)
        return asked

    async def retrieve(self, response_id: str, caller: Principal | None) -> Json:
        asked = await self.asked(response_id, caller)
        fields = await self.service.state.message(asked.session_id, response_id)
        state = fields.get("state")
        if state in FINAL or state is None:
            turn = await self.service.state.turn(asked.session_id, response_id)
            if turn is None and state is None:
                return response_object(asked, "failed", "", None, _expired())
            events = ResponseEvents(asked)
            text = turn.answer if turn is not None else await self._text(asked)
            events.answer.text = [text]
            events.answer.status = turn.status if turn is not None else state
            events.answer.reason = turn.reason if turn is not None else fields.get("reason")
            events.answer.chunks = turn.chunks if turn is not None else int(fields.get("chunks", 0))
            return events.final(fields)
        text = await self.service.state.answer_so_far(asked.session_id, response_id)
        return response_object(asked, STATUS.get(str(state), "in_progress"), text, None, None)

    async def _text(self, asked: Asked) -> str:
        turn = await self.service.state.turn(asked.session_id, asked.id)
        if turn is not None:
            return turn.answer
        return await self.service.state.answer_so_far(asked.session_id, asked.id)

    async def events(
        self, asked: Asked, caller: Principal | None, starting_after: int | None = None
    ) -> tuple[AsyncIterator[bytes], Slot]:
        """The response's SSE events after `starting_after` (all when None), from any
        instance. A client of a response that is not `background` that goes away cancels it."""
        entries, slot = await self.service.open_entries(asked.id, caller)
        return self._stream(asked, entries, starting_after, caller), slot

    async def _stream(
        self,
        asked: Asked,
        entries: AsyncGenerator[list[Entry], None],
        starting_after: int | None,
        caller: Principal | None,
    ) -> AsyncIterator[bytes]:
        events = ResponseEvents(asked)
        after = -1 if starting_after is None else starting_after
        ended = False
        try:
            first = [e for e in events.opening() if e["sequence_number"] > after]
            if first:
                yield _sse(first)
            async with contextlib.aclosing(entries) as batches:
                async for batch in batches:
                    out = [e for e in events.feed(batch) if e["sequence_number"] > after]
                    if events.answer.status is not None:
                        tokens = await counted(self.service, asked.session_id, asked.id)
                        out += [e for e in events.closing(tokens) if e["sequence_number"] > after]
                        ended = True
                    if out:
                        yield _sse(out)
                    if ended:
                        break
        finally:
            if not ended and not asked.background:
                self.service.cancel_later(asked.session_id, asked.id, caller, GONE)

    async def wait_final(self, asked: Asked, caller: Principal | None) -> Json:
        """The response once it has ended (a foreground `stream: false` request)."""
        entries, slot = await self.service.open_entries(asked.id, caller)
        try:
            async with contextlib.aclosing(entries) as batches:
                async for _batch in batches:
                    pass
        finally:
            await slot.release()
        return await self.retrieve(asked.id, caller)

    # --- cancel ----------------------------------------------------------------------------
    async def cancel(self, response_id: str, caller: Principal | None) -> Json:
        """Cancel from any instance; idempotent: a finished response is returned unchanged."""
        asked = await self.asked(response_id, caller)
        fields = await self.service.state.message(asked.session_id, response_id)
        if fields.get("state") not in FINAL:
            try:
                await self.service.cancel(
                    CancelBody(session_id=asked.session_id, message_id=response_id), caller
                )
            except Forbidden:
                raise ResponseNotFound(
                    f"No response found with id '{response_id}'.", None
                ) from None
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline:
                fields = await self.service.state.message(asked.session_id, response_id)
                if fields.get("state") in FINAL:
                    break
                await asyncio.sleep(0.02)
        return await self.retrieve(response_id, caller)


class ResponseNotFound(NotFound):
    """No such response (or another user's): check the id."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def _expired() -> Json:
    return {"code": "server_error", "message": "the response's state has expired"}


def _sse(events: list[Json]) -> bytes:
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (str(e["type"]).encode(), orjson.dumps(e)) for e in events
    )
