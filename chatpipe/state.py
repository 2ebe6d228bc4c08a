"""The Redis state operations of chatpipe, each one atomic (a Lua script) where it decides.

The seed's six operations live on here: register/get/clear the active stream and
set/check/clear the cancel flag, under the seed's keys. What the seed could not do atomically
(a cancel racing the end of a stream, two consumers redelivered the same message) is decided in
one script each, so every message reaches exactly one final state:

    queued --claim--> streaming --finish--> completed | cancelled | failed
       \\--claim (flag set)--> cancelled        (a cancel before the start wins)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT as Arg

from chatpipe.codec import dumps
from chatpipe.history import Turn, parse_turns
from chatpipe.keys import Keys
from chatpipe.scripts import load_script
from chatpipe.settings import Settings

FINAL_STATES = frozenset({"completed", "cancelled", "failed"})
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
CancelAnswer = Literal["cancelled", "repeated", "completed", "failed", "not_found", "forbidden"]

# The scripts, one file each under chatpipe/lua/ (what each does, its KEYS and ARGV by name)
ACCEPT = load_script("accept")
OBSERVE = load_script("observe")
WITHDRAW = load_script("withdraw")
CANCEL = load_script("cancel")
MIRROR_CANCEL = load_script("mirror_cancel")
CLAIM = load_script("claim")
WRITE = load_script("write")
FINISH = load_script("finish")
PUBLISHED = load_script("published")
REFRESH = load_script("refresh")
LAPSED = load_script("lapsed")
SESSION_CANCEL = load_script("session_cancel")
SERVED = load_script("served")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Claim:
    """`epoch`: the run's fencing token (start/cancel), passed to every write of the run.
    `republish`: the message is final (`detail` its state) but its terminal event was never
    acked by Kafka: publish it again (seq `next_seq`, `reason`, `chunks`), then `published()`."""

    outcome: Literal["final", "owned", "forbidden", "cancel", "start", "republish"]
    detail: str = ""
    restart: bool = False
    next_seq: int = 0
    epoch: str = ""
    reason: str = ""
    chunks: int = 0


@dataclass(frozen=True, slots=True)
class Finish:
    state: str
    reason: str
    stream_id: str
    already: bool = False
    cancel_source: str = ""  # where the first cancel came from (api, kafka, session, interrupt)


class State:
    """Redis operations on messages. One instance per process, sharing the Redis pool."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys.from_settings(settings)
        self._accept = redis.register_script(ACCEPT)
        self._observe = redis.register_script(OBSERVE)
        self._cancel = redis.register_script(CANCEL)
        self._mirror = redis.register_script(MIRROR_CANCEL)
        self._claim = redis.register_script(CLAIM)
        self._finish = redis.register_script(FINISH)
        self._refresh = redis.register_script(REFRESH)
        self._write = redis.register_script(WRITE)
        self._published = redis.register_script(PUBLISHED)
        self._withdraw = redis.register_script(WITHDRAW)
        self._lapsed = redis.register_script(LAPSED)
        self._session_cancel = redis.register_script(SESSION_CANCEL)
        self._served = redis.register_script(SERVED)

    # --- api ---------------------------------------------------------------------------
    async def accept(
        self,
        message_id: str,
        session_id: str,
        user_id: str | None,
        now: str,
        enforce: bool = False,
        reject_if_busy: bool = False,
        message: str = "",
    ) -> str:
        """Record a new message as queued. Returns "ok", "forbidden" (`enforce`: the session or
        the message id is another user's), "busy:<message_id>" (`reject_if_busy` and the
        session has a queued or streaming message), or the state of an existing message."""
        s = self.settings
        k = self.keys
        keys = [k.msg(message_id), k.owner(session_id), k.open_messages(session_id)]
        args: list[Arg] = [
            session_id,
            user_id or "",
            now,
            s.msg_ttl_s,
            int(enforce),
            s.session_owner_ttl_s,
            "reject" if reject_if_busy else "",
            k.prefix,
            message_id,
            message,
        ]
        return _s(await self._accept(keys=keys, args=args))

    async def session_owner(self, session_id: str) -> str | None:
        value = await self.redis.get(self.keys.owner(session_id))
        return _s(value) if value is not None else None

    async def lapsed(self, limit: int) -> list[str]:
        """Up to `limit` messages whose lease lapsed (by Redis's clock): their owner died, or
        stopped without finishing them (a hand-over). Oldest lapse first."""
        raw = await self._lapsed(keys=[self.keys.leases()], args=[limit])
        return [_s(m) for m in raw]

    async def takeover_request(self, message_id: str) -> bytes | None:
        """The request of a message whose lease lapsed, or None when there is nothing to take
        over (it ended, or Redis no longer holds its request): then it leaves `leases`."""
        state, request = await self.redis.hmget(self.keys.msg(message_id), ["state", "request"])
        if state == b"streaming" and request:
            return request if isinstance(request, bytes) else str(request).encode()
        await self.redis.zrem(self.keys.leases(), message_id)
        return None

    async def withdraw(self, message_id: str, session_id: str) -> bool:
        """The api could not queue the request (Kafka did not ack in time): mark it so that
        its record, should Kafka take it late, is not answered (WITHDRAW). False: a consumer
        has it already (it was queued after all)."""
        keys = [self.keys.msg(message_id), self.keys.open_messages(session_id)]
        args: list[Arg] = [self.settings.msg_ttl_s, message_id]
        return bool(await self._withdraw(keys=keys, args=args))

    async def open_messages(
        self, session_id: str, before: str | None = None
    ) -> list[tuple[str, str]]:
        """The session's queued and streaming messages (id, state), oldest first by creation
        (only those created before `before`, an RFC 3339 time, when given); members whose
        message ended or is gone are dropped from the set."""
        key = self.keys.open_messages(session_id)
        ids = sorted(_s(m) for m in await self.redis.smembers(key))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in ids:
                pipe.hmget(self.keys.msg(m), ["state", "created"])
            found = await pipe.execute()
        live, gone = [], []
        for m, (state, created) in zip(ids, found, strict=True):
            if state in (b"queued", b"streaming"):
                if before is None or _s(created or b"") < before:
                    live.append((_s(created or b""), m, _s(state)))
            else:
                gone.append(m)
        if gone:
            await self.redis.srem(key, *gone)
        return [(m, state) for _, m, state in sorted(live)]

    async def cancel_session_before(
        self, session_id: str, before: str, user_id: str | None, enforce: bool
    ) -> bool:
        """Every message of the session created before `before` (RFC 3339) is cancelled when a
        consumer claims it (session_cancel.lua); the caller flags the open ones. False:
        `enforce` and the session is another user's (nothing changed)."""
        k = self.keys
        keys = [k.session_cancelled(session_id), k.owner(session_id)]
        ttl = self.settings.cancel_queued_ttl_s
        args: list[Arg] = [before, ttl, int(enforce), user_id or ""]
        return int(await self._session_cancel(keys=keys, args=args)) > 0

    async def stop_session(
        self,
        session_id: str,
        before: str,
        user_id: str | None,
        enforce: bool,
        source: str = "session",
    ) -> list[str] | None:
        """A session-wide cancel read from Kafka (or a request's `if_busy: interrupt`): every
        message of the session created before `before` is cancelled, the open ones flagged
        (each as a cancel record would: their streams stop at the next chunk), the others when
        a consumer claims them. Returns the ids flagged, or None when `enforce` and the session
        is another user's (nothing changed)."""
        if not await self.cancel_session_before(session_id, before, user_id, enforce):
            return None
        open_ = await self.open_messages(session_id, before)
        if not open_:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id, _ in open_:
                await self.mirror_cancel(pipe, session_id, message_id, user_id, source)
            results = await pipe.execute()
        return [m for (m, _), r in zip(open_, results, strict=True) if int(r) > 0]

    async def served(self, message_id: str, instance_id: str) -> None:
        """`instance_id` serves the message's stream to a reader (shown by GET /api/chat/{id})."""
        await self._served(keys=[self.keys.msg(message_id)], args=[instance_id])

    async def cancel(
        self,
        session_id: str,
        message_id: str,
        user_id: str | None = None,
        enforce: bool = False,
        instance_id: str = "",
        source: str = "api",
    ) -> CancelAnswer:
        """`enforce`: only the message's sender may cancel it ("forbidden" otherwise).
        `instance_id`: the api that took it (kept as `cancelled_by`); `source`: why (api,
        session, interrupt), for the cancel metrics."""
        keys = [self.keys.msg(message_id), self.keys.cancel(session_id, message_id)]
        args: list[Arg] = [
            session_id,
            self.settings.cancel_ttl_s,
            self.settings.cancel_queued_ttl_s,
            int(enforce),
            user_id or "",
            instance_id,
            source,
        ]
        answer = _s(await self._cancel(keys=keys, args=args))
        assert answer in (
            "cancelled",
            "repeated",
            "completed",
            "failed",
            "not_found",
            "forbidden",
        ), answer
        return cast(CancelAnswer, answer)

    async def history(self, session_id: str) -> list[Turn]:
        """The session's ended turns, oldest first (at most HISTORY_MAX_TURNS)."""
        limit = self.settings.history_max_turns
        if not limit:
            return []
        return parse_turns(await self.redis.lrange(self.keys.history(session_id), -limit, -1))

    async def answer_so_far(self, message_id: str) -> str:
        """The text of the chunks the message's stream holds since its last start (a takeover
        streams the answer again after its `restart` event): its answer up to now."""
        parts: list[str] = []
        entries = cast(StreamEntries, await self.redis.xrange(self.keys.stream(message_id)))
        for _, fields in entries:
            event = fields.get(b"e")
            if event == b"restart":
                parts.clear()
            elif event == b"chunk":
                parts.append(str(orjson.loads(fields[b"d"]).get("delta", "")))
        return "".join(parts)

    async def open_turns(self, session_id: str) -> list[Turn]:
        """The session's queued and streaming messages as turns, oldest first; a streaming
        one's answer is its text so far."""
        turns = []
        for message_id, state in await self.open_messages(session_id):
            fields = await self.message(message_id)
            turns.append(
                Turn(
                    message_id=message_id,
                    message=fields.get("message", ""),
                    answer=await self.answer_so_far(message_id) if state == "streaming" else "",
                    status="streaming" if state == "streaming" else "queued",
                    created_at=fields.get("created") or None,
                )
            )
        return turns

    async def settled(self, message_ids: Sequence[str]) -> bool:
        """Every one of the messages is final with its terminal event acked by Kafka (its
        finisher is done with it), or unknown to Redis."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in message_ids:
                pipe.hmget(self.keys.msg(m), ["state", "published"])
            found = await pipe.execute()
        return all(
            state is None or (_s(state) in FINAL_STATES and published == b"1")
            for state, published in found
        )

    async def forget_session(self, session_id: str, message_ids: Sequence[str]) -> int:
        """Delete every key of the session and of its messages `message_ids` (their state,
        event streams, leases, cancel flags): `DELETE /api/sessions/{id}`. Returns how many
        keys there were. The caller stopped the messages first."""
        k = self.keys
        names = [k.history(session_id), k.open_messages(session_id)]
        names += [k.active(session_id), k.owner(session_id), k.session_cancelled(session_id)]
        for m in message_ids:
            names += [k.msg(m), k.stream(m), k.lease(m), k.cancel(session_id, m), k.response(m)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*names)
            if message_ids:
                pipe.zrem(k.leases(), *message_ids)
            found = await pipe.execute()
        return int(found[0])

    async def save_response(self, message_id: str, meta: bytes) -> None:
        """Keep what an OpenAI response was asked, as long as the session's history."""
        await self.redis.set(self.keys.response(message_id), meta, ex=self.settings.history_ttl_s)

    async def response(self, message_id: str) -> bytes | None:
        value = await self.redis.get(self.keys.response(message_id))
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    async def turn(self, session_id: str, message_id: str) -> Turn | None:
        """The message's turn in the session's history (None: not there, or not ended)."""
        return next((t for t in await self.history(session_id) if t.message_id == message_id), None)

    async def message(self, message_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.msg(message_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    async def exists(self, message_id: str) -> bool:
        """Redis knows the message (a withdrawn one, never queued, is not counted)."""
        state = await self.redis.hget(self.keys.msg(message_id), "state")
        return state is not None and state != b"withdrawn"

    async def states(self, message_ids: Sequence[str]) -> list[str | None]:
        """The state of each message (None: Redis does not know it), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in message_ids:
                pipe.hget(self.keys.msg(message_id), "state")
            found = await pipe.execute()
        return [None if v is None else _s(v) for v in found]

    # --- seed operations (kept for operators and the seed's callers) -------------------
    async def get_active_stream(self, session_id: str) -> str | None:
        value = await self.redis.get(self.keys.active(session_id))
        return _s(value) if value is not None else None

    async def check_cancel_flag(self, session_id: str, message_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.cancel(session_id, message_id)))

    # --- listener ----------------------------------------------------------------------
    async def mirror_cancel(
        self,
        pipe: Pipeline,
        session_id: str,
        message_id: str,
        user_id: str | None = None,
        source: str = "kafka",
    ) -> None:
        """Queue the flag of a cancel record on `pipe` (result: 1 set, 0 message already final,
        -1 forbidden: ownership enforced and `user_id` is not the message's sender)."""
        keys = [
            self.keys.msg(message_id),
            self.keys.cancel(session_id, message_id),
            self.keys.owner(session_id),
        ]
        s = self.settings
        args: list[Arg] = [
            s.cancel_ttl_s,
            s.cancel_queued_ttl_s,
            int(s.ownership_enforced),
            user_id or "",
            source,
        ]
        await self._mirror(keys=keys, args=args, client=pipe)

    # --- consumer ----------------------------------------------------------------------
    async def observe(
        self,
        pipe: Pipeline,
        message_id: str,
        session_id: str,
        user_id: str | None,
        now: str,
        message: str = "",
        reject_if_busy: bool = False,
    ) -> None:
        """Queue on `pipe`: record a consumed request as queued unless it has a state already
        (its result: the state, or "busy:<id>" with `reject_if_busy` and an open message)."""
        ttl = self.settings.msg_ttl_s
        args: list[Arg] = [session_id, user_id or "", now, ttl, message_id, message]
        args += ["reject" if reject_if_busy else "", self.keys.prefix]
        keys = [self.keys.msg(message_id), self.keys.open_messages(session_id)]
        await self._observe(keys=keys, args=args, client=pipe)

    async def claim(
        self,
        message_id: str,
        session_id: str,
        user_id: str | None,
        instance_id: str,
        now: str,
        request: bytes = b"",
        created: str = "",
    ) -> Claim:
        """Take the message for a run. `request`: its record value, kept in Redis while it
        runs, so another instance can take it over when the lease lapses (b"": keep what is
        there). `created`: the request's created_at (RFC 3339): one created before a session
        cancel is cancelled ("" never is)."""
        k = self.keys
        keys = [
            k.msg(message_id),
            k.lease(message_id),
            k.cancel(session_id, message_id),
            k.active(session_id),
            k.stream(message_id),
            k.owner(session_id),
            k.leases(),
            k.session_cancelled(session_id),
        ]
        s = self.settings
        args: list[Arg] = [
            instance_id,
            s.lease_ms,
            session_id,
            user_id or "",
            now,
            s.msg_ttl_s,
            s.active_ttl_s,
            message_id,
            int(s.ownership_enforced),
            s.session_owner_ttl_s,
            request,
            created,
        ]
        raw = await self._claim(keys=keys, args=args)
        outcome = _s(raw[0])
        if outcome in ("final", "owned", "forbidden"):
            return Claim(outcome, detail=_s(raw[1]))  # type: ignore[arg-type]
        if outcome == "republish":
            return Claim(
                "republish",
                detail=_s(raw[1]),
                next_seq=int(raw[2]),
                reason=_s(raw[3]),
                chunks=int(raw[4]),
            )
        return Claim(
            outcome,  # type: ignore[arg-type]
            restart=bool(int(raw[1])),
            next_seq=int(raw[2]),
            epoch=_s(raw[3]),
        )

    async def finish(
        self,
        message_id: str,
        session_id: str,
        instance_id: str,
        wanted: str,
        reason: str,
        seq: int,
        now: str,
        epoch: str = "",
        chunks: int = 0,
        message: str = "",
        answer: str = "",
        completion_tokens: int | None = None,
        prompt_tokens: int | None = None,
    ) -> Finish:
        """`epoch`: the run's (Claim.epoch); a run fenced off by a later claim finishes nothing.
        "" for a message that never started a run (failed or refused before it). The lease
        stays ours until `published()`. `message` and `answer` (the user's text and the
        answer's): the turn appended to the session's history ("" message: none)."""
        k = self.keys
        keys = [
            k.msg(message_id),
            k.lease(message_id),
            k.cancel(session_id, message_id),
            k.active(session_id),
            k.stream(message_id),
            k.leases(),
            k.open_messages(session_id),
            k.history(session_id),
        ]
        s = self.settings
        kept = answer[: s.history_max_chars]
        args: list[Arg] = [
            instance_id,
            wanted,
            reason,
            seq,
            s.final_ttl_s,
            message_id,
            now,
            s.stream_maxlen,
            epoch,
            s.lease_ms,
            chunks,
            message,
            kept,
            "1" if len(kept) < len(answer) else "",
            s.history_max_turns,
            s.history_ttl_s,
            chunks if completion_tokens is None else completion_tokens,
            "" if prompt_tokens is None else prompt_tokens,
        ]
        raw = await self._finish(keys=keys, args=args)
        if _s(raw[0]) == "already":
            return Finish(_s(raw[1]), "", "", already=True)
        return Finish(_s(raw[0]), _s(raw[1]), _s(raw[2]), cancel_source=_s(raw[3]))

    def append(
        self, pipe: Pipeline, message_id: str, event: str, seq: int, data: dict[str, Any]
    ) -> None:
        """Queue one SSE event on the message's Redis Stream (batched by the caller)."""
        pipe.xadd(
            self.keys.stream(message_id),
            {"e": event, "s": seq, "d": dumps(data)},
            maxlen=self.settings.stream_maxlen,
            approximate=True,
        )

    async def write(
        self,
        pipe: Pipeline,
        message_id: str,
        session_id: str,
        epoch: str,
        event: str,
        seq: int,
        data: dict[str, Any],
        first: bool = False,
    ) -> None:
        """Queue on `pipe` one SSE event of the run `epoch`, fenced (the WRITE script). Its
        result: -1 the run lost the message (nothing written: write nothing more, to Kafka
        neither), 1 written and a cancel is requested, 0 written. `first`: the run's first
        event, which gives the stream its TTL while streaming."""
        k = self.keys
        s = self.settings
        keys = [k.msg(message_id), k.stream(message_id), k.cancel(session_id, message_id)]
        args: list[Arg] = [
            epoch,
            event,
            seq,
            dumps(data),
            s.stream_maxlen,
            s.active_ttl_s if first else "",
        ]
        await self._write(keys=keys, args=args, client=pipe)

    async def lost_runs(self, runs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of (message_id, epoch) runs, those that lost their message since: it is no longer
        `streaming` under that epoch (a message whose hash is gone is not counted lost)."""
        ordered = list(runs)
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id, _ in ordered:
                pipe.hmget(self.keys.msg(message_id), ["state", "epoch"])
            values = await pipe.execute()
        lost = set()
        for run, (state, epoch) in zip(ordered, values, strict=True):
            if state is not None and (_s(state) != "streaming" or _s(epoch or b"") != run[1]):
                lost.add(run)
        return lost

    async def published(self, message_id: str, instance_id: str) -> None:
        """The message's terminal event is acked by Kafka: no claim publishes it again; our
        lease (kept since FINISH) is released."""
        keys = [self.keys.msg(message_id), self.keys.lease(message_id)]
        await self._published(keys=keys, args=[instance_id])

    async def refresh_leases(
        self, owned: Sequence[tuple[str, str] | tuple[str, str, str]], instance_id: str
    ) -> list[int]:
        """Extend the leases of (message_id, session_id[, epoch]) we stream (also the seed's
        active key and the message's stream TTL); returns the indexes of those we lost."""
        if not owned:
            return []
        k = self.keys
        keys: list[str] = [k.leases()]
        runs: list[Arg] = []
        for entry in owned:
            message_id, session_id = entry[0], entry[1]
            keys += [k.lease(message_id), k.active(session_id), k.msg(message_id)]
            keys.append(k.stream(message_id))
            runs += [message_id, entry[2] if len(entry) > 2 else ""]
        s = self.settings
        args: list[Arg] = [instance_id, s.lease_ms, s.active_ttl_s, *runs]
        lost = await self._refresh(keys=keys, args=args)
        return [int(i) - 1 for i in lost]
