"""codec: what a record from our own api, a Spring/Jackson producer or a broken producer becomes.

Every bad record must become `InvalidRecord` (the one error the consume loop routes to the DLQ)
with a reason an operator can act on and a short `kind` for the metrics label."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import orjson
import pytest

from chatpipe.codec import (
    MAX_RECORD_BYTES,
    header,
    headers_for,
    parse_cancel,
    parse_request,
    parse_request_record,
)
from chatpipe.errors import InvalidRecord
from chatpipe.schemas import ChatCancel, ChatSessionCancel

SNAKE = {
    "schema_version": 1,
    "type": "chat.request",
    "message_id": "m-1",
    "session_id": "s-1",
    "user_id": "u-1",
    "message": "hello there",
    "created_at": "2024-05-01T10:00:00.250Z",
    "options": {"max_tokens": 7, "model": "tiny"},
}


def encode(value: object) -> bytes:
    return orjson.dumps(value)


def test_snake_case_request_parses_every_field() -> None:
    req = parse_request(encode(SNAKE))
    assert (req.message_id, req.session_id, req.user_id) == ("m-1", "s-1", "u-1")
    assert req.message == "hello there"
    assert req.created_at == datetime(2024, 5, 1, 10, 0, 0, 250_000, tzinfo=UTC)
    assert req.options is not None
    assert (req.options.max_tokens, req.options.model) == (7, "tiny")


def test_camel_case_from_spring_with_unknown_fields_and_type_id_is_accepted() -> None:
    spring = {
        "messageId": "m-2",
        "sessionId": "s-2",
        "userId": "u-2",
        "message": "hi from java",
        "createdAt": "2024-05-01T10:00:00+02:00",
        "options": {"maxTokens": 3},
        # what other producers add: must be ignored, not rejected
        "__TypeId__": "com.example.chat.ChatRequest",
        "@class": "com.example.chat.ChatRequest",
        "tenant": {"id": 9},
        "priority": 5,
    }
    req = parse_request(encode(spring))
    assert (req.message_id, req.session_id, req.user_id) == ("m-2", "s-2", "u-2")
    assert req.created_at == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    assert req.options is not None
    assert req.options.max_tokens == 3


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        # Jackson 2 default for Instant / OffsetDateTime: seconds with a nanosecond fraction
        (1_714_557_600.123456789, datetime(2024, 5, 1, 10, 0, 0, 123457, tzinfo=UTC)),
        # Jackson with WRITE_DATE_TIMESTAMPS_AS_NANOSECONDS off, java.util.Date: epoch millis
        (1_714_557_600_123, datetime(2024, 5, 1, 10, 0, 0, 123_000, tzinfo=UTC)),
        # LocalDateTime written as text has no offset: read as UTC
        ("2024-05-01T10:00:00", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
    ],
)
def test_jackson_timestamps_are_read_as_utc(created_at: object, expected: datetime) -> None:
    value = {"messageId": "m", "sessionId": "s", "message": "x", "createdAt": created_at}
    req = parse_request(encode(value))
    assert req.created_at == expected
    assert req.created_at.utcoffset() is not None


def test_numeric_ids_from_a_java_long_are_read_as_text() -> None:
    req = parse_request(encode({"messageId": 42, "sessionId": 1234567890123, "message": "x"}))
    assert (req.message_id, req.session_id) == ("42", "1234567890123")


def test_created_at_defaults_to_now_when_absent() -> None:
    before = datetime.now(UTC)
    req = parse_request(encode({"message_id": "m", "session_id": "s", "message": "x"}))
    assert before <= req.created_at <= datetime.now(UTC)


def test_cancel_parses_camel_case_and_ignores_extras() -> None:
    cancel = parse_cancel(
        encode({"sessionId": "s-1", "messageId": "m-1", "reason": "stop", "__TypeId__": "X"})
    )
    assert (cancel.session_id, cancel.message_id, cancel.reason) == ("s-1", "m-1", "stop")


def _bad(value: bytes | None, max_bytes: int = MAX_RECORD_BYTES) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        parse_request(value, max_bytes)
    err = info.value
    assert err.reason
    assert str(err) == err.reason
    return err


def test_null_value_is_invalid() -> None:
    err = _bad(None)
    assert err.kind == "null"
    assert "null" in err.reason


def test_non_utf8_value_is_invalid_and_says_where() -> None:
    value = b'{"message": "caf\xe9"}'
    err = _bad(value)
    assert err.kind == "not_utf8"
    assert "UTF-8" in err.reason
    bad_at = value.index(b"\xe9")
    assert f"at byte {bad_at}" in err.reason


@pytest.mark.parametrize("value", [b"", b"not json", b'{"message_id": "m",', b"{'a': 1}"])
def test_value_that_is_not_json_is_invalid(value: bytes) -> None:
    err = _bad(value)
    assert err.kind == "not_json"
    assert "not JSON" in err.reason


@pytest.mark.parametrize(
    ("value", "name"), [(b"[1, 2]", "list"), (b'"text"', "str"), (b"null", "NoneType")]
)
def test_json_that_is_not_an_object_is_invalid(value: bytes, name: str) -> None:
    err = _bad(value)
    assert err.kind == "not_object"
    assert name in err.reason


@pytest.mark.parametrize(
    ("missing", "pattern"),
    [
        ("message_id", r"message_?[iI]d"),
        ("session_id", r"session_?[iI]d"),
        ("message", r"\bmessage\b"),
    ],
)
def test_missing_required_field_is_named(missing: str, pattern: str) -> None:
    value = {k: v for k, v in SNAKE.items() if k != missing}
    err = _bad(encode(value))
    assert err.kind == "invalid"
    assert re.search(pattern, err.reason), err.reason
    assert "required" in err.reason


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("message_id", "has space"),
        ("message_id", "x" * 129),
        ("message_id", ""),
        ("session_id", "a/b"),
        ("session_id", "ümlaut"),
    ],
)
def test_id_outside_the_pattern_is_invalid_and_named(field: str, bad: str) -> None:
    err = _bad(encode({**SNAKE, field: bad}))
    assert err.kind == "invalid"
    assert field in err.reason
    assert "pattern" in err.reason or "at least 1" in err.reason


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("message", ""),
        ("schema_version", 2),
        ("type", "chat.cancel"),
        ("created_at", "yesterday"),
        ("options", {"max_tokens": 0}),
    ],
)
def test_other_invalid_fields_are_named(field: str, bad: object) -> None:
    err = _bad(encode({**SNAKE, field: bad}))
    assert err.kind == "invalid"
    assert field in err.reason


def test_oversize_value_is_rejected_before_parsing() -> None:
    value = encode({**SNAKE, "message": "x" * 2000})
    err = _bad(value, max_bytes=1024)
    assert err.kind == "too_large"
    assert f"{len(value)} bytes" in err.reason
    assert "1024" in err.reason
    assert parse_request(value, max_bytes=len(value)).message == "x" * 2000


def test_default_limit_rejects_a_record_over_one_mib() -> None:
    big = b" " * MAX_RECORD_BYTES + encode(SNAKE)
    assert _bad(big).kind == "too_large"


def test_header_returns_text_of_the_named_header() -> None:
    headers = [("event-type", b"chat.chunk"), ("Traceparent", b"00-abc-def-01")]
    assert header(headers, "event-type") == "chat.chunk"
    assert header(headers, "traceparent") == "00-abc-def-01"  # header names are case-blind
    assert header(headers, "missing") is None
    assert header(None, "event-type") is None


def test_header_with_non_utf8_bytes_is_none_not_an_exception() -> None:
    headers = [("traceparent", b"\xff\xfe\x00bad"), ("event-type", b"\xc3\x28")]
    assert header(headers, "traceparent") is None
    assert header(headers, "event-type") is None


def test_header_with_null_value_is_skipped() -> None:
    assert header([("traceparent", None)], "traceparent") is None  # type: ignore[list-item]


def test_headers_for_writes_the_contract_headers() -> None:
    assert headers_for("chat.chunk") == [
        ("content-type", b"application/json"),
        ("event-type", b"chat.chunk"),
    ]
    assert ("traceparent", b"00-1-2-01") in headers_for("chat.chunk", "00-1-2-01")


def test_a_cancels_record_is_a_session_cancel_only_by_its_type() -> None:
    session = parse_cancel(b'{"type": "chat.session_cancel", "sessionId": "s-1"}')
    assert isinstance(session, ChatSessionCancel)
    assert session.session_id == "s-1"
    assert "requested_at" not in session.model_fields_set  # the listener uses the timestamp
    # the same text in a reason does not make a message's cancel a session's
    cancel = parse_cancel(
        b'{"session_id": "s-1", "message_id": "m-1", "reason": "\\"chat.session_cancel\\""}'
    )
    assert isinstance(cancel, ChatCancel)
    with pytest.raises(InvalidRecord):
        parse_cancel(b'{"type": "chat.session_cancel"}')


def test_a_request_without_created_at_was_created_when_its_record_was_sent() -> None:
    at_ms = 1_735_787_045_678
    bare = parse_request_record(b'{"message_id": "m", "session_id": "s", "message": "hi"}', at_ms)
    assert bare.created_at == datetime.fromtimestamp(at_ms / 1000, UTC)
    given = b'{"message_id": "m", "session_id": "s", "message": "hi", "createdAt": 1.5}'
    assert parse_request_record(given, at_ms).created_at == datetime.fromtimestamp(1.5, UTC)
