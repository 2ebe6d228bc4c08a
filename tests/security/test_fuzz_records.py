"""Property-based fuzzing of what another team's producer can put in a Kafka record (issue 7,
must-show 5): arbitrary bytes, arbitrary JSON (nested, huge integers, unicode), near-valid
requests with any field replaced, arbitrary keys and headers (names with any unicode, values
any bytes, not UTF-8, or null).

Properties:
- the consumer's per-record decision (`ai_consumer.worker.decide`) returns either a request
  for a session lane or an InvalidRecord with a reason and a kind: it never raises, so no
  record can stop the consume loop;
- a rejected record's DLQ headers can be produced (text names, bytes values);
- an accepted request serialises back to contract JSON (the handler writes events from it);
- the cancel parser (`chatpipe.codec.parse_cancel`, used by the cancel listener) raises
  nothing but InvalidRecord.

Derandomized with a fixed example budget: the same inputs every run, well under a minute.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ai_consumer.worker import dead_letter_headers, decide
from chatpipe.codec import parse_cancel
from chatpipe.errors import InvalidRecord
from chatpipe.schemas import ChatCancel, ChatRequest

FUZZ = settings(
    derandomize=True,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID_REQUEST: dict[str, Any] = {
    "schema_version": 1,
    "type": "chat.request",
    "message_id": "m-1",
    "session_id": "s-1",
    "user_id": "u-1",
    "message": "hello",
    "created_at": "2024-05-01T10:00:00Z",
    "options": {"max_tokens": 5, "model": "tiny", "temperature": 0.5},
}
VALID_CANCEL: dict[str, Any] = {
    "schema_version": 1,
    "type": "chat.cancel",
    "session_id": "s-1",
    "message_id": "m-1",
    "requested_at": "2024-05-01T10:00:00Z",
}

# JSON scalars, including integers far beyond 64 bits and every kind of unicode text
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
    | st.sampled_from(["", "m-1", "2024-05-01T10:00:00", "1e400", "-0", "\u0000", "\ud7ff"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=25,
)


def dumps(value: Any) -> bytes:
    """JSON with integers of any size (orjson refuses > 64 bits; a foreign producer may not)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def near_valid(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """A valid record with some fields replaced, removed or renamed to camelCase."""
    doc = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(base)), max_size=4, unique=True)):
        action = draw(st.sampled_from(["replace", "remove", "camel"]))
        if action == "replace":
            doc[name] = draw(json_values)
        elif action == "remove":
            doc.pop(name)
        else:
            head, *rest = name.split("_")
            doc[head + "".join(p.title() for p in rest)] = doc.pop(name)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=10))] = draw(json_values)  # an unknown field
    return dumps(doc)


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def values_for(base: dict[str, Any]) -> st.SearchStrategy[bytes | None]:
    return st.one_of(
        st.none(),
        st.binary(max_size=300),  # anything at all, mostly not UTF-8 or not JSON
        json_values.map(dumps),  # any JSON: arrays, strings, numbers, objects
        near_valid(base),
        st.integers(min_value=1, max_value=100_000).map(deep),  # nesting past any recursion limit
        st.just(dumps(base)),
    )


headers = st.lists(
    st.tuples(
        st.text(max_size=20),  # aiokafka hands names over as text
        st.one_of(st.none(), st.binary(max_size=30), st.sampled_from([b"\xff\xfe", b"\xc3("])),
    ),
    max_size=5,
)


def record(value: bytes | None, key: bytes | None, hdrs: list[tuple[str, bytes | None]]) -> Any:
    return ConsumerRecord(
        topic="t.chat.requests",
        partition=3,
        offset=42,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        headers=hdrs,
    )


@FUZZ
@given(value=values_for(VALID_REQUEST), key=st.none() | st.binary(max_size=40), hdrs=headers)
def test_every_request_record_is_either_accepted_or_dead_lettered(
    value: bytes | None, key: bytes | None, hdrs: list[tuple[str, bytes | None]]
) -> None:
    rec = record(value, key, hdrs)
    decision = decide(rec)  # must not raise, whatever the record holds
    if isinstance(decision, InvalidRecord):
        assert decision.reason.strip(), "a DLQ decision without a reason"
        assert decision.kind.strip()
        out = dead_letter_headers(rec, decision, "fuzz-instance")
        for name, data in out:
            name.encode("utf-8")  # the producer encodes header names as UTF-8
            assert isinstance(data, bytes)
        assert ("dlq-source-offset", b"42") in out
    else:
        assert isinstance(decision, ChatRequest)
        assert orjson.loads(decision.to_json())["message_id"] == decision.message_id


@FUZZ
@given(value=values_for(VALID_CANCEL))
def test_every_cancel_record_is_either_a_cancel_or_invalid(value: bytes | None) -> None:
    try:
        cancel: ChatCancel | InvalidRecord = parse_cancel(value)
    except InvalidRecord as e:
        cancel = e
    if isinstance(cancel, InvalidRecord):
        assert cancel.reason.strip()
    else:
        assert isinstance(cancel, ChatCancel)


def test_the_fuzzer_reaches_both_outcomes() -> None:
    """The strategies are not all rejects: a valid record is accepted, camelCase too."""
    assert isinstance(decide(record(dumps(VALID_REQUEST), b"s-1", [])), ChatRequest)
    camel = {**VALID_REQUEST, "sessionId": "s-1", "messageId": "m-1"}
    del camel["session_id"], camel["message_id"]
    assert isinstance(decide(record(dumps(camel), None, [("__TypeId__", b"x")])), ChatRequest)
    bad = decide(record(b"\xff", None, [("h", b"\xff")]))
    assert isinstance(bad, InvalidRecord)
