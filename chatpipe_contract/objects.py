"""Typed AsyncAPI 3.0 objects (as FastStream models its AsyncAPI): the document is built from
these, so a misspelt or misplaced field is a type error, not a silently wrong document. The
JSON Schemas inside them (headers, payloads, bindings) stay plain JSON: they are schemas.

`dump()` gives the document's JSON: field names as AsyncAPI spells them (`$ref`,
`contentType`, `defaultContentType`...), absent fields left out."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Json = dict[str, Any]


class Obj(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    def dump(self) -> Json:
        value: Json = self.model_dump(by_alias=True, exclude_none=True)
        return value


class Ref(Obj):
    ref: str = Field(alias="$ref")

    @classmethod
    def to(cls, *path: str) -> Ref:
        return cls(ref="#/" + "/".join(path))


class License(Obj):
    name: str


class Info(Obj):
    title: str
    version: str
    description: str
    license: License


class Server(Obj):
    host: str
    protocol: str
    description: str


class MessageExample(Obj):
    name: str
    summary: str
    headers: dict[str, str] | None = None
    payload: Any = None


class Payload(Obj):
    schema_format: str = Field(alias="schemaFormat")
    schema_: Json = Field(alias="schema")


class Message(Obj):
    name: str
    title: str
    summary: str
    description: str
    content_type: str | None = Field(default=None, alias="contentType")
    headers: Json | None = None
    payload: Payload | Json
    correlation_id: Ref | None = Field(default=None, alias="correlationId")
    bindings: Json | None = None
    examples: list[MessageExample] | None = None


class Channel(Obj):
    address: str
    title: str
    description: str
    messages: dict[str, Ref]
    bindings: Json


class Operation(Obj):
    action: Literal["send", "receive"]
    channel: Ref
    description: str
    messages: list[Ref]
    bindings: Json | None = None


class CorrelationId(Obj):
    description: str
    location: str


class Components(Obj):
    messages: dict[str, Message]
    correlation_ids: dict[str, CorrelationId] = Field(alias="correlationIds")


class Document(Obj):
    asyncapi: str
    info: Info
    default_content_type: str = Field(alias="defaultContentType")
    servers: dict[str, Server]
    channels: dict[str, Channel]
    operations: dict[str, Operation]
    components: Components
