"""A session's conversation: the turns Redis keeps, and what is sent upstream with a message.

FINISH (chatpipe/lua/finish.lua) appends each message's turn to the session's list
`chat:history:{session_id}` when the message ends, in the order the session's messages end
(the order they were consumed: a session's lane runs one message at a time). `prompt` turns
that list into OpenAI's role/content `messages` for the next message: the earlier user
messages and answers in order, a stopped answer as far as it got and marked (or left out),
failed ones left out, the oldest whole turns dropped first to fit the character budget.
docs/sessions.md tells the settings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import orjson
from pydantic import BaseModel, Field, ValidationError

from chatpipe.schemas import ChatMessage, ChatRequest
from chatpipe.settings import Settings

log = logging.getLogger(__name__)

TurnStatus = Literal["queued", "streaming", "completed", "cancelled", "failed"]


class Turn(BaseModel):
    """One message of a session and its answer, as `GET /api/sessions/{id}/messages` shows it."""

    message_id: str
    message: str = Field(description="the user's text")
    answer: str = Field(default="", description="the answer's text (so far, while streaming)")
    status: TurnStatus
    reason: str | None = Field(default=None, description="why it failed or was stopped")
    created_at: str | None = Field(default=None, description="when the api accepted it")
    finished_at: str | None = None
    chunks: int = 0
    truncated: bool = Field(
        default=False, description="the answer was longer than HISTORY_MAX_CHARS; cut there"
    )


class SessionMessages(BaseModel):
    """Answer of `GET /api/sessions/{session_id}/messages`."""

    session_id: str
    messages: list[Turn] = Field(description="oldest first")
    has_more: bool = Field(description="older turns exist: ask again with before=<first id>")


def parse_turns(raw: Iterable[bytes | str]) -> list[Turn]:
    """The turns of a history list; an entry that is not a turn (hand-edited) is skipped."""
    turns = []
    for entry in raw:
        try:
            turns.append(Turn.model_validate(orjson.loads(entry)))
        except (orjson.JSONDecodeError, ValidationError):
            log.warning("skipped a history entry that is not a turn")
    return turns


def page(turns: Sequence[Turn], limit: int, before: str | None) -> tuple[list[Turn], bool]:
    """The `limit` newest turns older than message `before` (all when None), oldest first,
    and whether older ones remain. An unknown `before` gives an empty page."""
    end = len(turns)
    if before is not None:
        ids = [t.message_id for t in turns]
        end = ids.index(before) if before in ids else 0
    start = max(0, end - limit)
    return list(turns[start:end]), start > 0


def alone(request: ChatRequest) -> list[ChatMessage]:
    """The conversation of a message without history: its own `messages`, or itself."""
    return list(request.messages or [ChatMessage(role="user", content=request.message)])


def prompt(turns: Sequence[Turn], request: ChatRequest, settings: Settings) -> list[ChatMessage]:
    """What the model is given for `request`: its own `messages` as given, else the system
    prompt, the session's earlier turns (within the budget) and this message."""
    if request.messages:
        return list(request.messages)
    earlier: list[tuple[str, str]] = []
    for turn in turns[-settings.history_max_turns :] if settings.history_max_turns else ():
        if turn.message_id == request.message_id:
            continue
        if turn.status == "completed":
            earlier.append((turn.message, turn.answer))
        elif turn.status == "cancelled" and settings.history_include_cancelled:
            mark = settings.history_cancelled_mark
            answer = f"{turn.answer.rstrip()} {mark}".strip() if mark else turn.answer
            earlier.append((turn.message, answer))
    kept: list[tuple[str, str]] = []
    used = 0
    for user, answer in reversed(earlier):
        used += len(user) + len(answer)
        if used > settings.history_max_chars:
            break
        kept.append((user, answer))
    out = []
    if settings.llm_system_prompt:
        out.append(ChatMessage(role="system", content=settings.llm_system_prompt))
    for user, answer in reversed(kept):
        out.append(ChatMessage(role="user", content=user))
        out.append(ChatMessage(role="assistant", content=answer))
    out.append(ChatMessage(role="user", content=request.message))
    return out
