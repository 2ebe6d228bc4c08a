"""Bytes <-> contract models for Kafka records, and the headers chatpipe writes.

Everything that can be wrong with a record from another team's producer is turned into
`InvalidRecord(reason)` here, so the consume loop has exactly one error to route to the DLQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import orjson
from pydantic import ValidationError

from chatpipe.errors import InvalidRecord
from chatpipe.schemas import ChatCancel, ChatRequest, ContractModel

Headers = Sequence[tuple[str, bytes]]
M = TypeVar("M", bound=ContractModel)

CONTENT_TYPE = ("content-type", b"application/json")
MAX_RECORD_BYTES = 1024 * 1024


def headers_for(event_type: str, traceparent: str | None = None) -> list[tuple[str, bytes]]:
    out = [CONTENT_TYPE, ("event-type", event_type.encode())]
    if traceparent:
        out.append(("traceparent", traceparent.encode()))
    return out


def header(headers: Headers | None, name: str) -> str | None:
    """A header's value as text, or None when absent or not UTF-8 (never raises)."""
    for key, value in headers or ():
        if key.lower() == name and value is not None:
            try:
                return value.decode()
            except (UnicodeDecodeError, AttributeError):
                return None
    return None


def _validation_reason(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "value"
        parts.append(f"{loc}: {e['msg']}")
    return "invalid " + "; ".join(parts)


def parse(model: type[M], value: bytes | None, max_bytes: int = MAX_RECORD_BYTES) -> M:
    if value is None:
        raise InvalidRecord("null value", "null")
    if len(value) > max_bytes:
        raise InvalidRecord(f"value too large: {len(value)} bytes > {max_bytes}", "too_large")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRecord(
            f"value is not UTF-8: {e.reason} at byte {e.start}", "not_utf8"
        ) from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidRecord(f"value is not JSON: {e}", "not_json") from None
    if not isinstance(data, dict):
        raise InvalidRecord(f"value is not a JSON object: {type(data).__name__}", "not_object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidRecord(_validation_reason(e)) from None
    except (ValueError, TypeError, RecursionError) as e:  # pragma: no cover - pydantic wraps these
        raise InvalidRecord(f"invalid: {e}") from None


def check_headers(headers: Headers | None) -> None:
    """Every header value must be UTF-8 text (all of the contract's headers are text): a record
    whose headers are not is another producer's bug, and goes to the DLQ like a bad value."""
    for key, value in headers or ():
        if value is None:
            continue
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRecord(
                f"header {key!r} is not UTF-8: {e.reason} at byte {e.start}", "bad_header"
            ) from None


def parse_request(
    value: bytes | None, max_bytes: int = MAX_RECORD_BYTES, headers: Headers | None = None
) -> ChatRequest:
    """A `chat.request` record (value and headers) -> the model, or InvalidRecord."""
    check_headers(headers)
    return parse(ChatRequest, value, max_bytes)


def parse_cancel(value: bytes | None) -> ChatCancel:
    return parse(ChatCancel, value)


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj)
