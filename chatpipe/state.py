"""The Redis state operations of chatpipe, each one atomic (a Lua script) where it decides.

The seed's six operations live on here: register/get/clear the active stream and
set/check/clear the cancel flag, under the seed's keys. What the seed could not do atomically
(a cancel racing the end of a stream, two consumers redelivered the same message) is decided in
one script each, so every message reaches exactly one final state:

    queued --claim--> streaming --finish--> completed | cancelled | failed
       \\--claim (flag set)--> cancelled        (a cancel before the start wins)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT as Arg

from chatpipe import entries as stream_entries
from chatpipe.clients import is_cluster
from chatpipe.codec import dumps
from chatpipe.history import Turn, parse_turns
from chatpipe.keys import Keys, cancel_record_key, split_record_key
from chatpipe.scripts import Script, load_script, register
from chatpipe.settings import Settings

OBSERVES_QUEUED = 2  # commands State.observe queues: the message's `where`, then OBSERVE
Flag = Callable[[list[str]], Awaitable[list[str]]]
"""Flags the given message ids of a session-wide cancel; returns those it stopped."""

log = logging.getLogger(__name__)
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


class Event(Protocol):
    """One SSE event of a run, as `State.write` appends it (ai_consumer/sink.py's Outgoing)."""

    @property
    def message_id(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def epoch(self) -> str: ...
    @property
    def sse_event(self) -> str: ...  # started | restart | chunk
    @property
    def seq(self) -> int: ...
    @property
    def sse_data(self) -> dict[str, Any]: ...


class State:
    """Redis operations on messages. One instance per process, sharing the Redis pool."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys.from_settings(settings)
        self.cluster = is_cluster(redis)
        self._accept = register(redis, ACCEPT)
        self._observe = register(redis, OBSERVE)
        self._cancel = register(redis, CANCEL)
        self._mirror = register(redis, MIRROR_CANCEL)
        self._claim = register(redis, CLAIM)
        self._finish = register(redis, FINISH)
        self._refresh = register(redis, REFRESH)
        self._write = register(redis, WRITE)
        self._published = register(redis, PUBLISHED)
        self._withdraw = register(redis, WITHDRAW)
        self._lapsed = register(redis, LAPSED)
        self._session_cancel = register(redis, SESSION_CANCEL)
        self._served = register(redis, SERVED)

    def _by_slot(
        self, items: Iterable[int], bucket: Callable[[int], int] = lambda b: b
    ) -> list[list[int]]:
        """`items` in the groups one script call may take: all of them on a single Redis, one
        group per bucket (hash slot) on a Redis Cluster."""
        ordered = list(items)
        if not self.cluster:
            return [ordered] if ordered else []
        groups: dict[int, list[int]] = {}
        for item in ordered:
            groups.setdefault(bucket(item), []).append(item)
        return list(groups.values())

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
        session has a queued or streaming message), or the state of an existing message (in
        this session or, the id being unique, another one; "taken" when that one is gone).
        The message's `where` names its session from here on (a refused call leaves none)."""
        s = self.settings
        k = self.keys
        keys = [k.msg(session_id, message_id), k.owner(session_id), k.open_messages(session_id)]
        args: list[Arg] = [
            session_id,
            user_id or "",
            now,
            s.msg_ttl_s,
            int(enforce),
            s.session_owner_ttl_s,
            "reject" if reject_if_busy else "",
            k.msg_prefix(session_id),
            message_id,
            message,
        ]
        where = self.keys.where(message_id)
        held = await self.redis.set(
            where, session_id, nx=True, get=True, ex=self.settings.history_ttl_s
        )
        if held is not None and _s(held) != session_id:
            return await self._held_elsewhere(_s(held), message_id, user_id, enforce)
        answer = _s(await self._accept(keys=keys, args=args))
        if answer != "ok" and held is None:
            # refused (busy, forbidden, ...): the id was not this session's before this call.
            # Every writer of `where` sets it only when absent, so it is still ours to drop.
            await self.redis.delete(where)
        return answer

    async def _held_elsewhere(
        self, other: str, message_id: str, user_id: str | None, enforce: bool
    ) -> str:
        """A message id is unique across sessions (the contract): one whose `where` names
        another session is refused, with that message's state (409), "forbidden" (`enforce`
        and another user's), or "taken" (its message is gone or not written yet: the id stays
        the first session's for HISTORY_TTL_S)."""
        state, user = await self.redis.hmget(self.keys.msg(other, message_id), ["state", "user"])
        if state is None:
            return "taken"
        if enforce and _s(user or b"") != (user_id or ""):
            return "forbidden"
        return _s(state)

    def _locate(self, pipe: Pipeline, session_id: str, message_id: str) -> None:
        """Queue the message's `where` (its session), for the routes that name it by id alone."""
        pipe.set(self.keys.where(message_id), session_id, nx=True, ex=self.settings.history_ttl_s)

    async def locate(self, message_id: str) -> str | None:
        """The session of a message Redis knows, or None."""
        value = await self.redis.get(self.keys.where(message_id))
        return None if value is None else _s(value)

    async def session_owner(self, session_id: str) -> str | None:
        value = await self.redis.get(self.keys.owner(session_id))
        return _s(value) if value is not None else None

    async def lapsed(self, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` messages (session_id, message_id) whose lease lapsed (by Redis's
        clock): their owner died, or stopped without finishing them (a hand-over). Oldest lapse
        first within a bucket; every bucket is looked at (one script, one per bucket on a
        cluster, pipelined)."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for buckets in self._by_slot(range(k.buckets)):
                keys = [k.leases(b) for b in buckets]
                await self._lapsed(keys=keys, args=[limit], client=pipe)
            found = await pipe.execute()
        lapsed: list[tuple[str, str]] = []
        for members in found:
            for member in members:
                try:
                    lapsed.append(split_record_key(_s(member)))
                except ValueError:  # not a member chatpipe writes: leave it to its writer
                    continue
        return lapsed[:limit]

    async def takeover_request(self, session_id: str, message_id: str) -> bytes | None:
        """The request of a message whose lease lapsed, or None when there is nothing to take
        over (it ended, or Redis no longer holds its request): then it leaves `leases`."""
        k = self.keys
        state, request = await self.redis.hmget(k.msg(session_id, message_id), ["state", "request"])
        if state == b"streaming" and request:
            return request if isinstance(request, bytes) else str(request).encode()
        member = cancel_record_key(session_id, message_id)
        await self.redis.zrem(k.leases(k.bucket(session_id)), member)
        return None

    async def withdraw(self, message_id: str, session_id: str) -> bool:
        """The api could not queue the request (Kafka did not ack in time): mark it so that
        its record, should Kafka take it late, is not answered (WITHDRAW). False: a consumer
        has it already (it was queued after all)."""
        keys = [self.keys.msg(session_id, message_id), self.keys.open_messages(session_id)]
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
                pipe.hmget(self.keys.msg(session_id, m), ["state", "created"])
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
        flag: Flag | None = None,
    ) -> list[str] | None:
        """A session-wide cancel (a `chat.session_cancel` record, `POST
        /api/sessions/{id}/cancel`, `if_busy: interrupt`): every message of the session created
        before `before` is cancelled, the open ones flagged (each as a cancel record would:
        their streams stop at the next chunk), the others when a consumer claims them.

        The open ones are flagged before the session's mark, so one a consumer claims while
        this runs is counted with `source`, and again after it, so none claimed between the
        first listing and the mark escapes. `flag` flags a list of ids and returns those it
        stopped (default: each flag as a cancel record's, in one pipeline). Returns the ids
        stopped, or None when `enforce` and the session is another user's (nothing changed:
        the flags enforce the same ownership)."""
        stop = flag or (lambda ids: self._flag_all(session_id, ids, user_id, source))
        first = [m for m, _ in await self.open_messages(session_id, before)]
        stopped = await stop(first) if first else []
        if not await self.cancel_session_before(session_id, before, user_id, enforce):
            return None
        later = [m for m, _ in await self.open_messages(session_id, before) if m not in first]
        return stopped + (await stop(later) if later else [])

    async def _flag_all(
        self, session_id: str, message_ids: list[str], user_id: str | None, source: str
    ) -> list[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in message_ids:
                await self.mirror_cancel(pipe, session_id, message_id, user_id, source)
            results = await pipe.execute()
        return [m for m, r in zip(message_ids, results, strict=True) if int(r) > 0]

    async def served(self, session_id: str, message_id: str, instance_id: str) -> None:
        """`instance_id` serves the message's stream to a reader (shown by GET /api/chat/{id})."""
        await self._served(keys=[self.keys.msg(session_id, message_id)], args=[instance_id])

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
        keys = [self.keys.msg(session_id, message_id), self.keys.cancel(session_id, message_id)]
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

    async def next_seq(self, session_id: str, message_id: str) -> int:
        """The seq the message's next event takes: one past its stream's last (0: none yet)."""
        key = self.keys.stream(session_id, message_id)
        last = cast(StreamEntries, await self.redis.xrevrange(key, count=1))
        return stream_entries.seq_of(last[0][1]) + 1 if last else 0

    async def answer_so_far(self, session_id: str, message_id: str) -> str:
        """The text of the chunks the message's stream holds since its last start (a takeover
        streams the answer again after its `restart` event): its answer up to now."""
        parts: list[str] = []
        key = self.keys.stream(session_id, message_id)
        entries = cast(StreamEntries, await self.redis.xrange(key))
        for _, fields in entries:
            event = stream_entries.event_of(fields)
            if event == b"restart":
                parts.clear()
            elif event == b"chunk":
                parts.append(stream_entries.delta_of(fields))
        return "".join(parts)

    async def open_turns(self, session_id: str) -> list[Turn]:
        """The session's queued and streaming messages as turns, oldest first; a streaming
        one's answer is its text so far."""
        turns = []
        for message_id, state in await self.open_messages(session_id):
            fields = await self.message(session_id, message_id)
            turns.append(
                Turn(
                    message_id=message_id,
                    message=fields.get("message", ""),
                    answer=(
                        await self.answer_so_far(session_id, message_id)
                        if state == "streaming"
                        else ""
                    ),
                    status="streaming" if state == "streaming" else "queued",
                    created_at=fields.get("created") or None,
                )
            )
        return turns

    async def settled(self, session_id: str, message_ids: Sequence[str]) -> bool:
        """Every one of the messages is final with its terminal event acked by Kafka (its
        finisher is done with it), or unknown to Redis."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in message_ids:
                pipe.hmget(self.keys.msg(session_id, m), ["state", "published"])
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
            names += [k.msg(session_id, m), k.stream(session_id, m), k.lease(session_id, m)]
            names += [k.cancel(session_id, m), k.response(session_id, m)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*names)  # one bucket: one slot
            if message_ids:
                members = [cancel_record_key(session_id, m) for m in message_ids]
                pipe.zrem(k.leases(k.bucket(session_id)), *members)
            for m in message_ids:  # each in a slot of its own
                pipe.delete(k.where(m))
            found = await pipe.execute()
        return int(found[0])

    async def forget_session_cancels(self, session_ids: Sequence[str]) -> None:
        """Drop the session-wide cancel marks of `session_ids` (their records were tombstoned:
        the session was deleted, or the cancel is done)."""
        await self.redis.delete(*(self.keys.session_cancelled(s) for s in session_ids))

    async def save_response(self, session_id: str, message_id: str, meta: bytes) -> None:
        """Keep what an OpenAI response was asked, as long as the session's history."""
        key = self.keys.response(session_id, message_id)
        await self.redis.set(key, meta, ex=self.settings.history_ttl_s)

    async def response(self, session_id: str, message_id: str) -> bytes | None:
        value = await self.redis.get(self.keys.response(session_id, message_id))
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    async def turn(self, session_id: str, message_id: str) -> Turn | None:
        """The message's turn in the session's history (None: not there, or not ended)."""
        return next((t for t in await self.history(session_id) if t.message_id == message_id), None)

    async def message(self, session_id: str, message_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.msg(session_id, message_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    async def exists(self, session_id: str, message_id: str) -> bool:
        """Redis knows the message (a withdrawn one, never queued, is not counted)."""
        state = await self.redis.hget(self.keys.msg(session_id, message_id), "state")
        return state is not None and state != b"withdrawn"

    async def states(self, messages: Sequence[tuple[str, str]]) -> list[str | None]:
        """The state of each (session_id, message_id) (None: Redis does not know it), in one
        pipeline."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id, message_id in messages:
                pipe.hget(self.keys.msg(session_id, message_id), "state")
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
            self.keys.msg(session_id, message_id),
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
        """Queue on `pipe` (OBSERVES_QUEUED commands, the OBSERVE script's last): record a
        consumed request as queued unless it has a state already (the script's result: the
        state, or "busy:<id>" with `reject_if_busy` and an open message), and its `where`."""
        ttl = self.settings.msg_ttl_s
        args: list[Arg] = [session_id, user_id or "", now, ttl, message_id, message]
        args += ["reject" if reject_if_busy else "", self.keys.msg_prefix(session_id)]
        keys = [self.keys.msg(session_id, message_id), self.keys.open_messages(session_id)]
        self._locate(pipe, session_id, message_id)
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
            k.msg(session_id, message_id),
            k.lease(session_id, message_id),
            k.cancel(session_id, message_id),
            k.active(session_id),
            k.stream(session_id, message_id),
            k.owner(session_id),
            k.leases(k.bucket(session_id)),
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
            cancel_record_key(session_id, message_id),
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
            k.msg(session_id, message_id),
            k.lease(session_id, message_id),
            k.cancel(session_id, message_id),
            k.active(session_id),
            k.stream(session_id, message_id),
            k.leases(k.bucket(session_id)),
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
            cancel_record_key(session_id, message_id),
        ]
        raw = await self._replicated(self._finish, keys, args)
        if _s(raw[0]) == "already":
            return Finish(_s(raw[1]), "", "", already=True)
        return Finish(_s(raw[0]), _s(raw[1]), _s(raw[2]), cancel_source=_s(raw[3]))

    async def _replicated(self, script: Script, keys: list[str], args: list[Arg]) -> Any:
        """Run `script`; on a Redis Cluster (REDIS_FINISH_WAIT_MS > 0) then WAIT, on the same
        connection, until a replica has its writes or the wait is over: a failover right after
        cannot lose them (replication is asynchronous). Used for FINISH: its terminal event goes
        to Kafka next, and a FINISH lost to a failover would make the message `streaming` again
        on the promoted replica, answered a second time. A replica that does not answer in
        time costs the wait, not the message (logged)."""
        wait_ms = self.settings.redis_finish_wait_ms
        if not self.cluster or wait_ms <= 0:
            return await script(keys=keys, args=args)
        cluster = cast(Any, self.redis)
        await cluster.initialize()  # the slot map (a no-op once the client has it)
        node = cluster.get_node_from_key(keys[0])
        async with self.redis.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", 1, wait_ms, target_nodes=node)
            raw, replicas = await pipe.execute()
        if int(replicas) < 1:
            log.warning("no replica acknowledged a FINISH within %d ms", wait_ms)
        return raw

    def append(
        self,
        pipe: Pipeline,
        session_id: str,
        message_id: str,
        event: str,
        seq: int,
        data: dict[str, Any],
    ) -> None:
        """Queue one SSE event on the message's Redis Stream (batched by the caller)."""
        pipe.xadd(
            self.keys.stream(session_id, message_id),
            stream_entries.encode(event, seq, data),  # type: ignore[arg-type]
            maxlen=self.settings.stream_maxlen,
            approximate=True,
        )

    async def write(self, events: Sequence[Event], writer: str, call: int) -> list[int]:
        """Append SSE events of runs, each fenced by its run's epoch (the WRITE script), in one
        round trip: one script call for all of them (one per hash slot on a Redis Cluster).
        The answer per event, in order: -1 the run lost the message (nothing written:
        write nothing more, to Kafka neither), 1 written and a cancel is requested, 0 written.
        An event other than a `chunk` is its run's first (started, restart): it gives the
        stream its TTL while streaming. `writer` names the caller (unique per process: a sink)
        and `call` numbers its calls: the same call sent again (after a lost connection, Redis
        may have run it) with the same number writes nothing twice. A writer's calls must not
        overlap (the sink sends one at a time)."""
        k = self.keys
        s = self.settings
        groups = self._by_slot(range(len(events)), lambda i: k.bucket(events[i].session_id))
        calls: list[tuple[list[str], list[Arg]]] = []
        for indexes in groups:
            keys: list[str] = [k.wrote(writer, k.bucket(events[indexes[0]].session_id))]
            args: list[Arg] = [s.stream_maxlen, s.active_ttl_s, call]
            for i in indexes:
                e = events[i]
                keys += [
                    k.msg(e.session_id, e.message_id),
                    k.stream(e.session_id, e.message_id),
                    k.cancel(e.session_id, e.message_id),
                ]
                first = "" if e.sse_event == "chunk" else "1"
                args += [e.epoch, e.sse_event, e.seq, dumps(e.sse_data), first]
            calls.append((keys, args))
        if len(calls) == 1:
            # one call (always, on a single Redis): sent alone, not in a pipeline, which would
            # first send SCRIPT EXISTS and wait for it (a second round trip every loop tick)
            found = [await self._write(keys=calls[0][0], args=calls[0][1])]
        else:  # a Redis Cluster: one EVAL per hash slot, pipelined (no script check there)
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await self._write(keys=keys, args=args, client=pipe)
                found = await pipe.execute()
        answers = [0] * len(events)
        for indexes, group_answers in zip(groups, found, strict=True):
            for i, answer in zip(indexes, group_answers, strict=True):
                answers[i] = int(answer)
        return answers

    async def lost_runs(self, runs: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        """Of (session_id, message_id, epoch) runs, those that lost their message since: it is
        no longer `streaming` under that epoch (a message whose hash is gone is not counted
        lost)."""
        ordered = list(runs)
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id, message_id, _ in ordered:
                pipe.hmget(self.keys.msg(session_id, message_id), ["state", "epoch"])
            values = await pipe.execute()
        lost = set()
        for run, (state, epoch) in zip(ordered, values, strict=True):
            if state is not None and (_s(state) != "streaming" or _s(epoch or b"") != run[2]):
                lost.add(run)
        return lost

    async def release_leases(self, messages: Sequence[tuple[str, str]]) -> None:
        """Drop our leases of (session_id, message_id) at once (a hand-over at shutdown: the
        next owner need not wait for them to lapse). One DEL per message: a cluster refuses a
        DEL over several slots."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id, message_id in messages:
                pipe.delete(self.keys.lease(session_id, message_id))
            await pipe.execute()

    async def published(self, session_id: str, message_id: str, instance_id: str) -> None:
        """The message's terminal event is acked by Kafka: no claim publishes it again; our
        lease (kept since FINISH) is released."""
        keys = [self.keys.msg(session_id, message_id), self.keys.lease(session_id, message_id)]
        await self._published(keys=keys, args=[instance_id])

    async def refresh_leases(
        self, owned: Sequence[tuple[str, str] | tuple[str, str, str]], instance_id: str
    ) -> list[int]:
        """Extend the leases of (message_id, session_id[, epoch]) we stream (also the seed's
        active key and the message's stream TTL); returns the indexes of those we lost. One
        script per bucket (its keys share a slot), pipelined."""
        if not owned:
            return []
        k = self.keys
        groups = self._by_slot(range(len(owned)), lambda i: k.bucket(owned[i][1]))
        s = self.settings
        async with self.redis.pipeline(transaction=False) as pipe:
            for indexes in groups:
                keys: list[str] = []
                runs: list[Arg] = []
                for index in indexes:
                    entry = owned[index]
                    message_id, session_id = entry[0], entry[1]
                    keys += [k.lease(session_id, message_id), k.active(session_id)]
                    keys += [k.msg(session_id, message_id), k.stream(session_id, message_id)]
                    keys.append(k.leases(k.bucket(session_id)))
                    runs += [cancel_record_key(session_id, message_id)]
                    runs += [entry[2] if len(entry) > 2 else ""]
                args: list[Arg] = [instance_id, s.lease_ms, s.active_ttl_s, *runs]
                await self._refresh(keys=keys, args=args, client=pipe)
            found = await pipe.execute()
        lost: list[int] = []
        for indexes, lost_in_group in zip(groups, found, strict=True):
            lost += [indexes[int(i) - 1] for i in lost_in_group]
        return sorted(lost)
