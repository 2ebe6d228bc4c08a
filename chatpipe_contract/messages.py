"""The message types of the contract, with the examples attached to each (fixed values:
the output is deterministic)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from chatpipe import keys
from chatpipe.schemas import (
    SCHEMA_VERSION,
    ChatCancel,
    ChatCancelled,
    ChatChunk,
    ChatCompleted,
    ChatFailed,
    ChatOptions,
    ChatRequest,
    ChatSessionCancel,
    ChatStarted,
    ContractModel,
    Usage,
)

Json = dict[str, Any]
Direction = Literal["input", "output"]
Example = tuple[str, Json]  # (what it is, payload)

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
PAYLOAD_SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
# 1.1.0: null is read as absent on input (chatpipe.schemas.InputModel); records unchanged
# 1.2.0: each id in a cancel's key (and its Redis flag) has `%` and `:` escaped (chatpipe.keys)
# 1.3.0: `chat.request` may carry `messages` (the whole conversation, sent upstream as given);
#        `message` is then optional (the last user entry); records chatpipe writes unchanged
# 1.4.0: `chat.session_cancel` on chat.cancels (stop a whole session), `if_busy` on a request
# 1.5.0: `usage.prompt_tokens` on the terminal events; `completion_tokens` is the model's count
# 1.6.0: Redis key layout 2 (every key of a session carries its bucket's hash tag, for Redis
#        Cluster; chatpipe.keys); Kafka topics, keys and records unchanged
# 1.7.0: `count` on `chat.chunk` (a record carrying several chunks: RESPONSES_CHUNK_WINDOW_MS,
#        off by default); records unchanged while the window is 0
# 1.8.0: `count` on `chat.chunk` also from COALESCE_MS (a stream's tokens within it are one
#        chunk, on SSE too), off by default; records unchanged while it is 0
CONTRACT_VERSION = f"{SCHEMA_VERSION}.8.0"

ASYNCAPI_FILE = "asyncapi.json"
SCHEMA_DIR = "schemas"
SCHEMA_SUFFIX = ".schema.json"

TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
# a cancel's key is `{session_id}:{message_id}`, each id with `%` and `:` escaped (`%25`, `%3A`)
_KEY_PART = r"(?:[A-Za-z0-9_.@-]|%3A|%25){1,384}"
CANCEL_KEY_PATTERN = rf"^{_KEY_PART}:{_KEY_PART}$"
SESSION_CANCEL_KEY_PATTERN = rf"^{_KEY_PART}$"


@dataclass(frozen=True)
class Message:
    """One message type of contract v1."""

    name: str  # the `type` field and the `event-type` header
    model: type[ContractModel]
    direction: Direction
    topic: str  # base topic name (deployments may prefix it: TOPIC_PREFIX)
    component: str  # AsyncAPI component id
    summary: str
    description: str
    examples: tuple[Example, ...] = ()  # attached below, from _examples_of

    @property
    def file(self) -> str:
        return f"{SCHEMA_DIR}/{self.name}{SCHEMA_SUFFIX}"

    @property
    def schema_id(self) -> str:
        return f"urn:chatpipe:contract:v{SCHEMA_VERSION}:{self.name}"


EXAMPLE_AT = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
EXAMPLE_IDS = {"message_id": "m-7f3a9c", "session_id": "s-42"}
EXAMPLE_INSTANCE = "ai-1-4242"
EXAMPLE_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _dump(model: ContractModel) -> Json:
    value: Json = json.loads(model.to_json())
    return value


def _examples_of(name: str) -> list[Example]:
    """(what it is, payload) examples of one message type; every one of them is valid."""
    ids = EXAMPLE_IDS
    java_ids = {"messageId": ids["message_id"], "sessionId": ids["session_id"]}
    if name == "chat.request":
        return [
            (
                "as the api writes it",
                _dump(
                    ChatRequest(
                        **ids,
                        user_id="u-7",
                        message="What is Kafka?",
                        created_at=EXAMPLE_AT,
                        options=ChatOptions(max_tokens=256),
                    )
                ),
            ),
            (
                "as Spring's JsonSerializer (Jackson 2 + JavaTimeModule) writes a Java record",
                {
                    **java_ids,
                    "userId": "u-7",
                    "message": "What is Kafka?",
                    "createdAt": 1735787045.678901,
                },
            ),
            (
                "as Spring Kafka 4's JacksonJsonSerializer (Jackson 3) writes it",
                {
                    **java_ids,
                    "userId": None,
                    "message": "What is Kafka?",
                    "createdAt": "2025-01-02T03:04:05.678901000Z",
                },
            ),
        ]
    if name == "chat.session_cancel":
        session = {"session_id": ids["session_id"]}
        return [
            (
                "as the api writes it",
                _dump(ChatSessionCancel(**session, requested_at=EXAMPLE_AT)),
            ),
            (
                "as a Spring frontend's \"stop all\" (no requestedAt: the record's timestamp)",
                {"type": "chat.session_cancel", "sessionId": java_ids["sessionId"]},
            ),
        ]
    if name == "chat.cancel":
        return [
            ("as the api writes it", _dump(ChatCancel(**ids, requested_at=EXAMPLE_AT))),
            (
                "as Spring's JsonSerializer (Jackson 2 + JavaTimeModule) writes a Java record",
                {**java_ids, "requestedAt": 1735787046.5},
            ),
        ]
    common: Json = {**ids, "instance_id": EXAMPLE_INSTANCE, "at": EXAMPLE_AT}
    usage = Usage(completion_tokens=12, chunks=12)
    if name == "chat.started":
        return [
            ("the first event of an answer", _dump(ChatStarted(**common, seq=0))),
            (
                "after a takeover from a dead instance",
                _dump(ChatStarted(**common, seq=5, restart=True)),
            ),
        ]
    if name == "chat.chunk":
        return [("a piece of the answer", _dump(ChatChunk(**common, seq=1, delta=" Kafka")))]
    if name == "chat.completed":
        return [("the answer is complete", _dump(ChatCompleted(**common, seq=13, usage=usage)))]
    if name == "chat.cancelled":
        return [
            (
                "stopped by a cancel",
                _dump(
                    ChatCancelled(
                        **common,
                        seq=4,
                        reason="cancelled by user",
                        usage=Usage(completion_tokens=3, chunks=3),
                    )
                ),
            )
        ]
    if name == "chat.failed":
        return [
            (
                "the model server failed",
                _dump(
                    ChatFailed(
                        **common,
                        seq=2,
                        reason="upstream: connection refused",
                        usage=Usage(completion_tokens=1, chunks=1),
                    )
                ),
            )
        ]
    raise KeyError(name)


_TERMINAL = (
    " One of the three terminal events: every accepted message ends with exactly one of them."
)

MESSAGES: tuple[Message, ...] = (
    Message(
        "chat.request",
        ChatRequest,
        "input",
        keys.REQUESTS,
        "chatRequest",
        "A user's chat message to answer.",
        "Written by the api (`POST /api/chat`) and by other producers such as a Spring "
        "frontend; key `session_id`. `message_id` is chosen by the producer and names the "
        "answer too: it streams it, cancels it and appears in every response event. Fields are "
        "accepted in snake_case or camelCase; unknown fields are ignored; `schema_version` and "
        "`type` may be omitted (read as 1 and `chat.request`).",
    ),
    Message(
        "chat.cancel",
        ChatCancel,
        "input",
        keys.CANCELS,
        "chatCancel",
        "Stop the answer to one message.",
        "Written by the api (`POST /api/cancel`) and by other producers; key "
        "`{session_id}:{message_id}` (in each id `%` written `%25` and `:` written `%3A`) on the "
        "compacted topic, tombstoned (null value, same key) "
        "once the message is final. Every cancel listener reads every partition. A cancel that "
        "arrives before the request is consumed means the answer never starts.",
    ),
    Message(
        "chat.session_cancel",
        ChatSessionCancel,
        "input",
        keys.CANCELS,
        "chatSessionCancel",
        "Stop every message of a session (since 1.4.0).",
        "Written by the api (`POST /api/sessions/{id}/cancel`, `DELETE /api/sessions/{id}`, "
        '`if_busy: interrupt`) and by other producers (a Spring frontend\'s "stop all"); key '
        "`{session_id}` (`%` written `%25` and `:` written `%3A`), so it never shares a key "
        "with a message's cancel. Every message of the session created before `requested_at` "
        "(absent: the record's timestamp) is cancelled: the streaming ones stop, the queued "
        "ones never start, also those still only in Kafka. Later messages run as usual. "
        "chatpipe tombstones it once CANCEL_QUEUED_TTL_S has passed.",
    ),
    Message(
        "chat.started",
        ChatStarted,
        "output",
        keys.RESPONSES,
        "chatStarted",
        "The answer to a message has started (`seq` 0, or later after a takeover).",
        "`restart: true` when an instance took over a stream whose owner died; the events "
        "that follow replace the answer so far. A message cancelled before it started ends "
        "with `chat.cancelled` and has no `chat.started`.",
    ),
    Message(
        "chat.chunk",
        ChatChunk,
        "output",
        keys.RESPONSES,
        "chatChunk",
        "The next piece of the answer.",
        "`seq` increases by one per chunk of a message (by `count` after a record that carries several, since 1.7.0); `delta` is appended to the answer.",
    ),
    Message(
        "chat.completed",
        ChatCompleted,
        "output",
        keys.RESPONSES,
        "chatCompleted",
        "The answer is complete.",
        "`usage` counts what was streamed." + _TERMINAL,
    ),
    Message(
        "chat.cancelled",
        ChatCancelled,
        "output",
        keys.RESPONSES,
        "chatCancelled",
        "The answer was stopped by a cancel.",
        "Also the only event of a message cancelled before it started." + _TERMINAL,
    ),
    Message(
        "chat.failed",
        ChatFailed,
        "output",
        keys.RESPONSES,
        "chatFailed",
        "The answer failed.",
        "`reason` says why (the model server failed or timed out, a dependency was down)."
        + _TERMINAL,
    ),
)

MESSAGES = tuple(replace(m, examples=tuple(_examples_of(m.name))) for m in MESSAGES)
BY_NAME = {m.name: m for m in MESSAGES}


def examples(message: Message) -> list[Example]:
    """The examples attached to a message type."""
    return list(message.examples)


# --- examples (fixed values: the output is deterministic) ---------------------------------
