"""Contract v1 as files: one JSON Schema (Draft 2020-12) per message type and an AsyncAPI 3.0
document, generated from the pydantic models in `chatpipe.schemas` (design.md §2). A package of its
own: documentation code, which no chatpipe process imports (only `chatpipe contract` does).

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

from chatpipe_contract.asyncapi import asyncapi
from chatpipe_contract.files import check, default_dir, dumps, render, run, write
from chatpipe_contract.messages import (
    ASYNCAPI_FILE,
    BY_NAME,
    CANCEL_KEY_PATTERN,
    CONTRACT_VERSION,
    MESSAGES,
    SESSION_CANCEL_KEY_PATTERN,
    TRACEPARENT_PATTERN,
    Message,
    examples,
)
from chatpipe_contract.schema import json_schema

__all__ = [
    "ASYNCAPI_FILE",
    "BY_NAME",
    "CANCEL_KEY_PATTERN",
    "CONTRACT_VERSION",
    "MESSAGES",
    "SESSION_CANCEL_KEY_PATTERN",
    "TRACEPARENT_PATTERN",
    "Message",
    "asyncapi",
    "check",
    "default_dir",
    "dumps",
    "examples",
    "json_schema",
    "render",
    "run",
    "write",
]
