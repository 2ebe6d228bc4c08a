"""The AsyncAPI 3.0 document of the topics, the messages and the operations."""

from __future__ import annotations

from typing import Literal

from chatpipe import keys
from chatpipe.codec import headers_for
from chatpipe.schemas import (
    ID_PATTERN,
)
from chatpipe.settings import Settings
from chatpipe.topics import topic_specs
from chatpipe_contract.messages import (
    ASYNCAPI_VERSION,
    CANCEL_KEY_PATTERN,
    CONTRACT_VERSION,
    EXAMPLE_TRACEPARENT,
    KAFKA_BINDING_VERSION,
    MESSAGES,
    PAYLOAD_SCHEMA_FORMAT,
    SESSION_CANCEL_KEY_PATTERN,
    TRACEPARENT_PATTERN,
    Json,
    Message,
    examples,
)
from chatpipe_contract.objects import (
    Channel,
    Components,
    CorrelationId,
    Document,
    Info,
    License,
    MessageExample,
    Operation,
    Payload,
    Ref,
    Server,
)
from chatpipe_contract.objects import Message as AsyncMessage

# --- AsyncAPI 3.0 ---------------------------------------------------------------------------


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


def _message(message: Message) -> AsyncMessage:
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
    msg_examples = [
        MessageExample(
            name=f"{message.component}{i + 1}",
            summary=summary,
            headers=_example_headers(message, message.direction == "input" and i > 0),
            payload=payload,
        )
        for i, (summary, payload) in enumerate(examples(message))
    ]
    names_one = "message_id" in message.model.model_fields  # a session cancel names none
    return AsyncMessage(
        name=message.name,
        title=message.name,
        summary=message.summary,
        description=message.description,
        content_type="application/json",
        headers=_headers(message),
        payload=Payload(schema_format=PAYLOAD_SCHEMA_FORMAT, schema_={"$ref": f"./{message.file}"}),
        correlation_id=Ref.to("components", "correlationIds", "messageId") if names_one else None,
        bindings={"kafka": {"key": key, "bindingVersion": KAFKA_BINDING_VERSION}},
        examples=msg_examples,
    )


def _tombstone() -> AsyncMessage:
    return AsyncMessage(
        name="chat.cancel tombstone",
        title="chat.cancel tombstone",
        summary="A null value: the message is final, its cancel can be compacted away.",
        description="Written by the ai_consumer that finished the message, with the cancel's "
        "key and no headers. A Spring listener on chat.cancels receives a null payload "
        "(`@Payload(required = false)`).",
        payload={"type": "null"},
        bindings={
            "kafka": {
                "key": {"type": "string", "pattern": CANCEL_KEY_PATTERN},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    )


def _dead_letter() -> AsyncMessage:
    text = {"type": "string"}
    return AsyncMessage(
        name="dead letter",
        title="chat.requests record that could not be read",
        summary="The original key and value bytes, with the reason in headers.",
        description="Written by the ai_consumer for a record on chat.requests that is not "
        "UTF-8, not JSON, not an object, too large or invalid (the reason names the fields). "
        "The consumer goes on with the next record.",
        content_type="application/octet-stream",
        headers={
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
        payload={"description": "the original value, unchanged (may be null)"},
        bindings={
            "kafka": {
                "key": {"type": "string", "description": "the original key"},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    )


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
    """The AsyncAPI 3.0 document of contract v1 (typed: chatpipe_contract/objects.py)."""
    messages = {m.component: _message(m) for m in MESSAGES}
    messages["chatCancelTombstone"] = _tombstone()
    messages["deadLetter"] = _dead_letter()
    channels = {
        channel_id: Channel(
            address=topic,
            title=topic,
            description=description + " Deployments may prefix the name (TOPIC_PREFIX).",
            messages={mid: Ref.to("components", "messages", mid) for mid in message_ids},
            bindings={"kafka": _topic_binding(topic)},
        )
        for channel_id, topic, description, message_ids in _CHANNELS
    }
    operations = {
        op_id: Operation(
            action=action,
            channel=Ref.to("channels", channel_id),
            description=description,
            messages=[
                Ref.to("channels", channel_id, "messages", mid)
                for mid in channels[channel_id].messages
            ],
            bindings=None
            if group is None
            else {"kafka": {**group, "bindingVersion": KAFKA_BINDING_VERSION}},
        )
        for op_id, action, channel_id, description, group in _OPERATIONS
    }
    document = Document(
        asyncapi=ASYNCAPI_VERSION,
        info=Info(
            title="chatpipe",
            version=CONTRACT_VERSION,
            description="Kafka contract v1 of chatpipe: chat requests and cancels in, "
            "streamed answers out (design.md §2, docs/contract.md). Values are UTF-8 JSON "
            "objects with `schema_version` 1 and `type`; payload schemas are JSON Schema "
            "Draft 2020-12 files beside this document, generated from the pydantic models. "
            "Generated by `chatpipe contract`: do not edit.",
            license=License(name="Apache-2.0"),
        ),
        default_content_type="application/json",
        servers={
            "local": Server(
                host="localhost:9092",
                protocol="kafka",
                description="The local stack (`make stack-up`); KAFKA_BOOTSTRAP_SERVERS.",
            )
        },
        channels=channels,
        operations=operations,
        components=Components(
            messages=messages,
            correlation_ids={
                "messageId": CorrelationId(
                    description="One id per exchange: a request's message_id names its "
                    "cancel and every event of its answer.",
                    location="$message.payload#/message_id",
                )
            },
        ),
    )
    return document.dump()
