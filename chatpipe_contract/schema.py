"""One JSON Schema (Draft 2020-12) per message type, from its pydantic model."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from chatpipe.schemas import (
    NOT_NULLABLE,
    SCHEMA_VERSION,
)
from chatpipe_contract.messages import JSON_SCHEMA_DIALECT, Json, Message, examples

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
