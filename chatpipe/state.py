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

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT as Arg

from chatpipe.codec import dumps
from chatpipe.keys import Keys
from chatpipe.settings import Settings

FINAL_STATES = frozenset({"completed", "cancelled", "failed"})
CancelAnswer = Literal["cancelled", "repeated", "completed", "failed", "not_found", "forbidden"]

# ---------------------------------------------------------------------------------------
# Ownership (ARGV enforce = '1'): a message id another user sent, or a session whose owner
# (KEYS owner, set by the session's first message) is another user, answers 'forbidden' and
# changes nothing; otherwise the owner key is set (first message) and its TTL refreshed.
# KEYS msg owner ; ARGV session user now ttl enforce owner_ttl  ->  "ok" | "forbidden" | state
ACCEPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[5] == '1' then
  if state and redis.call('HGET', KEYS[1], 'user') ~= ARGV[2] then return 'forbidden' end
  if not state then
    local owner = redis.call('GET', KEYS[2])
    if owner and owner ~= ARGV[2] then return 'forbidden' end
  end
end
if state and state ~= 'withdrawn' then return state end
if ARGV[5] == '1' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[6]) end
-- a withdrawn id (its first POST answered 503) is the client's retry: accepted anew
if state then redis.call('HDEL', KEYS[1], 'published') end
redis.call('HSET', KEYS[1], 'state', 'queued', 'session', ARGV[1], 'user', ARGV[2],
           'created', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 'ok'
"""

# Messages whose lease lapsed, by Redis's clock (every instance agrees on it).
# KEYS leases ; ARGV limit -> message ids
LAPSED = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
"""

# The api answered 503 (Kafka did not ack in time): the request was not queued, so its record,
# if Kafka takes it late, must not be answered. A claim skips a withdrawn message (published
# '1': there is no terminal to publish); the client's retry with the same message_id is
# accepted anew (ACCEPT). Only a message no consumer has claimed (no epoch) is withdrawn.
# KEYS msg ; ARGV ttl -> 1 withdrawn | 0 not (a consumer has it already)
WITHDRAW = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'epoch') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'withdrawn', 'published', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Seen on chat.requests (also requests produced straight to Kafka by other frontends).
# KEYS msg ; ARGV session user now ttl -> state
OBSERVE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then return state end
redis.call('HSET', KEYS[1], 'state', 'queued', 'session', ARGV[1], 'user', ARGV[2],
           'created', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 'queued'
"""

# The api's cancel. KEYS msg cancel ; ARGV session ttl queued_ttl enforce user -> answer
# 'repeated': the message is cancelled already, or an earlier cancel of it was accepted (its
# flag is set again); the api publishes nothing again: a second record on chat.cancels could
# land after the tombstone and stay in the compacted topic)
CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'not_found' end
if redis.call('HGET', KEYS[1], 'session') ~= ARGV[1] then return 'not_found' end
if ARGV[4] == '1' and redis.call('HGET', KEYS[1], 'user') ~= ARGV[5] then return 'forbidden' end
if state == 'cancelled' then return 'repeated' end
if state == 'completed' or state == 'failed' then return state end
local asked = redis.call('HGET', KEYS[1], 'cancel_requested') == '1'
local ttl = ARGV[2]
if state == 'queued' then ttl = ARGV[3] end
redis.call('SET', KEYS[2], '1', 'EX', ttl)
if asked then return 'repeated' end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
return 'cancelled'
"""

# The listener's mirror of a cancel record. Unlike the api's cancel it also flags a message
# nobody has seen yet (a Spring frontend may cancel before its request is consumed).
# With ownership enforced (ARGV enforce = '1') a cancel from anyone but the message's sender
# (or, for a message not seen yet, the session's owner) changes nothing: -1.
# KEYS msg cancel owner ; ARGV ttl queued_ttl enforce user
#   -> 1 flag set | 0 message already final | -1 forbidden
MIRROR_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'completed' or state == 'failed' or state == 'cancelled' then return 0 end
if ARGV[3] == '1' then
  if ARGV[4] == '' then return -1 end
  if state then
    if redis.call('HGET', KEYS[1], 'user') ~= ARGV[4] then return -1 end
  else
    local owner = redis.call('GET', KEYS[3])
    if owner and owner ~= ARGV[4] then return -1 end
  end
end
local ttl = ARGV[2]
if state == 'streaming' then ttl = ARGV[1] end
redis.call('SET', KEYS[2], '1', 'EX', ttl)
-- the cancel also lives in the message's hash, as long as the message can be claimed (the flag
-- lapses after its TTL); a message nobody has seen yet gets a hash of just this field, which
-- its request (OBSERVE/ACCEPT) turns into a queued message that stays cancelled
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if not state then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# With ownership enforced (ARGV enforce = '1'): a request without a user, or for a message id
# another user sent, or in another user's session answers {'forbidden', why} before anything
# changes; otherwise the session's owner key is set (first message) and its TTL refreshed.
# A run's lease is also in the sorted set `leases` (its lapse time, Redis's clock), and the
# request in the message hash (`request`): a surviving instance takes over a message whose
# lease lapsed from there, without waiting for Kafka's group to move the partition
# (ai_consumer/takeover.py). FINISH removes both.
# KEYS msg lease cancel active stream owner leases
# ARGV instance lease_ms session user now msg_ttl active_ttl message_id enforce owner_ttl request
#   -> {'final', state} | {'owned', owner} | {'forbidden', why}
#      | {'republish', state, final_seq, reason, chunks}
#      | {'cancel', restart, next_seq, epoch} | {'start', restart, next_seq, epoch}
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'withdrawn' then return {'final', state} end
if state == 'completed' or state == 'failed' or state == 'cancelled' then
  -- a terminal event whose Kafka ack was never recorded (its finisher died or was stopped
  -- before it): published again by whoever claims it next, unless its finisher still holds
  -- the lease (it is publishing right now)
  local f = redis.call('HMGET', KEYS[1], 'published', 'final_seq', 'reason', 'chunks')
  if f[1] or not f[2] then return {'final', state} end
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[1] then return {'owned', holder} end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'republish', state, f[2], f[3] or '', f[4] or '0'}
end
if ARGV[9] == '1' then
  if ARGV[4] == '' then return {'forbidden', 'user'} end
  if state and (redis.call('HGET', KEYS[1], 'user') ~= ARGV[4]
                or redis.call('HGET', KEYS[1], 'session') ~= ARGV[3]) then
    return {'forbidden', 'message'}
  end
  local session_owner = redis.call('GET', KEYS[6])
  if session_owner and session_owner ~= ARGV[4] then return {'forbidden', 'session'} end
  redis.call('SET', KEYS[6], ARGV[4], 'EX', ARGV[10])
end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return {'owned', owner} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[7], t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[2], ARGV[8])
if ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'request', ARGV[11]) end
local restart = 0
if state == 'streaming' then restart = 1 end
local next_seq = 0
local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
if last[1] then
  local f = last[1][2]
  for i = 1, #f, 2 do if f[i] == 's' then next_seq = tonumber(f[i + 1]) + 1 end end
end
redis.call('HSET', KEYS[1], 'session', ARGV[3], 'user', ARGV[4], 'owner', ARGV[1])
if not state then redis.call('HSET', KEYS[1], 'created', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
-- the fencing token of this run: every write of an earlier run (an owner frozen past its
-- lease, woken after this claim) is refused from now on
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('EXPIRE', KEYS[5], ARGV[7]) end
if redis.call('EXISTS', KEYS[3]) == 1
   or redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return {'cancel', restart, next_seq, epoch}
end
redis.call('HSET', KEYS[1], 'state', 'streaming', 'started', ARGV[5])
redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[7])
return {'start', restart, next_seq, epoch}
"""

# The lease is kept (lease_ms, refreshed by the finisher) until the terminal's Kafka ack is
# recorded (PUBLISHED): a claim meanwhile waits; one after a finisher that died re-publishes.
# ARGV epoch '' : no run of ours to fence (a message failed or refused before it started).
# KEYS msg lease cancel active stream leases ; ARGV instance wanted reason seq final_ttl
#   message_id now maxlen epoch lease_ms chunks -> {final_state, reason, stream_id}
#   | {'already', state}
FINISH = """
local f = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'cancel_requested')
local state = f[1]
if state == 'completed' or state == 'failed' or state == 'cancelled' then
  return {'already', state}
end
if ARGV[9] ~= '' and state and f[2] ~= ARGV[9] then return {'already', 'fenced'} end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return {'already', 'owned:' .. owner} end
local final = ARGV[2]
local reason = ARGV[3]
if final ~= 'cancelled' and (redis.call('EXISTS', KEYS[3]) == 1 or f[3] == '1') then
  final = 'cancelled'
  reason = 'cancelled by user'
end
redis.call('HSET', KEYS[1], 'state', final, 'reason', reason, 'finished', ARGV[7],
           'final_seq', ARGV[4], 'chunks', ARGV[11])
redis.call('HDEL', KEYS[1], 'published', 'request')
redis.call('ZREM', KEYS[6], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
if redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[10])
redis.call('DEL', KEYS[3])
local data = {status = final}
if reason ~= '' then data['reason'] = reason end
local id = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'e', 'done', 's', ARGV[4],
                      'd', cjson.encode(data))
redis.call('EXPIRE', KEYS[5], ARGV[5])
return {final, reason, id}
"""

# A lease that vanished (Redis restarted empty) is taken again, unless the message went on
# without us meanwhile: a later run holds it (its epoch is not ours) or it is final (a finished
# message's lease is held only by its finisher, until its terminal is published). One another
# instance holds is lost.
# A refreshed lease's lapse time in `leases` moves with it.
# KEYS leases lease1 active1 msg1 stream1 lease2 ... ; ARGV instance lease_ms active_ttl message_id1
#   epoch1 message_id2 epoch2 ... -> lost indexes (1-based)
REFRESH = """
local lost = {}
local t = redis.call('TIME')
local lapse = t[1] * 1000 + math.floor(t[2] / 1000) + ARGV[2]
for i = 2, #KEYS, 4 do
  local n = (i + 2) / 4
  local owner = redis.call('GET', KEYS[i])
  local f = redis.call('HMGET', KEYS[i + 2], 'state', 'epoch')
  local epoch = ARGV[3 + 2 * n]
  local ours = (not f[1]) or epoch == '' or f[2] == epoch
  local final = f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled'
  if ours and (owner == ARGV[1] or (not owner and not final)) then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    if not final then
      redis.call('ZADD', KEYS[1], lapse, ARGV[2 + 2 * n])
      redis.call('EXPIRE', KEYS[i + 1], ARGV[3])
      redis.call('EXPIRE', KEYS[i + 3], ARGV[3])
    end
  else
    table.insert(lost, n)
  end
end
return lost
"""

# One SSE event of a run, fenced: written only while the message is `streaming` under this
# run's epoch (or its hash is gone: Redis lost it, the run goes on as before); the caller
# produces the event's Kafka record only after this answered >= 0. The first event of a run
# gives the stream its TTL (refreshed with the lease; FINISH sets the final one).
# A write is idempotent: `written` (the run's epoch and the last seq it wrote) makes a batch
# sent again after a lost connection (the sink retries it: Redis may have applied part of it)
# skip the events it already holds, so no chunk is in the stream twice.
# KEYS msg stream cancel ; ARGV epoch event seq data maxlen ttl
#   -> -1 lost (write refused) | 1 written, cancel requested | 0 written
WRITE = """
local f = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'cancel_requested', 'written')
if f[1] and (f[1] ~= 'streaming' or f[2] ~= ARGV[1]) then return -1 end
local again = false
if f[4] then
  local epoch, seq = string.match(f[4], '^(.*)/(%d+)$')
  again = epoch == ARGV[1] and tonumber(seq) >= tonumber(ARGV[3])
end
if not again then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[2], 's', ARGV[3], 'd', ARGV[4])
  if f[1] then redis.call('HSET', KEYS[1], 'written', ARGV[1] .. '/' .. ARGV[3]) end
end
if ARGV[6] ~= '' then redis.call('EXPIRE', KEYS[2], ARGV[6]) end
if f[3] == '1' or redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
return 0
"""

# The terminal event of a message is acked by Kafka: a later claim need not publish it again.
# KEYS msg lease ; ARGV instance
PUBLISHED = """
if redis.call('HGET', KEYS[1], 'state') then redis.call('HSET', KEYS[1], 'published', '1') end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


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

    # --- api ---------------------------------------------------------------------------
    async def accept(
        self,
        message_id: str,
        session_id: str,
        user_id: str | None,
        now: str,
        enforce: bool = False,
    ) -> str:
        """Record a new message as queued. Returns "ok", "forbidden" (`enforce`: the session or
        the message id is another user's), or the state of an existing message."""
        s = self.settings
        keys = [self.keys.msg(message_id), self.keys.owner(session_id)]
        args: list[Arg] = [
            session_id,
            user_id or "",
            now,
            s.msg_ttl_s,
            int(enforce),
            s.session_owner_ttl_s,
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

    async def withdraw(self, message_id: str) -> bool:
        """The api could not queue the request (Kafka did not ack in time): mark it so that
        its record, should Kafka take it late, is not answered (WITHDRAW). False: a consumer
        has it already (it was queued after all)."""
        keys = [self.keys.msg(message_id)]
        return bool(await self._withdraw(keys=keys, args=[self.settings.msg_ttl_s]))

    async def cancel(
        self, session_id: str, message_id: str, user_id: str | None = None, enforce: bool = False
    ) -> CancelAnswer:
        """`enforce`: only the message's sender may cancel it ("forbidden" otherwise)."""
        keys = [self.keys.msg(message_id), self.keys.cancel(session_id, message_id)]
        args: list[Arg] = [
            session_id,
            self.settings.cancel_ttl_s,
            self.settings.cancel_queued_ttl_s,
            int(enforce),
            user_id or "",
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
        self, pipe: Pipeline, session_id: str, message_id: str, user_id: str | None = None
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
        ]
        await self._mirror(keys=keys, args=args, client=pipe)

    # --- consumer ----------------------------------------------------------------------
    async def observe(
        self, pipe: Pipeline, message_id: str, session_id: str, user_id: str | None, now: str
    ) -> None:
        """Queue on `pipe`: record a consumed request as queued unless it has a state already."""
        args: list[Arg] = [session_id, user_id or "", now, self.settings.msg_ttl_s]
        await self._observe(keys=[self.keys.msg(message_id)], args=args, client=pipe)

    async def claim(
        self,
        message_id: str,
        session_id: str,
        user_id: str | None,
        instance_id: str,
        now: str,
        request: bytes = b"",
    ) -> Claim:
        """Take the message for a run. `request`: its record value, kept in Redis while it
        runs, so another instance can take it over when the lease lapses (b"": keep what is
        there)."""
        k = self.keys
        keys = [
            k.msg(message_id),
            k.lease(message_id),
            k.cancel(session_id, message_id),
            k.active(session_id),
            k.stream(message_id),
            k.owner(session_id),
            k.leases(),
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
    ) -> Finish:
        """`epoch`: the run's (Claim.epoch); a run fenced off by a later claim finishes nothing.
        "" for a message that never started a run (failed or refused before it). The lease
        stays ours until `published()`."""
        k = self.keys
        keys = [
            k.msg(message_id),
            k.lease(message_id),
            k.cancel(session_id, message_id),
            k.active(session_id),
            k.stream(message_id),
            k.leases(),
        ]
        s = self.settings
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
        ]
        raw = await self._finish(keys=keys, args=args)
        if _s(raw[0]) == "already":
            return Finish(_s(raw[1]), "", "", already=True)
        return Finish(_s(raw[0]), _s(raw[1]), _s(raw[2]))

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
