"""OpenAI's chat completion request and response shapes, as far as chatpipe speaks them.

The request model accepts what the official SDKs and chat UIs send (unknown parameters are
ignored, as OpenAI-compatible servers do); `unsupported` names the parameters chatpipe cannot
honour, which are refused with a 400 naming them instead of silently doing something else.
docs/openai.md lists both.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Part(BaseModel):
    """One part of a message's content (`[{"type": "text", "text": ...}]`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    """Body of `POST /v1/chat/completions`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=1000)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=100_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=100_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    # refused when set (see `unsupported`)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Any] | None = None
    prediction: Any = None


def unsupported(body: CompletionRequest) -> tuple[str, str] | None:
    """(parameter, why) of the first parameter chatpipe cannot honour, or None."""
    if body.n not in (None, 1):
        return "n", "only n=1 is supported"
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if getattr(body, name) not in (None, [], "none"):
            return name, "tools and function calling are not supported"
    if body.logprobs or body.top_logprobs:
        return "logprobs", "logprobs are not supported"
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        return "response_format", "only the text response format is supported"
    if body.audio is not None or any(m != "text" for m in body.modalities or ()):
        return "modalities", "only text is supported"
    for name in ("stop", "logit_bias", "prediction"):
        if getattr(body, name):
            return name, f"{name} is not supported"
    for i, message in enumerate(body.messages):
        if message.role in ("tool", "function"):
            return f"messages[{i}].role", f"{message.role} messages are not supported"
        if isinstance(message.content, list):
            for part in message.content:
                if part.type != "text":
                    return f"messages[{i}].content", f"{part.type} content is not supported"
    return None


def text_of(content: str | list[Part] | None) -> str:
    """A message's content as one text (its text parts joined)."""
    if isinstance(content, list):
        return "".join(part.text or "" for part in content)
    return content or ""


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class CompletionChunk(BaseModel):
    """One `chat.completion.chunk` of a streamed completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class AnswerMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AnswerMessage
    logprobs: None = None
    finish_reason: str


class Completion(BaseModel):
    """A whole `chat.completion` (`stream: false`)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[Choice]
    usage: CompletionUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "chatpipe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# --- the Responses API (background responses) ---------------------------------------------


class InputItem(BaseModel):
    """One input message (`{"role", "content"}`, also with `"type": "message"`)."""

    model_config = ConfigDict(extra="allow")

    type: str | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


MAX_INPUT = 1000  # messages in a request (chatpipe.schemas.MAX_MESSAGES, the record's bound)


class ResponseRequest(BaseModel):
    """Body of `POST /v1/responses`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT)]
    instructions: str | None = Field(default=None, max_length=100_000)
    background: bool | None = False
    stream: bool | None = False
    previous_response_id: str | None = Field(default=None, max_length=200)
    max_output_tokens: int | None = Field(default=None, ge=1, le=100_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    prompt: Any = None
    conversation: Any = None


def response_unsupported(body: ResponseRequest) -> tuple[str, str] | None:
    """(parameter, why) of the first parameter of a response chatpipe cannot honour."""
    if body.tools or body.tool_choice not in (None, "none", "auto"):
        return "tools", "tools are not supported"
    if body.store is False and body.background:
        return "store", "a background response is stored (store=false is not supported)"
    fmt = (body.text or {}).get("format") or {}
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return "text.format", "only the text format is supported"
    for name in ("prompt", "conversation"):
        if getattr(body, name) is not None:
            return name, f"{name} is not supported (send input, and previous_response_id)"
    if isinstance(body.input, list):
        for i, item in enumerate(body.input):
            if item.type not in (None, "message"):
                return f"input[{i}].type", f"{item.type} items are not supported"
            if isinstance(item.content, list):
                for part in item.content:
                    if part.type not in ("input_text", "output_text", "text"):
                        return f"input[{i}].content", f"{part.type} content is not supported"
    return None
