"""Logging set-up: JSON lines carrying message_id, session_id and instance_id."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from chatpipe.schemas import rfc3339
from chatpipe.settings import Settings

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


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
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
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
        extra = {
            k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        }
        return f"{line} {extra}" if extra else line


def setup_logging(settings: Settings, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = JsonFormatter if settings.log_format == "json" else TextFormatter
    handler.setFormatter(fmt(settings.instance_id, service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
