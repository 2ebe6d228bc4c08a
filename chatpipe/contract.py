"""Contract v1 as files: one JSON Schema (Draft 2020-12) per message type and an AsyncAPI 3.0
document, generated from the pydantic models in `chatpipe.schemas` (design.md §2).

`chatpipe contract` writes them into `docs/contract/`; `chatpipe contract --check` exits 1 and
lists the files that differ from what the models generate (CI and tests/interop/test_contract.py
run the check, so the committed files cannot drift from the code).

Which JSON Schema mode for which message:

- inputs (`chat.request`, `chat.cancel`: written by producers chatpipe does not control, such as
  a Spring `KafkaTemplate`) describe what chatpipe *accepts*: pydantic's validation mode, with
  every field under its snake_case name and its camelCase alias, and dates as RFC 3339 strings
  or Jackson's numeric timestamps;
- outputs (the events on chat.responses, written only by chatpipe) describe what chatpipe
  *writes*: pydantic's serialization mode, snake_case; a field that is always written is
  required, and an optional field is absent rather than null (the events are dumped with
  `exclude_none`).

Output is deterministic: keys sorted, two-space indent, one trailing newline, nothing taken from
the environment or the clock.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from chatpipe import keys
from chatpipe.codec import headers_for
from chatpipe.schemas import (
    ID_PATTERN,
    NOT_NULLABLE,
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
from chatpipe.settings import Settings
from chatpipe.topics import topic_specs

Json = dict[str, Any]
Direction = Literal["input", "output"]

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
CONTRACT_VERSION = f"{SCHEMA_VERSION}.5.0"

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

    @property
    def file(self) -> str:
        return f"{SCHEMA_DIR}/{self.name}{SCHEMA_SUFFIX}"

    @property
    def schema_id(self) -> str:
        return f"urn:chatpipe:contract:v{SCHEMA_VERSION}:{self.name}"


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
        "`seq` increases by one per event of a message; `delta` is appended to the answer.",
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

BY_NAME = {m.name: m for m in MESSAGES}


# --- JSON Schema ----------------------------------------------------------------------------


class _Generator(GenerateJsonSchema):
    """pydantic's generator with the dates of contract v1: RFC 3339 out; RFC 3339 or a number in."""

    def datetime_schema(self, schema: core_schema.DatetimeSchema) -> JsonSchemaValue:
        text = super().datetime_schema(schema)
        if self.mode == "serialization":
            return {**text, "description": "RFC 3339 in UTC with microseconds"}
        return {
            "anyOf": [
                {
                    **text,
                    "description": "RFC 3339 (any fraction of a second; a string without an "
                    "offset is read as UTC)",
                },
                {
                    "type": "number",
                    "description": "Unix time in seconds (Jackson 2's default for Instant: "
                    "seconds.nanoseconds), or in milliseconds when above 2e10",
                },
            ]
        }


def _objects(schema: Json) -> Iterator[Json]:
    """The root object schema and every object schema in `$defs`, in a stable order."""
    yield schema
    for name in sorted(schema.get("$defs", {})):
        yield schema["$defs"][name]


def _drop_property_titles(schema: Json) -> None:
    # pydantic's per-field titles ("Message Id", "Messageid") add nothing to the names
    for obj in _objects(schema):
        for prop in obj.get("properties", {}).values():
            prop.pop("title", None)


def _merge_aliases(snake: Json, camel: Json) -> Json:
    """Properties under both spellings; a required field may come under either one."""
    for obj, alias_obj in zip(_objects(snake), _objects(camel), strict=True):
        names = list(obj.get("properties", {}))
        aliases = list(alias_obj.get("properties", {}))
        props: Json = {}
        alias_of: dict[str, str] = {}
        for name, alias in zip(names, aliases, strict=True):
            props[name] = obj["properties"][name]
            if alias != name:
                alias_of[name] = alias
                props[alias] = {
                    **alias_obj["properties"][alias],
                    "description": f"camelCase spelling of `{name}` (as a Java producer writes it)",
                }
        obj["properties"] = props
        required = obj.pop("required", [])
        plain = [n for n in required if n not in alias_of]
        either = [
            {"anyOf": [{"required": [n]}, {"required": [alias_of[n]]}]}
            for n in required
            if n in alias_of
        ]
        if plain:
            obj["required"] = plain
        if either:
            obj["allOf"] = either
    return snake


def _null_as_absent(schema: Json) -> Json:
    """Input: an optional property may also be null, read as absent (Jackson writes null for an
    unset property)."""
    null = {"type": "null", "description": "read as absent"}
    notes = ("title", "description", "default")
    for obj in _objects(schema):
        required = set(obj.get("required", []))
        props = obj.get("properties", {})
        for name, prop in props.items():
            if (
                name in required
                or name in NOT_NULLABLE
                or {"type": "null"} in prop.get("anyOf", [])
            ):
                continue
            if "anyOf" in prop:
                props[name] = {**prop, "anyOf": [*prop["anyOf"], null]}
            else:
                kept = {k: v for k, v in prop.items() if k in notes}
                rule = {k: v for k, v in prop.items() if k not in notes}
                props[name] = {"anyOf": [rule, null], **kept}
    return schema


def _without_null(prop: Json) -> Json:
    options = [o for o in prop.get("anyOf", []) if o != {"type": "null"}]
    if "anyOf" not in prop or len(options) != 1:
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**options[0], **rest}


def _as_written(schema: Json) -> Json:
    """Serialization schema -> what chatpipe writes: defaulted fields are always there (required),
    None-defaulted ones are absent instead of null."""
    for obj in _objects(schema):
        props = obj.get("properties", {})
        required = set(obj.get("required", []))
        for name in list(props):
            prop = props[name]
            if "default" in prop and prop["default"] is None:
                prop = _without_null(prop)
                prop.pop("default")
            elif "default" in prop:
                prop.pop("default")
                required.add(name)
            props[name] = prop
        obj["required"] = [n for n in props if n in required]
    return schema


def json_schema(message: Message) -> Json:
    """The JSON Schema (Draft 2020-12) of one message type."""
    model = message.model
    if message.direction == "input":
        snake = _null_as_absent(
            model.model_json_schema(by_alias=False, mode="validation", schema_generator=_Generator)
        )
        camel = _null_as_absent(
            model.model_json_schema(by_alias=True, mode="validation", schema_generator=_Generator)
        )
        body = _merge_aliases(snake, camel)
        note = "What chatpipe accepts"
    else:
        body = _as_written(
            model.model_json_schema(
                by_alias=False, mode="serialization", schema_generator=_Generator
            )
        )
        note = "What chatpipe writes"
    _drop_property_titles(body)
    body.pop("title", None)
    body.pop("description", None)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": message.schema_id,
        "title": message.name,
        "description": f"{message.summary} {message.description} "
        f"{note} (contract v{SCHEMA_VERSION}, generated from chatpipe.schemas."
        f"{model.__name__}: do not edit).",
        **body,
        "examples": [example for _, example in examples(message)],
    }


# --- examples (fixed values: the output is deterministic) ---------------------------------

EXAMPLE_AT = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
EXAMPLE_IDS = {"message_id": "m-7f3a9c", "session_id": "s-42"}
EXAMPLE_INSTANCE = "ai-1-4242"
EXAMPLE_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _dump(model: ContractModel) -> Json:
    value: Json = json.loads(model.to_json())
    return value


def examples(message: Message) -> list[tuple[str, Json]]:
    """(what it is, payload) examples of one message type; every one of them is valid."""
    ids = EXAMPLE_IDS
    java_ids = {"messageId": ids["message_id"], "sessionId": ids["session_id"]}
    if message.name == "chat.request":
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
    if message.name == "chat.session_cancel":
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
    if message.name == "chat.cancel":
        return [
            ("as the api writes it", _dump(ChatCancel(**ids, requested_at=EXAMPLE_AT))),
            (
                "as Spring's JsonSerializer (Jackson 2 + JavaTimeModule) writes a Java record",
                {**java_ids, "requestedAt": 1735787046.5},
            ),
        ]
    common: Json = {**ids, "instance_id": EXAMPLE_INSTANCE, "at": EXAMPLE_AT}
    usage = Usage(completion_tokens=12, chunks=12)
    if message.name == "chat.started":
        return [
            ("the first event of an answer", _dump(ChatStarted(**common, seq=0))),
            (
                "after a takeover from a dead instance",
                _dump(ChatStarted(**common, seq=5, restart=True)),
            ),
        ]
    if message.name == "chat.chunk":
        return [("a piece of the answer", _dump(ChatChunk(**common, seq=1, delta=" Kafka")))]
    if message.name == "chat.completed":
        return [("the answer is complete", _dump(ChatCompleted(**common, seq=13, usage=usage)))]
    if message.name == "chat.cancelled":
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
    if message.name == "chat.failed":
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
    raise KeyError(message.name)


# --- AsyncAPI 3.0 ---------------------------------------------------------------------------


def _ref(*path: str) -> Json:
    return {"$ref": "#/" + "/".join(path)}


def _headers(message: Message) -> Json:
    props: Json = {
        "content-type": {
            "type": "string",
            "const": "application/json",
            "description": "Written by chatpipe on every record it produces.",
        },
        "event-type": {
            "type": "string",
            "const": message.name,
            "description": "The value's `type`, readable without parsing the value.",
        },
        "traceparent": {
            "type": "string",
            "pattern": TRACEPARENT_PATTERN,
            "description": "W3C trace context, when tracing is on: carried from the HTTP "
            "request into chat.requests and from there onto chat.responses.",
        },
    }
    if message.direction == "input":
        props["__TypeId__"] = {
            "type": "string",
            "description": "Added by Spring's JsonSerializer/JacksonJsonSerializer (the Java "
            "class name). Accepted and ignored: chatpipe reads `type`, or the topic.",
        }
        return {
            "type": "object",
            "description": "All optional on input: chatpipe reads the value only.",
            "properties": props,
        }
    return {
        "type": "object",
        "description": "chatpipe writes no `__TypeId__`: a Spring consumer sets "
        "`spring.json.value.default.type` (or a type function on `event-type`).",
        "properties": props,
        "required": ["content-type", "event-type"],
    }


def _example_headers(message: Message, spring: bool) -> dict[str, str]:
    if spring:
        return {"__TypeId__": f"com.example.chat.{message.model.__name__}"}
    return {k: v.decode() for k, v in headers_for(message.name, EXAMPLE_TRACEPARENT)}


def _message(message: Message) -> Json:
    key: Json = {"type": "string", "pattern": ID_PATTERN, "description": "session_id"}
    if message.name == "chat.session_cancel":
        key = {
            "type": "string",
            "pattern": SESSION_CANCEL_KEY_PATTERN,
            "description": "`{session_id}`, `%` written `%25` and `:` written `%3A`",
        }
    if message.name == "chat.cancel":
        key = {
            "type": "string",
            "pattern": CANCEL_KEY_PATTERN,
            "description": "`{session_id}:{message_id}`, in each id `%` written `%25` and `:` "
            "written `%3A` (an id without either is written as it is)",
        }
    msg_examples = []
    for i, (summary, payload) in enumerate(examples(message)):
        spring = message.direction == "input" and i > 0
        msg_examples.append(
            {
                "name": f"{message.component}{i + 1}",
                "summary": summary,
                "headers": _example_headers(message, spring),
                "payload": payload,
            }
        )
    out: Json = {
        "name": message.name,
        "title": message.name,
        "summary": message.summary,
        "description": message.description,
        "contentType": "application/json",
        "headers": _headers(message),
        "payload": {
            "schemaFormat": PAYLOAD_SCHEMA_FORMAT,
            "schema": {"$ref": f"./{message.file}"},
        },
        "bindings": {"kafka": {"key": key, "bindingVersion": KAFKA_BINDING_VERSION}},
        "examples": msg_examples,
    }
    if "message_id" in message.model.model_fields:  # a session-wide cancel names no message
        out["correlationId"] = _ref("components", "correlationIds", "messageId")
    return out


def _tombstone() -> Json:
    return {
        "name": "chat.cancel tombstone",
        "title": "chat.cancel tombstone",
        "summary": "A null value: the message is final, its cancel can be compacted away.",
        "description": "Written by the ai_consumer that finished the message, with the cancel's "
        "key and no headers. A Spring listener on chat.cancels receives a null payload "
        "(`@Payload(required = false)`).",
        "payload": {"type": "null"},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "pattern": CANCEL_KEY_PATTERN},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _dead_letter() -> Json:
    text = {"type": "string"}
    return {
        "name": "dead letter",
        "title": "chat.requests record that could not be read",
        "summary": "The original key and value bytes, with the reason in headers.",
        "description": "Written by the ai_consumer for a record on chat.requests that is not "
        "UTF-8, not JSON, not an object, too large or invalid (the reason names the fields). "
        "The consumer goes on with the next record.",
        "contentType": "application/octet-stream",
        "headers": {
            "type": "object",
            "properties": {
                "dlq-reason": {**text, "description": "why, e.g. `invalid message_id: ...`"},
                "dlq-kind": {
                    **text,
                    "description": "a short class of the reason (a metrics label)",
                    "examples": [
                        "invalid",
                        "not_json",
                        "not_object",
                        "not_utf8",
                        "null",
                        "too_large",
                    ],
                },
                "dlq-source-topic": text,
                "dlq-source-partition": {**text, "pattern": "^[0-9]+$"},
                "dlq-source-offset": {**text, "pattern": "^[0-9]+$"},
                "dlq-instance": {**text, "description": "instance_id of the ai_consumer"},
            },
            "patternProperties": {
                "^original-": {"description": "each header of the original record, renamed"}
            },
            "required": [
                "dlq-reason",
                "dlq-kind",
                "dlq-source-topic",
                "dlq-source-partition",
                "dlq-source-offset",
            ],
        },
        "payload": {"description": "the original value, unchanged (may be null)"},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": "the original key"},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _topic_binding(name: str) -> Json:
    specs = {s.name: s for s in topic_specs(Settings.model_construct())}
    spec = specs[name]
    config: Json = {}
    for key, value in spec.configs.items():
        config[key] = value.split(",") if key == "cleanup.policy" else _number(value)
    return {
        "topic": name,
        "partitions": spec.partitions,
        "topicConfiguration": config,
        "bindingVersion": KAFKA_BINDING_VERSION,
    }


_CHANNELS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (
        "chatRequests",
        keys.REQUESTS,
        "Chat messages to answer, partitioned by session (per-session order).",
        ("chatRequest",),
    ),
    (
        "chatCancels",
        keys.CANCELS,
        "Cancels, compacted: one live record per message until its tombstone. Read from every "
        "partition by every cancel listener (broadcast, no consumer group), replayed on start.",
        ("chatCancel", "chatSessionCancel", "chatCancelTombstone"),
    ),
    (
        "chatResponses",
        keys.RESPONSES,
        "Every event of every answer, partitioned by session; per message in `seq` order.",
        ("chatStarted", "chatChunk", "chatCompleted", "chatCancelled", "chatFailed"),
    ),
    (
        "chatRequestsDlq",
        keys.DLQ,
        "Records of chat.requests that could not be read.",
        ("deadLetter",),
    ),
)

_OPERATIONS: tuple[tuple[str, Literal["send", "receive"], str, str, Json | None], ...] = (
    (
        "sendChatRequest",
        "send",
        "chatRequests",
        "The api (acks=all, before it answers 202) and other producers (a Spring frontend).",
        None,
    ),
    (
        "receiveChatRequest",
        "receive",
        "chatRequests",
        "The ai_consumer group: many streams at once, per-session order, manual commits.",
        {"groupId": {"type": "string", "description": "CONSUMER_GROUP (default chatpipe-ai)"}},
    ),
    (
        "sendChatCancel",
        "send",
        "chatCancels",
        "The api (and other producers) send cancels; the ai_consumer that finished a "
        "message sends its tombstone.",
        None,
    ),
    (
        "receiveChatCancel",
        "receive",
        "chatCancels",
        "Every cancel listener (inside each ai_consumer and standalone) reads every partition "
        "without a group and mirrors cancels into Redis.",
        None,
    ),
    (
        "sendChatResponse",
        "send",
        "chatResponses",
        "The ai_consumer streaming a message: started, chunks, exactly one terminal event.",
        None,
    ),
    (
        "receiveChatResponse",
        "receive",
        "chatResponses",
        "Readers outside chatpipe (a Spring frontend, analytics). Browsers read the same events "
        "over SSE from the api instead.",
        None,
    ),
    (
        "sendDeadLetter",
        "send",
        "chatRequestsDlq",
        "The ai_consumer, for a record it cannot read.",
        None,
    ),
)


def asyncapi() -> Json:
    """The AsyncAPI 3.0 document of contract v1."""
    messages: Json = {m.component: _message(m) for m in MESSAGES}
    messages["chatCancelTombstone"] = _tombstone()
    messages["deadLetter"] = _dead_letter()
    channels: Json = {}
    for channel_id, topic, description, message_ids in _CHANNELS:
        channels[channel_id] = {
            "address": topic,
            "title": topic,
            "description": description + " Deployments may prefix the name (TOPIC_PREFIX).",
            "messages": {mid: _ref("components", "messages", mid) for mid in message_ids},
            "bindings": {"kafka": _topic_binding(topic)},
        }
    operations: Json = {}
    for op_id, action, channel_id, description, group in _OPERATIONS:
        op: Json = {
            "action": action,
            "channel": _ref("channels", channel_id),
            "description": description,
            "messages": [
                _ref("channels", channel_id, "messages", mid)
                for mid in channels[channel_id]["messages"]
            ],
        }
        if group is not None:
            op["bindings"] = {"kafka": {**group, "bindingVersion": KAFKA_BINDING_VERSION}}
        operations[op_id] = op
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "chatpipe",
            "version": CONTRACT_VERSION,
            "description": "Kafka contract v1 of chatpipe: chat requests and cancels in, "
            "streamed answers out (design.md §2, docs/contract.md). Values are UTF-8 JSON "
            "objects with `schema_version` 1 and `type`; payload schemas are JSON Schema "
            "Draft 2020-12 files beside this document, generated from the pydantic models. "
            "Generated by `chatpipe contract`: do not edit.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "localhost:9092",
                "protocol": "kafka",
                "description": "The local stack (`make stack-up`); KAFKA_BOOTSTRAP_SERVERS.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "correlationIds": {
                "messageId": {
                    "description": "One id per exchange: a request's message_id names its "
                    "cancel and every event of its answer.",
                    "location": "$message.payload#/message_id",
                }
            },
        },
    }


# --- files ----------------------------------------------------------------------------------


def dumps(value: Json) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """Every contract file: path relative to the contract directory -> content."""
    files = {m.file: dumps(json_schema(m)) for m in MESSAGES}
    files[ASYNCAPI_FILE] = dumps(asyncapi())
    return dict(sorted(files.items()))


def default_dir() -> Path:
    """`docs/contract` of the source tree this module is in, else of the working directory."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root / "docs" / "contract"
    return Path.cwd() / "docs" / "contract"


def _stale(directory: Path, files: dict[str, str]) -> list[str]:
    found = sorted((directory / SCHEMA_DIR).glob(f"*{SCHEMA_SUFFIX}"))
    return [f"{SCHEMA_DIR}/{p.name}" for p in found if f"{SCHEMA_DIR}/{p.name}" not in files]


def check(directory: Path) -> list[str]:
    """What differs between `directory` and the models: one line per file, empty when none."""
    files = render()
    problems = []
    for rel, content in files.items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.read_text(encoding="utf-8") != content:
            problems.append(f"{rel}: differs")
    problems += [f"{rel}: not generated by the models (stale)" for rel in _stale(directory, files)]
    return problems


def write(directory: Path) -> list[str]:
    """Write every file (only those that changed); delete stale schema files. Returns a report."""
    files = render()
    report = []
    for rel in _stale(directory, files):
        (directory / rel).unlink()
        report.append(f"removed   {rel}")
    for rel, content in files.items():
        path = directory / rel
        if path.is_file() and path.read_text(encoding="utf-8") == content:
            report.append(f"ok        {rel}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        report.append(f"wrote     {rel}")
    return report


def run(check_only: bool = False, directory: Path | None = None) -> int:
    """`chatpipe contract [--check]`."""
    target = directory or default_dir()
    if check_only:
        problems = check(target)
        if problems:
            print(
                f"contract files in {target} differ from the models "
                "(run `chatpipe contract` and commit the result):",
                file=sys.stderr,
            )
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"contract files in {target} match the models ({len(render())} files)")
        return 0
    for line in write(target):
        print(line)
    return 0
