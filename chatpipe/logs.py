"""Logging set-up: JSON lines carrying message_id, session_id and instance_id.

Every line names its process (`service`, `instance_id`). A line about one message carries its
`message_id` and `session_id`: passed as `extra=`, or bound for a whole task with
`log_context(message_id=..., session_id=...)` (the ai_consumer binds them around each
message, so every line logged while handling it has them, down to the sink).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import orjson

from chatpipe.schemas import rfc3339
from chatpipe.settings import Settings

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_CONTEXT: ContextVar[dict[str, str]] = ContextVar("chatpipe_log_context", default={})  # noqa: B039


@contextlib.contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Add `fields` to every log line of the current task (and tasks it starts) until exit."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record's own extras, over the fields bound with `log_context`."""
    out: dict[str, Any] = dict(_CONTEXT.get())
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    return out


class JsonFormatter(logging.Formatter):
    def __init__(self, instance_id: str, service: str) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        from datetime import UTC, datetime

        out: dict[str, Any] = {
            "at": rfc3339(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname.lower(),
            "service": self.service,
            "instance_id": self.instance_id,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, value)  # the process's own service/instance_id win
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, instance_id: str, service: str) -> None:
        super().__init__(
            f"%(asctime)s %(levelname)s {service}[{instance_id}] %(name)s: %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        return f"{line} {extra}" if extra else line


class RepeatFilter(logging.Filter):
    """Lets one line per (logger, format) through every `every_s` seconds and counts the rest,
    reporting the count on the next line let through.

    For aiokafka, which logs an error per reconnect attempt and retries metadata without backoff
    while a broker is down (~7,000 lines a second in tests/e2e/faults/test_kafka_outage.py)."""

    def __init__(self, prefix: str, every_s: float = 5.0, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.prefix = prefix
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        last, dropped = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.every_s:
            self._seen[key] = (last, dropped + 1)
            return False
        if len(self._seen) > 1000:  # bounded: many distinct formats are not a flood
            self._seen.clear()
        self._seen[key] = (now, 0)
        if dropped:
            record.repeated = dropped  # the count since the last line of this kind
        return True


def setup_logging(settings: Settings, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = JsonFormatter if settings.log_format == "json" else TextFormatter
    handler.setFormatter(fmt(settings.instance_id, service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    # on the handler: a logger's own filters do not see its children's records
    handler.addFilter(RepeatFilter("aiokafka"))
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
