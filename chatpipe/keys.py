"""Every Redis key and Kafka topic name chatpipe uses, in one place (like arq's constants).

Key layout 2 (contract 2.0.0): one layout for a single Redis and a Redis Cluster. Every key of
a session and of its messages carries the session's hash tag, `{<bucket>}`, where the bucket is
`crc32(session_id) % REDIS_KEY_BUCKETS` (16 by default): the keys one operation touches
together (a Lua script's KEYS, a DEL of a session, the SSE reader's XREAD) always share one
hash slot, so a cluster never answers CROSSSLOT, and a process that reads the streams of many
sessions reads them in at most REDIS_KEY_BUCKETS groups (api/hub.py). `chatpipe keys SESSION
[MESSAGE]` prints a session's keys for redis-cli.

A message is found by its id alone (`GET /api/chat/{id}/stream`) through `where`, the one
untagged per-message key: its session id. The two keys made of two ids (the cancel flag, and the
cancel record's key on Kafka) escape each id with `part` (contract 1.2.0), so they name one
pair only; every other key holds a single id after a fixed prefix, so it cannot collide.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from chatpipe.settings import Settings

# Base topic names of contract v1 (the settings may prefix or rename them).
REQUESTS = "chat.requests"
CANCELS = "chat.cancels"
RESPONSES = "chat.responses"
DLQ = "chat.requests.dlq"
DEFAULT_BUCKETS = 16


def part(value: str) -> str:
    """One id as a part of a composite key: `%` and the separator `:` escaped (`%25`, `%3A`),
    so that two different (session_id, message_id) pairs never join into one key (session
    `s:42` + message `abc` and session `s` + message `42:abc` both joined into `s:42:abc`).
    An id without either character, as every id of contract 1.x before 1.2 in practice, is
    kept as it is: its keys are the same as before."""
    if ":" not in value and "%" not in value:
        return value
    return value.replace("%", "%25").replace(":", "%3A")


def unpart(value: str) -> str:
    """The id `part` escaped."""
    if "%" not in value:
        return value
    return value.replace("%3A", ":").replace("%25", "%")


def cancel_record_key(session_id: str, message_id: str) -> str:
    """Key of a record on the compacted cancels topic: one live value per message."""
    return f"{part(session_id)}:{part(message_id)}"


def split_record_key(key: str) -> tuple[str, str]:
    """(session_id, message_id) of a `cancel_record_key` (ValueError: not one)."""
    session, message = key.split(":")
    return unpart(session), unpart(message)


def session_cancel_record_key(session_id: str) -> str:
    """Key of a session-wide cancel on the cancels topic: the escaped session id alone (a
    message's cancel key always holds one unescaped `:`, this one none)."""
    return part(session_id)


def split_session_cancel_key(key: str) -> str | None:
    """The session id of a `session_cancel_record_key` (None: a message's cancel key)."""
    return None if ":" in key else unpart(key)


def bucket_of(session_id: str, buckets: int) -> int:
    """The session's bucket: crc32 (zlib's, as java.util.zip.CRC32) of its UTF-8 id, modulo."""
    return zlib.crc32(session_id.encode()) % buckets


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = ""
    buckets: int = DEFAULT_BUCKETS

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        return cls(settings.key_prefix, settings.redis_key_buckets)

    def bucket(self, session_id: str) -> int:
        return bucket_of(session_id, self.buckets)

    def tagged(self, bucket: int) -> str:
        """The start of every key of a bucket: `{prefix}chat:{<bucket>}:`."""
        return f"{self.prefix}chat:{{{bucket}}}:"

    def _of(self, session_id: str) -> str:
        return self.tagged(self.bucket(session_id))

    def active(self, session_id: str) -> str:
        """message_id streaming now for a session (the seed's key, tagged)."""
        return f"{self._of(session_id)}active:{session_id}"

    def cancel(self, session_id: str, message_id: str) -> str:
        """The cancel flag, "1" (the seed's key, tagged)."""
        return f"{self._of(session_id)}cancel:{cancel_record_key(session_id, message_id)}"

    def msg(self, session_id: str, message_id: str) -> str:
        """Hash with the message state, owner, session, user."""
        return f"{self._of(session_id)}msg:{message_id}"

    def msg_prefix(self, session_id: str) -> str:
        """`msg` without the message id: scripts that read other messages of the session."""
        return f"{self._of(session_id)}msg:"

    def stream(self, session_id: str, message_id: str) -> str:
        """Redis Stream of the SSE events of one message."""
        return f"{self._of(session_id)}stream:{message_id}"

    def lease(self, session_id: str, message_id: str) -> str:
        """Ownership lease of an in-flight message: instance_id, PX lease_ms."""
        return f"{self._of(session_id)}lease:{message_id}"

    def response(self, session_id: str, message_id: str) -> str:
        """JSON: what an OpenAI background response was asked (model, the conversation given,
        instructions, metadata...), for `GET /v1/responses/{id}` and `previous_response_id`."""
        return f"{self._of(session_id)}response:{message_id}"

    def where(self, message_id: str) -> str:
        """The session id of a message (untagged: its slot is its own), for the routes that
        name a message by its id alone."""
        return f"{self.prefix}chat:where:{message_id}"

    def wakeup(self, instance_id: str, bucket: int) -> str:
        """Private stream an api process writes to wake its own blocked XREAD of a bucket."""
        return f"{self.tagged(bucket)}wakeup:{instance_id}"

    def wrote(self, writer: str, bucket: int) -> str:
        """The number of a writer's (an ai_consumer's sink's) last WRITE call in a bucket: the
        same call sent again after a lost connection finds it and writes nothing twice."""
        return f"{self.tagged(bucket)}wrote:{writer}"

    def cancel_wakeup(self) -> str:
        """Pub/Sub channel: the api announces each accepted cancel so the ai_consumer that
        streams the message interrupts it at once (a wake-up only: Kafka and the flag carry it).
        Classic Pub/Sub: a Redis Cluster delivers it to subscribers on every node."""
        return f"{self.prefix}chat:cancel-wakeup"

    def session_cancelled(self, session_id: str) -> str:
        """RFC 3339 time: every message of the session created before it is cancelled (a
        session-wide cancel; contract 1.4.0). The latest such time is kept."""
        return f"{self._of(session_id)}session-cancel:{session_id}"

    def open_messages(self, session_id: str) -> str:
        """Set: the session's queued and streaming message ids (session-wide cancel, if_busy)."""
        return f"{self._of(session_id)}open:{session_id}"

    def history(self, session_id: str) -> str:
        """List: the session's ended turns, oldest first, as JSON (chatpipe/history.py)."""
        return f"{self._of(session_id)}history:{session_id}"

    def leases(self, bucket: int) -> str:
        """Sorted set of a bucket: cancel_record_key(session, message) -> when the message's
        lease lapses (ms, Redis's clock), for takeovers."""
        return f"{self.tagged(bucket)}leases"

    def owner(self, session_id: str) -> str:
        """user_id of the session's first sender (set once, atomically; TTL refreshed)."""
        return f"{self._of(session_id)}owner:{session_id}"

    def rate(self, user_id: str) -> str:
        """A user's chat-message rate limiter state (GCRA theoretical arrival time, ms)."""
        return f"{self.prefix}chat:rate:{user_id}"

    def stream_slots(self, user_id: str) -> str:
        """Sorted set of a user's open SSE streams (member = slot id, score = expiry ms)."""
        return f"{self.prefix}chat:slots:{user_id}"
