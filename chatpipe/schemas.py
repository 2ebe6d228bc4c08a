"""Contract v1 messages (design.md §2) as pydantic models.

Output is snake_case. Input also accepts camelCase (a Spring `KafkaTemplate` with Jackson sends
`sessionId`), ignores unknown fields, and accepts Jackson's numeric timestamps for dates.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

SCHEMA_VERSION = 1
ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"

Id = Annotated[str, Field(pattern=ID_PATTERN, description="1-128 of A-Z a-z 0-9 _ . : @ -")]


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ContractModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        loc_by_alias=False,
        extra="ignore",
        coerce_numbers_to_str=True,
        ser_json_timedelta="float",
    )

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def _aware(value: Any) -> Any:
    """Read a date without an offset (Jackson's LocalDateTime, hand-written producers) as UTC."""
    if isinstance(value, str) and value and value[-1].isdigit() and "T" in value:
        tail = value.split("T", 1)[1]
        if "+" not in tail and "-" not in tail:
            return value + "Z"
    return value


# `type` and `schema_version` say what a record is: null there is still an error
NOT_NULLABLE = frozenset({"type", "schema_version", "schemaVersion"})


class InputModel(ContractModel):
    """A record chatpipe reads. `null` in an optional field is read as absent: Jackson writes
    `"createdAt": null` for an unset property by default, and the field then takes its default
    (contract 1.1.0; 1.0.0 sent such a record to the DLQ). A required field that is null is
    still missing, and a null `type` or `schema_version` is still rejected."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None or k in NOT_NULLABLE}
        return data


class ChatOptions(InputModel):
    max_tokens: int | None = Field(default=None, ge=1, le=100_000)
    model: str | None = Field(default=None, max_length=200)
    temperature: float | None = Field(default=None, ge=0, le=2)


MAX_MESSAGES = 1000


class ChatMessage(InputModel):
    """One entry of a conversation, as OpenAI's chat `messages` hold it."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str


def message_from_messages(data: Any) -> Any:
    """Before validation: a body without `message` but with `messages` takes the last user
    entry's text as its `message` (when there is none, `message` is reported missing)."""
    if (
        isinstance(data, dict)
        and not data.get("message")
        and isinstance(data.get("messages"), list)
    ):
        for entry in reversed(data["messages"]):
            fields = entry.model_dump() if isinstance(entry, BaseModel) else entry
            if isinstance(fields, dict) and fields.get("role") == "user":
                content = fields.get("content")
                if isinstance(content, str) and content:
                    return {**data, "message": content}
                break
    return data


def message_or_messages(schema: dict[str, Any]) -> None:
    """JSON Schema: `message` is required unless `messages` is given."""
    schema["required"] = [f for f in schema.get("required", []) if f != "message"]
    schema["anyOf"] = [{"required": ["message"]}, {"required": ["messages"]}]


class ChatRequest(InputModel):
    """`chat.request` on chat.requests, key = session_id.

    `messages` (contract 1.3.0): a producer that keeps its own history sends the whole
    conversation, OpenAI's role/content list ending with this turn's user message; it is sent
    upstream as given, instead of the history chatpipe keeps. `message` may then be left out:
    it is the last user entry's text."""

    schema_version: Literal[1] = 1
    type: Literal["chat.request"] = "chat.request"
    message_id: Id
    session_id: Id
    user_id: Id | None = None
    model_config = ConfigDict(json_schema_extra=message_or_messages)

    message: str = Field(
        min_length=1,
        description="the user's text; required unless `messages` ends with a user entry",
    )
    created_at: AwareDatetime = Field(default_factory=utcnow)
    options: ChatOptions | None = None
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGES,
        description="the whole conversation, sent upstream as given (since 1.3.0)",
    )
    if_busy: Literal["enqueue", "interrupt", "reject"] | None = Field(
        default=None,
        description="when the session has a queued or streaming message (since 1.4.0): "
        "enqueue (absent: the default) runs this one after it; interrupt cancels every message "
        "of the session created before this one, then runs it; reject ends this one `failed` "
        "with reason `busy: <message_id>` (nothing else changes)",
    )

    _created_at_aware = field_validator("created_at", mode="before")(_aware)

    _message = model_validator(mode="before")(message_from_messages)


class ChatCancel(InputModel):
    """`chat.cancel` on chat.cancels, key = `{session_id}:{message_id}`; tombstoned once final."""

    schema_version: Literal[1] = 1
    type: Literal["chat.cancel"] = "chat.cancel"
    session_id: Id
    message_id: Id
    user_id: Id | None = None
    requested_at: AwareDatetime = Field(default_factory=utcnow)
    reason: str | None = Field(default=None, max_length=500)

    _requested_at_aware = field_validator("requested_at", mode="before")(_aware)


class ChatSessionCancel(InputModel):
    """`chat.session_cancel` on chat.cancels, key = `{session_id}` (escaped as in a cancel's
    key, chatpipe.keys.part): stops every message of the session created before
    `requested_at`, queued (also those still only in Kafka: they never start) or streaming.
    Messages created later run as usual (contract 1.4.0)."""

    schema_version: Literal[1] = 1
    type: Literal["chat.session_cancel"] = "chat.session_cancel"
    session_id: Id
    user_id: Id | None = None
    requested_at: AwareDatetime = Field(default_factory=utcnow)
    reason: str | None = Field(default=None, max_length=500)

    _requested_at_aware = field_validator("requested_at", mode="before")(_aware)


CancelRecord = ChatCancel | ChatSessionCancel

IfBusy = Literal["enqueue", "interrupt", "reject"]


class Usage(ContractModel):
    completion_tokens: int = Field(
        default=0, description="tokens the model counted (one per chunk when it says none)"
    )
    chunks: int = 0
    prompt_tokens: int | None = Field(
        default=None, description="tokens of what the model was given, when it says (1.5.0)"
    )


class ResponseEvent(ContractModel):
    """Common fields of every event on chat.responses, key = session_id."""

    schema_version: Literal[1] = 1
    message_id: Id
    session_id: Id
    seq: int = Field(ge=0, description="0,1,2... per message, strictly increasing")
    instance_id: str
    at: AwareDatetime


class ChatStarted(ResponseEvent):
    type: Literal["chat.started"] = "chat.started"
    restart: bool | None = Field(
        default=None, description="true when another instance took over a dead owner's stream"
    )


class ChatChunk(ResponseEvent):
    type: Literal["chat.chunk"] = "chat.chunk"
    delta: str
    count: int | None = Field(
        default=None,
        ge=2,
        description=(
            "since 1.7.0: the record carries this many chunks (`seq` is the first one's, the "
            "next record's `seq` is `seq + count`; `delta` is their text joined); absent: one. "
            "Only with RESPONSES_CHUNK_WINDOW_MS > 0 or (since 1.8.0) COALESCE_MS > 0"
        ),
    )


class ChatCompleted(ResponseEvent):
    type: Literal["chat.completed"] = "chat.completed"
    usage: Usage | None = None


class ChatCancelled(ResponseEvent):
    type: Literal["chat.cancelled"] = "chat.cancelled"
    reason: str | None = None
    usage: Usage | None = None


class ChatFailed(ResponseEvent):
    type: Literal["chat.failed"] = "chat.failed"
    reason: str
    usage: Usage | None = None


TerminalEvent = ChatCompleted | ChatCancelled | ChatFailed
TERMINAL_TYPES = {
    "chat.completed": "completed",
    "chat.cancelled": "cancelled",
    "chat.failed": "failed",
}


# --- HTTP bodies -------------------------------------------------------------------------


class ChatBody(ContractModel):
    """Body of `POST /api/chat` and `POST /api/chat/stream`."""

    model_config = ConfigDict(json_schema_extra=message_or_messages)

    session_id: Id
    message: str = Field(
        min_length=1,
        description="the user's text; may be left out when `messages` ends with a user entry",
    )
    messages: list[ChatMessage] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGES,
        description="the whole conversation (OpenAI's role/content list, ending with this "
        "turn's user message), sent upstream as given instead of the session's history",
    )
    user_id: Id | None = None
    message_id: Id | None = Field(default=None, description="chosen by the server when absent")
    options: ChatOptions | None = None
    if_busy: IfBusy = Field(
        default="enqueue",
        description="when the session has a queued or streaming message: enqueue this one "
        "behind it, interrupt (cancel everything open in the session, then run this one), or "
        "reject (409 naming the busy message, nothing queued)",
    )

    _message = model_validator(mode="before")(message_from_messages)


class ChatAccepted(BaseModel):
    message_id: str
    session_id: str
    status: Literal["queued"] = "queued"
    stream_url: str


class CancelBody(ContractModel):
    session_id: Id
    message_id: Id
    reason: str | None = Field(default=None, max_length=500)


class SessionCancelled(BaseModel):
    """Answer of `POST /api/sessions/{session_id}/cancel`."""

    session_id: str
    cancelled: list[str] = Field(description="ids of the messages this stopped (or was stopping)")
    ended: list[str] = Field(description="ids that had ended before the cancel reached them")


class MessageInfo(BaseModel):
    """Answer of `GET /api/chat/{message_id}`: the message's state and who handled it."""

    message_id: str
    session_id: str
    status: str = Field(description="queued, streaming, completed, cancelled or failed")
    generated_by: str | None = Field(default=None, description="the ai_consumer that ran it")
    served_by: str | None = Field(default=None, description="the api that served its stream")
    cancelled_by: str | None = Field(default=None, description="the api that took its cancel")
    restarts: int = Field(description="how many times another ai_consumer took it over")
    created_at: str | None = None
    finished_at: str | None = None
    chunks: int = 0


class SessionDeleted(BaseModel):
    """Answer of `DELETE /api/sessions/{session_id}`."""

    session_id: str
    cancelled: list[str] = Field(description="ids of the messages it stopped first")
    removed: list[str] = Field(description="ids of the messages whose state and stream it removed")


class CancelResult(BaseModel):
    status: Literal["cancelled", "completed", "not_found"]
    message: str
    message_id: str | None = None
