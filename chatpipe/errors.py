"""One root error type for everything chatpipe raises on purpose, and two intents under it.

- `Retry`: transient (Kafka or Redis away, a bound passed). The work is tried again and the
  message goes on: the worker retries the message with backoff, the api answers 503 with
  `Retry-After`.
- `Reject`: final for this message. It ends `failed` with `reason`, shown to the user in its
  `done` event (the upstream model failed, the request is not allowed), and is not retried.

Other `ChatpipeError`s are about the caller's input or configuration and are mapped where they
are met (the api's 4xx answers, the DLQ's `InvalidRecord`, a refused start-up).
"""

from __future__ import annotations


class ChatpipeError(Exception):
    """Root of chatpipe's own errors."""


class InvalidRecord(ChatpipeError):
    """A Kafka record that cannot be parsed or validated; it goes to the DLQ with `reason`."""

    def __init__(self, reason: str, kind: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # a short class of the reason, a metrics label


class Retry(ChatpipeError):
    """Transient: try again later; the message goes on."""


class Reject(ChatpipeError):
    """Final for this message: it ends `failed` with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unavailable(Retry):
    """Kafka or Redis did not answer within the bound; the api maps it to 503."""


class TopicDrift(ChatpipeError):
    """An existing topic's partitions or configs differ from what the design asks for."""


class DurabilityUnreachable(ChatpipeError):
    """TOPIC_REPLICATION_FACTOR / TOPIC_MIN_INSYNC_REPLICAS cannot hold on this cluster: lower
    them, or add brokers."""
