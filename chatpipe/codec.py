"""Bytes <-> contract models for Kafka records, and the headers chatpipe writes.

Everything that can be wrong with a record from another team's producer is turned into
`InvalidRecord(reason)` here, so the consume loop has exactly one error to route to the DLQ.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

import orjson
from pydantic import ValidationError

from chatpipe.errors import InvalidRecord
from chatpipe.schemas import (
    CancelRecord,
    ChatCancel,
    ChatRequest,
    ChatSessionCancel,
    ContractModel,
    rfc3339,
)

Headers = Sequence[tuple[str, bytes]]
M = TypeVar("M", bound=ContractModel)

CONTENT_TYPE = ("content-type", b"application/json")
MAX_RECORD_BYTES = 1024 * 1024


def headers_for(event_type: str, traceparent: str | None = None) -> list[tuple[str, bytes]]:
    out = [CONTENT_TYPE, ("event-type", event_type.encode())]
    if traceparent:
        out.append(("traceparent", traceparent.encode()))
    return out


@functools.lru_cache(maxsize=4096)
def cached_headers(event_type: str, traceparent: str | None = None) -> list[tuple[str, bytes]]:
    """`headers_for`, built once per (event type, traceparent): a message's chunks all share one
    (the traceparent is per message). Shared, so never to be changed: it is only handed to
    `producer.send`, which reads it (a list, as aiokafka's record builder takes no tuple)."""
    return headers_for(event_type, traceparent)


# (whole second since the epoch, its "YYYY-MM-DDTHH:MM:SS" text): one tuple, swapped at once
_second: tuple[int, str] = (-(2**63), "")


def rfc3339_us(epoch_us: int) -> str:
    """`chatpipe.schemas.rfc3339` of the instant `epoch_us` microseconds after the epoch (UTC,
    microseconds, `Z`), formatting the date and time only once per second: this is on every
    chunk."""
    sec, us = divmod(epoch_us, 1_000_000)
    global _second
    cached = _second
    if cached[0] != sec:
        # rfc3339 of the whole second is "....T..:..:...000000Z": keep what precedes ".000000Z"
        cached = _second = (sec, rfc3339(datetime.fromtimestamp(sec, UTC))[:-8])
    return f"{cached[1]}.{us:06d}Z"


def now_rfc3339() -> str:
    """`rfc3339(utcnow())`, cheaper (see `rfc3339_us`)."""
    return rfc3339_us(time.time_ns() // 1000)


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


def parse_cancel(value: bytes | None) -> CancelRecord:
    """A record of chat.cancels: a `chat.session_cancel` (contract 1.4.0), else a
    `chat.cancel` (whose `type` may be omitted), or InvalidRecord."""
    if value is not None and SESSION_CANCEL_TYPE in value:
        try:
            return parse(ChatSessionCancel, value)
        except InvalidRecord:
            pass  # the text is elsewhere in the value (a reason): read it as a cancel
    return parse(ChatCancel, value)


SESSION_CANCEL_TYPE = b'"chat.session_cancel"'


def parse_request_record(
    value: bytes | None, timestamp_ms: int | None, headers: Headers | None = None
) -> ChatRequest:
    """`parse_request` for a record read from Kafka: a request without `created_at` (a
    producer that does not set it) was created when its producer sent it, the record's
    timestamp (so a session cancel sent after it, and not before, stops it)."""
    request = parse_request(value, headers=headers)
    if timestamp_ms is not None and "created_at" not in request.model_fields_set:
        request.created_at = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    return request


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj)
