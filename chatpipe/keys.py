"""Every Redis key and Kafka topic name chatpipe uses, in one place (like arq's constants).

With the default empty prefix the keys are the contract's: the seed's two keys verbatim
(`chat:active:{session_id}`, `chat:cancel:{session_id}:{message_id}`), plus the message state
and the per-message event stream. The one key made of two ids (the cancel flag, and the cancel
record's key on Kafka) escapes each id with `part` (contract 1.2.0), so it names one pair only;
every other key holds a single id after a fixed prefix, so it cannot collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatpipe.settings import Settings

# Base topic names of contract v1 (the settings may prefix or rename them).
REQUESTS = "chat.requests"
CANCELS = "chat.cancels"
RESPONSES = "chat.responses"
DLQ = "chat.requests.dlq"


def part(value: str) -> str:
    """One id as a part of a composite key: `%` and the separator `:` escaped (`%25`, `%3A`),
    so that two different (session_id, message_id) pairs never join into one key (session
    `s:42` + message `abc` and session `s` + message `42:abc` both joined into `s:42:abc`).
    An id without either character, as every id of contract 1.x before 1.2 in practice, is
    kept as it is: its keys are the same as before."""
    if ":" not in value and "%" not in value:
        return value
    return value.replace("%", "%25").replace(":", "%3A")


def cancel_record_key(session_id: str, message_id: str) -> str:
    """Key of a record on the compacted cancels topic: one live value per message."""
    return f"{part(session_id)}:{part(message_id)}"


def session_cancel_record_key(session_id: str) -> str:
    """Key of a session-wide cancel on the cancels topic: the escaped session id alone (a
    message's cancel key always holds one unescaped `:`, this one none)."""
    return part(session_id)


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        return cls(settings.key_prefix)

    def active(self, session_id: str) -> str:
        """message_id streaming now for a session (the seed's key)."""
        return f"{self.prefix}chat:active:{session_id}"

    def cancel(self, session_id: str, message_id: str) -> str:
        """The cancel flag, "1" (the seed's key)."""
        return f"{self.prefix}chat:cancel:{cancel_record_key(session_id, message_id)}"

    def msg(self, message_id: str) -> str:
        """Hash with the message state, owner, session, user."""
        return f"{self.prefix}chat:msg:{message_id}"

    def stream(self, message_id: str) -> str:
        """Redis Stream of the SSE events of one message."""
        return f"{self.prefix}chat:stream:{message_id}"

    def lease(self, message_id: str) -> str:
        """Ownership lease of an in-flight message: instance_id, PX lease_ms."""
        return f"{self.prefix}chat:lease:{message_id}"

    def response(self, message_id: str) -> str:
        """JSON: what an OpenAI background response was asked (model, the conversation given,
        instructions, metadata...), for `GET /v1/responses/{id}` and `previous_response_id`."""
        return f"{self.prefix}chat:response:{message_id}"

    def wakeup(self, instance_id: str) -> str:
        """Private stream an api process writes to wake its own blocked XREAD."""
        return f"{self.prefix}chat:wakeup:{instance_id}"

    def cancel_wakeup(self) -> str:
        """Pub/Sub channel: the api announces each accepted cancel so the ai_consumer that
        streams the message interrupts it at once (a wake-up only: Kafka and the flag carry it)."""
        return f"{self.prefix}chat:cancel-wakeup"

    def session_cancelled(self, session_id: str) -> str:
        """RFC 3339 time: every message of the session created before it is cancelled (a
        session-wide cancel; contract 1.4.0). The latest such time is kept."""
        return f"{self.prefix}chat:session-cancel:{session_id}"

    def open_messages(self, session_id: str) -> str:
        """Set: the session's queued and streaming message ids (session-wide cancel, if_busy)."""
        return f"{self.prefix}chat:open:{session_id}"

    def history(self, session_id: str) -> str:
        """List: the session's ended turns, oldest first, as JSON (chatpipe/history.py)."""
        return f"{self.prefix}chat:history:{session_id}"

    def leases(self) -> str:
        """Sorted set: message_id -> when its lease lapses (ms, Redis's clock), for takeovers."""
        return f"{self.prefix}chat:leases"

    def owner(self, session_id: str) -> str:
        """user_id of the session's first sender (set once, atomically; TTL refreshed)."""
        return f"{self.prefix}chat:owner:{session_id}"

    def rate(self, user_id: str) -> str:
        """A user's chat-message rate limiter state (GCRA theoretical arrival time, ms)."""
        return f"{self.prefix}chat:rate:{user_id}"

    def stream_slots(self, user_id: str) -> str:
        """Sorted set of a user's open SSE streams (member = slot id, score = expiry ms)."""
        return f"{self.prefix}chat:slots:{user_id}"
