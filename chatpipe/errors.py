"""One root error type for everything chatpipe raises on purpose."""

from __future__ import annotations


class ChatpipeError(Exception):
    """Root of chatpipe's own errors."""


class InvalidRecord(ChatpipeError):
    """A Kafka record that cannot be parsed or validated; it goes to the DLQ with `reason`."""

    def __init__(self, reason: str, kind: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # a short class of the reason, a metrics label


class Unavailable(ChatpipeError):
    """Kafka or Redis did not answer within the bound; the api maps it to 503."""


class TopicDrift(ChatpipeError):
    """An existing topic's partitions or configs differ from what the design asks for."""
