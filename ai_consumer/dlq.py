"""Dead letters: the chat.requests records chatpipe cannot read go to chat.requests.dlq, and no
record, however large or strange, stops the consumer.

A dead letter is the original key, value and headers plus `dlq-*` headers (reason, kind, source
topic/partition/offset, instance). One that cannot be written whole — its copy is over the DLQ
topic's `max.message.bytes` (the broker says MESSAGE_TOO_LARGE) or over `DLQ_MAX_RECORD_BYTES`
before it is even tried — is written as a *reference*: the same `dlq-*` headers, an empty value,
`dlq-value-omitted: <bytes>`, and as many original headers as fit; the record itself stays in
the source topic at the offset the headers name (until the topic's retention). References are
counted in `chatpipe_dlq_degraded_total{how="reference"}`; one refused even as a reference
(a DLQ topic with a tiny limit) is skipped with an error log, `how="skipped"`.

Writes leave in the background, in order per source partition, so a DLQ that is slow or away
holds up only the commits of the partitions whose dead letters wait (their offsets stay
unfinished: at-least-once), never the consume loop: transient errors are retried with backoff
(`chatpipe_dlq_send_retries_total`). At most `DLQ_MAX_PENDING` dead letters wait at once; the
next one waits for room (bounded memory: a dead letter may hold 10 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from chatpipe.errors import InvalidRecord
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings

log = logging.getLogger(__name__)

TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
# what a record costs beyond its key, value and headers (batch and record framing), with room
RECORD_OVERHEAD = 512
HEADER_OVERHEAD = 10  # per header: its varint lengths
REFERENCE_HEADERS_BUDGET = 64 * 1024  # original headers kept in a reference
REFERENCE_KEY_MAX = 4096  # a longer original key is left out of a reference


def _text(value: str) -> bytes:
    return value.encode("utf-8", "backslashreplace")  # lone surrogates cannot be encoded


@dataclass(slots=True)
class DeadLetter:
    """One record for the DLQ. `value` None: the client could not read the original at all."""

    topic: str
    partition: int
    offset: int
    reason: str
    kind: str
    key: bytes | None = None
    value: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @classmethod
    def of(cls, record: ConsumerRecord[bytes, bytes], error: InvalidRecord) -> DeadLetter:
        return cls(
            record.topic,
            record.partition,
            record.offset,
            error.reason,
            error.kind,
            record.key,
            record.value,
            [(k, v if isinstance(v, bytes) else b"") for k, v in record.headers or ()],
        )

    def source_headers(self, instance_id: str) -> list[tuple[str, bytes]]:
        return [
            ("dlq-reason", _text(self.reason)),
            ("dlq-kind", _text(self.kind)),
            ("dlq-source-topic", _text(self.topic)),
            ("dlq-source-partition", str(self.partition).encode()),
            ("dlq-source-offset", str(self.offset).encode()),
            ("dlq-instance", _text(instance_id)),
        ]

    def whole(self, instance_id: str) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """Key, value and headers of the full copy."""
        headers = self.source_headers(instance_id)
        headers += [(f"original-{k}", v) for k, v in self.headers]
        # a null value travels as null; with a null key too (the client could not read the
        # original) it is written empty, as the broker refuses a null key and value
        value = b"" if self.value is None and self.key is None else self.value
        return self.key, value, headers

    def reference(
        self, instance_id: str, cause: str
    ) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        """Key, value and headers of a reference: the source and reason, no value."""
        headers = self.source_headers(instance_id)
        headers.append(("dlq-value-omitted", str(len(self.value or b"")).encode()))
        headers.append(("dlq-omitted-cause", _text(cause)))
        budget = REFERENCE_HEADERS_BUDGET
        left_out = 0
        for k, v in self.headers:
            name = f"original-{k}"
            cost = len(name.encode()) + len(v) + HEADER_OVERHEAD
            if cost > budget:
                left_out += 1
                continue
            budget -= cost
            headers.append((name, v))
        if left_out:
            headers.append(("dlq-headers-omitted", str(left_out).encode()))
        key = self.key if self.key is None or len(self.key) <= REFERENCE_KEY_MAX else None
        return key, b"", headers


def dead_letter_headers(
    record: ConsumerRecord[bytes, bytes], error: InvalidRecord, instance_id: str
) -> list[tuple[str, bytes]]:
    """The headers of a record's full DLQ copy: the reason, the source, the original headers."""
    return DeadLetter.of(record, error).whole(instance_id)[2]


def record_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """An upper estimate of what the record weighs on the broker."""
    size = RECORD_OVERHEAD + len(key or b"") + len(value or b"")
    return size + sum(len(k.encode()) + len(v) + HEADER_OVERHEAD for k, v in headers)


class DeadLetters:
    """Writes dead letters to the DLQ topic in the background (see the module's doc)."""

    def __init__(self, producer: Any, settings: Settings, metrics: Metrics) -> None:
        self.producer = producer  # a chatpipe.clients.Producer (it renews itself when refused)
        self.topic = settings.dlq_topic
        self.instance_id = settings.instance_id
        self.max_record_bytes = settings.dlq_max_record_bytes
        self.metrics = metrics
        self._room = asyncio.Semaphore(settings.dlq_max_pending)
        self._last: dict[tuple[str, int], asyncio.Task[None]] = {}  # per source partition
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def submit(self, letter: DeadLetter, written: Callable[[], None]) -> None:
        """Queue `letter` behind the earlier ones of its partition; `written()` runs once it is
        in the DLQ (the caller marks its offset finished then). Waits only for room."""
        log.warning(
            "record %s-%d@%d sent to the DLQ: %s",
            letter.topic,
            letter.partition,
            letter.offset,
            letter.reason,
        )
        self.metrics.dlq.labels(letter.kind).inc()
        await self._room.acquire()
        source = (letter.topic, letter.partition)
        task = asyncio.create_task(
            self._after(self._last.get(source), letter, written), name="dlq-write"
        )
        self._last[source] = task
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.release()
        for source, last in list(self._last.items()):
            if last is task:
                del self._last[source]

    async def _after(
        self, previous: asyncio.Task[None] | None, letter: DeadLetter, written: Callable[[], None]
    ) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(previous)
        await self._write(letter)
        written()

    async def _write(self, letter: DeadLetter) -> None:
        key, value, headers = letter.whole(self.instance_id)
        cause = ""
        if record_size(key, value, headers) > self.max_record_bytes:
            cause = f"over DLQ_MAX_RECORD_BYTES={self.max_record_bytes}"
        delay = 0.1
        while True:
            if cause:
                key, value, headers = letter.reference(self.instance_id, cause)
            try:
                await self.producer.send_and_wait(self.topic, value, key=key, headers=headers)
            except TOO_LARGE as e:
                if cause:  # even the reference was refused (a DLQ topic with a tiny limit)
                    log.error(
                        "dead letter of %s-%d@%d refused even as a reference (%s): skipped; "
                        "check the DLQ topic's max.message.bytes",
                        letter.topic,
                        letter.partition,
                        letter.offset,
                        e,
                    )
                    self.metrics.dlq_degraded.labels("skipped").inc()
                    return
                cause = f"refused whole by the broker ({type(e).__name__})"
                continue
            except Exception as e:  # the broker away, a leader moving, an ACL to fix: retry
                self.metrics.dlq_retries.inc()
                log.warning(
                    "dead letter of %s-%d@%d not written, retrying in %.1fs: %s",
                    letter.topic,
                    letter.partition,
                    letter.offset,
                    delay,
                    f"{type(e).__name__}: {e}",
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if cause:
                self.metrics.dlq_degraded.labels("reference").inc()
                log.warning(
                    "dead letter of %s-%d@%d written as a reference (%s): its %d bytes stay in "
                    "the source topic",
                    letter.topic,
                    letter.partition,
                    letter.offset,
                    cause,
                    len(letter.value or b""),
                )
            return

    async def close(self, grace_s: float = 5.0) -> None:
        """Give the waiting dead letters `grace_s` seconds, then drop them: their offsets were
        not committed, so the next owner of the partition writes them again."""
        if not self._tasks:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
