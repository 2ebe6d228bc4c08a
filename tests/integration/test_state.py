"""The Redis state scripts (chatpipe/state.py) on a real Redis: every message reaches exactly
one final state, whoever races whom."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import pytest
from redis.asyncio import Redis

from chatpipe.keys import Keys
from chatpipe.settings import Settings
from chatpipe.state import State
from tests.support.wait import apoll

A, B = "instance-a", "instance-b"
NOW = "2024-05-01T10:00:00.000000Z"
WRITER = "sink-1"  # WRITE calls are numbered per writer (a sink)
CALLS = itertools.count(1)
# distinct lifetimes, so each TTL read back says which rule set it
TTLS = {
    "cancel_ttl_s": 60,
    "cancel_queued_ttl_s": 7200,
    "active_ttl_s": 300,
    "msg_ttl_s": 86_400,
    "final_ttl_s": 1800,
    "lease_ms": 10_000,
}


@pytest.fixture
def state(make_settings: Callable[..., Settings], redis: Redis) -> State:
    return State(redis, make_settings(**TTLS))


@pytest.fixture
def keys(state: State) -> Keys:
    return state.keys


async def queued(state: State, message_id: str = "m-1", session_id: str = "s-1") -> None:
    assert await state.accept(message_id, session_id, "u-1", NOW) == "ok"


async def streaming(
    state: State, message_id: str = "m-1", session_id: str = "s-1", owner: str = A
) -> None:
    await queued(state, message_id, session_id)
    claim = await state.claim(message_id, session_id, "u-1", owner, NOW)
    assert claim.outcome == "start"


async def append(state: State, message_id: str, seqs: range, session_id: str = "s-1") -> None:
    async with state.redis.pipeline(transaction=False) as pipe:
        for seq in seqs:
            data = {"seq": seq, "delta": f"t{seq}"}
            state.append(pipe, session_id, message_id, "chunk", seq, data)
        await pipe.execute()


StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


async def xrange(redis: Redis, key: str) -> StreamEntries:
    return cast(StreamEntries, await redis.xrange(key))


async def events(state: State, message_id: str, session_id: str = "s-1") -> list[tuple[str, int]]:
    entries = await xrange(state.redis, state.keys.stream(session_id, message_id))
    return [(f[b"e"].decode(), int(f[b"s"])) for _, f in entries]


# --- accept --------------------------------------------------------------------------------


async def test_accept_records_a_queued_message_once(state: State, redis: Redis) -> None:
    assert await state.accept("m-1", "s-1", "u-1", NOW) == "ok"
    assert await state.accept("m-1", "s-other", "u-2", NOW) == "queued"  # a retry: no overwrite
    msg = await state.message("s-1", "m-1")
    assert (msg["state"], msg["session"], msg["user"], msg["created"]) == (
        "queued",
        "s-1",
        "u-1",
        NOW,
    )
    assert 86_000 < await redis.ttl(state.keys.msg("s-1", "m-1")) <= 86_400


async def test_a_message_id_stays_the_first_sessions_across_buckets(
    state: State, redis: Redis, keys: Keys
) -> None:
    """Layout 2 keeps a message's keys in its session's bucket, so uniqueness across sessions
    rests on `where`: another session's accept of the id is refused, whatever its bucket,
    also while the first accept is between its `where` and its script."""
    other = next(f"s-{n}" for n in range(100) if keys.bucket(f"s-{n}") != keys.bucket("s-1"))
    assert await state.accept("m-1", "s-1", "u-1", NOW) == "ok"
    assert await state.accept("m-1", other, "u-1", NOW) == "queued"
    assert await state.accept("m-1", other, "u-2", NOW, enforce=True) == "forbidden"
    assert not await redis.exists(keys.msg(other, "m-1"))
    assert await state.locate("m-1") == "s-1"
    # the first accept of m-2 has written its `where`, not yet its message
    await redis.set(keys.where("m-2"), "s-1")
    assert await state.accept("m-2", other, "u-1", NOW) == "taken"
    assert await state.locate("m-2") == "s-1"


async def test_a_refused_accept_leaves_no_where(state: State, redis: Redis, keys: Keys) -> None:
    assert await state.accept("m-1", "s-1", "u-1", NOW) == "ok"
    busy = await state.accept("m-2", "s-1", "u-1", NOW, reject_if_busy=True)
    assert busy == "busy:m-1"
    assert await state.locate("m-2") is None
    assert await state.accept("m-2", "s-2", "u-1", NOW) == "ok"  # the id is free elsewhere


# --- cancel (the api's) --------------------------------------------------------------------


async def test_cancel_of_a_queued_message_flags_it_for_the_long_ttl(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state)
    assert await state.cancel("s-1", "m-1") == "cancelled"
    assert await redis.get(keys.cancel("s-1", "m-1")) == b"1"
    assert 7100 < await redis.ttl(keys.cancel("s-1", "m-1")) <= 7200
    assert await state.check_cancel_flag("s-1", "m-1")
    # every repeated click: flagged again, nothing to publish again
    assert await state.cancel("s-1", "m-1") == "repeated"
    assert 7100 < await redis.ttl(keys.cancel("s-1", "m-1")) <= 7200


async def test_cancel_of_a_streaming_message_flags_it_for_the_short_ttl(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state)
    assert await state.cancel("s-1", "m-1") == "cancelled"
    assert 0 < await redis.ttl(keys.cancel("s-1", "m-1")) <= 60


async def test_cancel_of_an_unknown_message_is_not_found_and_flags_nothing(
    state: State, redis: Redis, keys: Keys
) -> None:
    assert await state.cancel("s-1", "nobody") == "not_found"
    assert not await redis.exists(keys.cancel("s-1", "nobody"), keys.msg("s-1", "nobody"))


async def test_cancel_with_another_session_id_is_not_found(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state, "m-1", "s-1")
    assert await state.cancel("s-intruder", "m-1") == "not_found"
    assert not await redis.exists(keys.cancel("s-intruder", "m-1"), keys.cancel("s-1", "m-1"))
    assert (await state.message("s-1", "m-1"))["state"] == "queued"


async def test_cancel_of_a_finished_message_answers_its_final_state(state: State) -> None:
    await streaming(state, "m-1")
    await state.finish("m-1", "s-1", A, "completed", "", 3, NOW)
    assert await state.cancel("s-1", "m-1") == "completed"
    await streaming(state, "m-2")
    await state.finish("m-2", "s-1", A, "failed", "upstream 500", 1, NOW)
    assert await state.cancel("s-1", "m-2") == "failed"
    assert not await state.check_cancel_flag("s-1", "m-1")


# --- claim ---------------------------------------------------------------------------------


async def test_claim_starts_a_queued_message(state: State, redis: Redis, keys: Keys) -> None:
    await queued(state)
    claim = await state.claim("m-1", "s-1", "u-1", A, NOW)
    assert (claim.outcome, claim.restart, claim.next_seq) == ("start", False, 0)
    msg = await state.message("s-1", "m-1")
    assert (msg["state"], msg["owner"], msg["started"]) == ("streaming", A, NOW)
    assert await state.get_active_stream("s-1") == "m-1"  # the seed's key, for its callers
    assert 290 < await redis.ttl(keys.active("s-1")) <= 300
    assert await redis.get(keys.lease("s-1", "m-1")) == A.encode()
    assert 9000 < await redis.pttl(keys.lease("s-1", "m-1")) <= 10_000


async def test_claim_of_a_message_never_seen_starts_it(state: State) -> None:
    claim = await state.claim("m-kafka-only", "s-1", None, A, NOW)  # produced straight to Kafka
    assert claim.outcome == "start"
    assert (await state.message("s-1", "m-kafka-only"))["state"] == "streaming"


async def test_claim_when_the_flag_is_set_answers_cancel_and_never_streams(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state)
    assert await state.cancel("s-1", "m-1") == "cancelled"
    claim = await state.claim("m-1", "s-1", "u-1", A, NOW)
    assert claim.outcome == "cancel"
    assert (await state.message("s-1", "m-1"))["state"] == "queued"
    assert not await redis.exists(keys.active("s-1"))
    done = await state.finish("m-1", "s-1", A, "cancelled", "cancelled by user", 0, NOW)
    assert (done.state, done.already) == ("cancelled", False)
    assert await events(state, "m-1") == [("done", 0)]


async def test_claim_of_a_final_message_answers_final(state: State) -> None:
    await streaming(state)
    await state.finish("m-1", "s-1", A, "completed", "", 1, NOW)
    await state.published("s-1", "m-1", A)  # its terminal event is acked by Kafka
    claim = await state.claim("m-1", "s-1", "u-1", B, NOW)  # a redelivery after a rebalance
    assert (claim.outcome, claim.detail) == ("final", "completed")


async def test_claim_while_another_instance_holds_the_lease_answers_owned(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state, owner=A)
    claim = await state.claim("m-1", "s-1", "u-1", B, NOW)
    assert (claim.outcome, claim.detail) == ("owned", A)
    assert await redis.get(keys.lease("s-1", "m-1")) == A.encode()
    assert (await state.message("s-1", "m-1"))["owner"] == A


async def test_two_instances_claiming_at_once_only_one_starts(state: State) -> None:
    await queued(state)
    claims = await asyncio.gather(
        state.claim("m-1", "s-1", "u-1", A, NOW), state.claim("m-1", "s-1", "u-1", B, NOW)
    )
    assert sorted(c.outcome for c in claims) == ["owned", "start"]


async def test_claim_after_the_lease_vanished_restarts_after_the_last_seq(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state, owner=A)
    await append(state, "m-1", range(6))  # started 0 + chunks: A got to seq 5, then died
    await redis.delete(keys.lease("s-1", "m-1"))  # its lease lapsed
    claim = await state.claim("m-1", "s-1", "u-1", B, NOW)
    assert (claim.outcome, claim.restart, claim.next_seq) == ("start", True, 6)
    msg = await state.message("s-1", "m-1")
    assert (msg["state"], msg["owner"]) == ("streaming", B)
    assert await redis.get(keys.lease("s-1", "m-1")) == B.encode()


# --- finish --------------------------------------------------------------------------------


async def test_finish_is_exactly_once(state: State, redis: Redis, keys: Keys) -> None:
    await streaming(state)
    first = await state.finish("m-1", "s-1", A, "completed", "", 4, NOW)
    assert (first.state, first.already) == ("completed", False)
    assert first.stream_id
    second = await state.finish("m-1", "s-1", A, "failed", "late error", 5, NOW)
    assert (second.state, second.already) == ("completed", True)
    assert await events(state, "m-1") == [("done", 4)]  # one terminal event on the stream
    msg = await state.message("s-1", "m-1")
    assert (msg["state"], msg["finished"]) == ("completed", NOW)
    # the finisher keeps the lease until the terminal is acked by Kafka, then releases it
    assert await redis.get(keys.lease("s-1", "m-1")) == A.encode()
    await state.published("s-1", "m-1", A)
    assert not await redis.exists(keys.lease("s-1", "m-1"))
    assert 1700 < await redis.ttl(keys.msg("s-1", "m-1")) <= 1800
    assert 1700 < await redis.ttl(keys.stream("s-1", "m-1")) <= 1800


async def test_finish_failed_after_a_handler_crash_ends_the_message_after_its_last_chunk(
    state: State, redis: Redis, keys: Keys
) -> None:
    # what Handler.fail asks for when a handler crashed after chunks 1 and 2
    # (tests/unit/test_handler_crash.py): `failed`, `internal error (<Type>)`, the next seq
    await streaming(state)
    await append(state, "m-1", range(1, 3))
    done = await state.finish("m-1", "s-1", A, "failed", "internal error (KeyError)", 3, NOW)
    assert (done.state, done.reason, done.already) == ("failed", "internal error (KeyError)", False)
    msg = await state.message("s-1", "m-1")
    assert (msg["state"], msg["reason"], msg["finished"]) == (
        "failed",
        "internal error (KeyError)",
        NOW,
    )
    assert await events(state, "m-1") == [("chunk", 1), ("chunk", 2), ("done", 3)]
    fields = (await xrange(redis, keys.stream("s-1", "m-1")))[-1][1]
    assert orjson.loads(fields[b"d"]) == {"status": "failed", "reason": "internal error (KeyError)"}
    await state.published("s-1", "m-1", A)
    assert not await redis.exists(keys.lease("s-1", "m-1"))


async def test_finish_completed_while_the_flag_is_set_ends_cancelled(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state)
    assert await state.cancel("s-1", "m-1") == "cancelled"
    done = await state.finish("m-1", "s-1", A, "completed", "", 9, NOW)
    assert (done.state, done.reason) == ("cancelled", "cancelled by user")
    assert (await state.message("s-1", "m-1"))["state"] == "cancelled"
    assert not await redis.exists(keys.cancel("s-1", "m-1"))  # the flag did its work
    entries = await xrange(redis, keys.stream("s-1", "m-1"))
    fields = entries[-1][1]
    assert (fields[b"e"], fields[b"s"]) == (b"done", b"9")
    assert orjson.loads(fields[b"d"]) == {"status": "cancelled", "reason": "cancelled by user"}


async def test_cancel_racing_finish_agrees_with_the_final_state(state: State) -> None:
    for i in range(20):
        m = f"m-{i}"
        await streaming(state, m)
        answer, done = await asyncio.gather(
            state.cancel("s-1", m), state.finish(m, "s-1", A, "completed", "", 2, NOW)
        )
        # the user is told what really happened, whichever script ran first
        assert answer == done.state, (answer, done)


async def test_finish_deletes_the_active_key_only_if_it_names_this_message(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state, "m-1", "s-1")
    await redis.set(keys.active("s-1"), "m-2")  # the session's next message is streaming now
    await state.finish("m-1", "s-1", A, "completed", "", 1, NOW)
    assert await state.get_active_stream("s-1") == "m-2"
    await redis.delete(keys.lease("s-1", "m-1"))
    await streaming(state, "m-3", "s-1")
    await state.finish("m-3", "s-1", A, "completed", "", 1, NOW)
    assert await state.get_active_stream("s-1") is None


async def test_finish_by_an_instance_that_lost_the_lease_changes_nothing(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state, owner=A)
    await redis.set(keys.lease("s-1", "m-1"), B)  # B took over
    done = await state.finish("m-1", "s-1", A, "completed", "", 3, NOW)
    assert (done.state, done.already) == (f"owned:{B}", True)
    assert (await state.message("s-1", "m-1"))["state"] == "streaming"
    assert await events(state, "m-1") == []


# --- the listener's mirror -----------------------------------------------------------------


async def mirror(state: State, session_id: str, message_id: str) -> int:
    async with state.redis.pipeline(transaction=False) as pipe:
        await state.mirror_cancel(pipe, session_id, message_id)
        (result,) = await pipe.execute()
    return int(result)


async def test_mirror_cancel_flags_unknown_queued_and_streaming_messages(
    state: State, redis: Redis, keys: Keys
) -> None:
    # a Spring frontend may cancel a message whose request nobody has consumed yet
    assert await mirror(state, "s-1", "m-unknown") == 1
    assert 7100 < await redis.ttl(keys.cancel("s-1", "m-unknown")) <= 7200
    await queued(state, "m-q")
    assert await mirror(state, "s-1", "m-q") == 1
    assert 7100 < await redis.ttl(keys.cancel("s-1", "m-q")) <= 7200
    await streaming(state, "m-s")
    assert await mirror(state, "s-1", "m-s") == 1
    assert 0 < await redis.ttl(keys.cancel("s-1", "m-s")) <= 60
    # it invents no message: only the cancel, kept for when its request comes (as the flag)
    assert await redis.hgetall(keys.msg("s-1", "m-unknown")) == {
        b"cancel_requested": b"1",
        b"cancel_source": b"kafka",  # for the cancel metrics, once it ends
    }
    assert 7100 < await redis.ttl(keys.msg("s-1", "m-unknown")) <= 7200


async def test_mirror_cancel_of_a_final_message_flags_nothing(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state)
    await state.finish("m-1", "s-1", A, "completed", "", 1, NOW)
    assert await mirror(state, "s-1", "m-1") == 0
    assert not await redis.exists(keys.cancel("s-1", "m-1"))


# --- leases --------------------------------------------------------------------------------


async def test_refresh_extends_own_leases_and_active_keys(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state, "m-1", "s-1", owner=A)
    await redis.pexpire(keys.lease("s-1", "m-1"), 500)
    await redis.expire(keys.active("s-1"), 5)
    assert await state.refresh_leases([("m-1", "s-1")], A) == []
    assert 9000 < await redis.pttl(keys.lease("s-1", "m-1")) <= 10_000
    assert 290 < await redis.ttl(keys.active("s-1")) <= 300


async def test_refresh_retakes_a_vanished_lease_and_reports_one_held_by_another(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state, "m-1", "s-1", owner=A)
    await streaming(state, "m-2", "s-2", owner=A)
    await streaming(state, "m-3", "s-3", owner=A)
    await redis.delete(keys.lease("s-1", "m-1"))  # Redis restarted empty, say
    await redis.set(keys.lease("s-2", "m-2"), B)  # B took m-2 over
    owned = [("m-1", "s-1"), ("m-2", "s-2"), ("m-3", "s-3")]
    assert await state.refresh_leases(owned, A) == [1]
    assert await redis.get(keys.lease("s-1", "m-1")) == A.encode()
    assert await redis.get(keys.lease("s-2", "m-2")) == B.encode()  # not stolen back
    assert await redis.get(keys.lease("s-3", "m-3")) == A.encode()
    assert await state.refresh_leases([], A) == []


async def test_cancel_of_a_cancelled_message_is_a_repeat(state: State) -> None:
    """A click after the message ended cancelled: the same answer for the user, and the api
    publishes nothing (a cancel record after the tombstone would stay in chat.cancels)."""
    await streaming(state)
    assert await state.cancel("s-1", "m-1") == "cancelled"
    await state.finish("m-1", "s-1", A, "cancelled", "cancelled by user", 3, NOW)
    assert await state.cancel("s-1", "m-1") == "repeated"
    assert await state.cancel("s-2", "m-1") == "not_found"  # still its own session only


# --- issue 12: fencing, the terminal's Kafka ack, a cancel that outlives its flag, stream TTL --


@dataclass(frozen=True)
class Ev:
    """An SSE event as State.write takes it (the sink's Outgoing has these fields too)."""

    message_id: str
    session_id: str
    epoch: str
    seq: int
    sse_event: str = "chunk"

    @property
    def sse_data(self) -> dict[str, Any]:
        return {"seq": self.seq}


async def write(state: State, message_id: str, epoch: str, seq: int, first: bool = False) -> int:
    (answer,) = await state.write(
        [Ev(message_id, "s-1", epoch, seq, "started" if first else "chunk")],
        "one-by-one",
        next(CALLS),
    )
    return answer


async def test_one_write_call_answers_each_event_of_many_messages_in_order(
    state: State, redis: Redis, keys: Keys
) -> None:
    """The sink's batch: events of messages in different hash slots (grouped by slot on a
    Redis Cluster), two of one message in order, a lost run's refused, a cancelled one's
    written and answered 1; each answer in the place of its event."""
    sessions = [f"s-{i}" for i in range(8)]
    assert len({keys.bucket(s) for s in sessions}) > 1  # more than one slot group
    epochs = {}
    for i, s in enumerate(sessions):
        await queued(state, f"m-{i}", s)
        epochs[s] = (await state.claim(f"m-{i}", s, "u-1", A, NOW)).epoch
    await redis.delete(keys.lease("s-2", "m-2"))
    taken = await state.claim("m-2", "s-2", "u-1", B, NOW)  # m-2's run on A lost it
    assert taken.restart
    assert await state.cancel("s-3", "m-3") == "cancelled"
    batch = [Ev(f"m-{i}", s, epochs[s], 1, "started") for i, s in enumerate(sessions)]
    batch.insert(1, Ev("m-0", "s-0", epochs["s-0"], 2))  # m-0's next event, same call
    answers = await state.write(batch, WRITER, 7)
    assert answers == [0, 0, 0, -1, 1, 0, 0, 0, 0]
    assert await events(state, "m-0", "s-0") == [("started", 1), ("chunk", 2)]
    assert await events(state, "m-2", "s-2") == []
    assert await events(state, "m-3", "s-3") == [("started", 1)]
    assert 290 < await redis.ttl(keys.stream("s-5", "m-5")) <= 300
    # the same call again (a retry after a lost connection): nothing is written twice
    assert await state.write(batch, WRITER, 7) == answers
    assert await events(state, "m-0", "s-0") == [("started", 1), ("chunk", 2)]
    # another writer's call, or this writer's next one, is written
    nxt = [Ev("m-0", "s-0", epochs["s-0"], 3)]
    assert await state.write(nxt, WRITER, 8) == [0]
    assert await state.write([Ev("m-0", "s-0", epochs["s-0"], 4)], "other", 7) == [0]
    assert await events(state, "m-0", "s-0") == [
        ("started", 1),
        ("chunk", 2),
        ("chunk", 3),
        ("chunk", 4),
    ]


async def test_a_batch_write_is_one_round_trip_without_a_script_check_first(
    state: State, redis: Redis
) -> None:
    """The sink writes every loop tick: a pipeline holding a redis-py Script sends SCRIPT
    EXISTS and waits for it before the pipeline itself, a second round trip per batch (on a
    busy box, a second wait for the CPU). WRITE is sent alone (EVALSHA; redis-py loads it
    when Redis answers NOSCRIPT, after a restart or SCRIPT FLUSH)."""
    await queued(state)
    run = await state.claim("m-1", "s-1", "u-1", A, NOW)

    async def script_checks() -> int:
        stats: dict[str, Any] = await redis.info("commandstats")
        return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))

    assert await write(state, "m-1", run.epoch, 1, first=True) == 0
    before = await script_checks()
    for seq in range(2, 6):
        assert await write(state, "m-1", run.epoch, seq) == 0
    assert await script_checks() == before
    assert await events(state, "m-1") == [("started", 1)] + [("chunk", s) for s in range(2, 6)]


async def test_a_run_taken_over_writes_nothing_more_and_cannot_refresh_or_finish(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state)
    first = await state.claim("m-1", "s-1", "u-1", A, NOW)
    assert await write(state, "m-1", first.epoch, 1, first=True) == 0
    await redis.delete(keys.lease("s-1", "m-1"))  # A froze past its lease
    second = await state.claim("m-1", "s-1", "u-1", B, NOW)
    assert (second.outcome, second.restart) == ("start", True)
    assert second.epoch != first.epoch
    assert await write(state, "m-1", first.epoch, 2) == -1  # A woke: refused
    assert await write(state, "m-1", second.epoch, 2) == 0
    assert await state.refresh_leases([("m-1", "s-1", first.epoch)], A) == [0]
    late = await state.finish("m-1", "s-1", A, "completed", "", 9, NOW, epoch=first.epoch)
    assert late.already
    done = await state.finish("m-1", "s-1", B, "completed", "", 3, NOW, epoch=second.epoch)
    assert not done.already
    await state.published("s-1", "m-1", B)
    # the message is final and its lease released: A's refresh must not take it again, nor
    # may A write
    assert await state.refresh_leases([("m-1", "s-1", first.epoch)], A) == [0]
    assert not await redis.exists(keys.lease("s-1", "m-1"))
    assert await write(state, "m-1", second.epoch, 4) == -1
    assert await events(state, "m-1") == [("started", 1), ("chunk", 2), ("done", 3)]


async def test_a_terminal_never_acked_by_kafka_is_published_again_by_the_next_claim(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state)
    run = await state.claim("m-1", "s-1", "u-1", A, NOW)
    await state.finish("m-1", "s-1", A, "failed", "upstream", 7, NOW, epoch=run.epoch, chunks=5)
    # A is publishing (its lease is kept): a redelivery elsewhere waits for it
    assert (await state.claim("m-1", "s-1", "u-1", B, NOW)).outcome == "owned"
    await redis.delete(keys.lease("s-1", "m-1"))  # A died before Kafka acked the terminal
    claim = await state.claim("m-1", "s-1", "u-1", B, NOW)
    assert (claim.outcome, claim.detail, claim.next_seq, claim.reason, claim.chunks) == (
        "republish",
        "failed",
        7,
        "upstream",
        5,
    )
    await state.published("s-1", "m-1", B)
    assert (await state.claim("m-1", "s-1", "u-1", B, NOW)).outcome == "final"


async def test_a_cancel_outlives_its_flag_for_as_long_as_the_message_can_be_claimed(
    state: State, redis: Redis, keys: Keys
) -> None:
    await streaming(state)
    assert await state.cancel("s-1", "m-1") == "cancelled"
    await redis.delete(keys.cancel("s-1", "m-1"))  # CANCEL_TTL_S passed
    await redis.delete(keys.lease("s-1", "m-1"))  # and its owner died
    claim = await state.claim("m-1", "s-1", "u-1", B, NOW)  # the takeover
    assert claim.outcome == "cancel"
    # and so does FINISH
    done = await state.finish("m-1", "s-1", B, "completed", "", 1, NOW, epoch=claim.epoch)
    assert done.state == "cancelled"


async def test_a_kafka_only_cancel_before_its_request_outlives_its_flag(
    state: State, redis: Redis, keys: Keys
) -> None:
    assert await mirror(state, "s-1", "m-1") == 1  # the cancel came before its request
    await redis.delete(keys.cancel("s-1", "m-1"))  # its flag lapsed
    async with redis.pipeline(transaction=False) as pipe:
        await state.observe(pipe, "m-1", "s-1", "u-1", NOW)
        await pipe.execute()
    assert (await state.message("s-1", "m-1"))["state"] == "queued"
    assert 86_300 < await redis.ttl(keys.msg("s-1", "m-1")) <= 86_400
    assert (await state.claim("m-1", "s-1", "u-1", A, NOW)).outcome == "cancel"


async def test_a_streaming_cancel_is_seen_by_the_next_write(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state)
    run = await state.claim("m-1", "s-1", "u-1", A, NOW)
    assert await write(state, "m-1", run.epoch, 1) == 0
    assert await state.cancel("s-1", "m-1") == "cancelled"
    await redis.delete(keys.cancel("s-1", "m-1"))
    assert await write(state, "m-1", run.epoch, 2) == 1


async def test_a_streaming_message_stream_has_a_ttl_from_its_first_event(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state)
    run = await state.claim("m-1", "s-1", "u-1", A, NOW)
    assert await write(state, "m-1", run.epoch, 0, first=True) == 0
    assert 290 < await redis.ttl(keys.stream("s-1", "m-1")) <= 300  # an abandoned one lapses
    await redis.expire(keys.stream("s-1", "m-1"), 10)
    assert await state.refresh_leases([("m-1", "s-1", run.epoch)], A) == []
    assert 290 < await redis.ttl(keys.stream("s-1", "m-1")) <= 300  # refreshed with the lease


async def test_a_withdrawn_message_is_skipped_by_a_claim_and_its_retry_is_accepted_anew(
    state: State,
) -> None:
    """The api answered 503 (Kafka did not ack in time) and withdrew the message: a record
    Kafka took late is not answered; the client's retry with the same message_id is."""
    await queued(state)
    assert await state.withdraw("m-1", "s-1")
    assert not await state.exists("s-1", "m-1")  # its stream URL answers 404
    late = await state.claim("m-1", "s-1", "u-1", A, NOW)
    assert (late.outcome, late.detail) == ("final", "withdrawn")
    assert await state.accept("m-1", "s-1", "u-1", NOW) == "ok"  # the retry
    assert (await state.claim("m-1", "s-1", "u-1", A, NOW)).outcome == "start"
    assert (await state.claim("m-1", "s-1", "u-1", B, NOW)).outcome == "owned"  # one answer


async def test_a_message_a_consumer_has_is_not_withdrawn(state: State) -> None:
    await queued(state)
    await state.claim("m-1", "s-1", "u-1", A, NOW)  # Kafka had it after all
    assert not await state.withdraw("m-1", "s-1")
    assert (await state.message("s-1", "m-1"))["state"] == "streaming"


async def test_a_lapsed_lease_is_found_with_its_request_and_leaves_the_set_when_finished(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """ai_consumer/takeover.py's view: a run's lease lapses (its owner died): the message is
    listed with the request it ran, a surviving instance claims it with a new epoch (fencing
    the dead one), and once it is finished nothing is left to take over."""
    state = State(redis, make_settings(**{**TTLS, "lease_ms": 200}))
    await queued(state)
    request = b'{"message_id": "m-1", "session_id": "s-1", "message": "hi"}'
    first = await state.claim("m-1", "s-1", "u-1", A, NOW, request)
    assert first.outcome == "start"
    assert await state.lapsed(10) == []  # A's lease runs

    async def lapsed() -> list[tuple[str, str]] | None:
        return await state.lapsed(10) or None

    assert await apoll("A's lease to lapse", lapsed, within=5) == [("s-1", "m-1")]
    assert await state.takeover_request("s-1", "m-1") == request
    taken = await state.claim("m-1", "s-1", "u-1", B, NOW)  # the request is kept as it was
    assert (taken.outcome, taken.restart) == ("start", True)
    assert taken.epoch != first.epoch
    assert await state.lapsed(10) == []  # B's lease runs
    await state.finish("m-1", "s-1", B, "completed", "", 3, NOW, epoch=taken.epoch)
    assert await state.takeover_request("s-1", "m-1") is None
    assert await redis.zcard(state.keys.leases(state.keys.bucket("s-1"))) == 0
    assert "request" not in await state.message("s-1", "m-1")


async def test_a_sessions_open_messages_are_its_queued_and_streaming_ones(state: State) -> None:
    await queued(state, "m-1")
    await queued(state, "m-2")
    await queued(state, "m-3", session_id="s-other")
    run = await state.claim("m-1", "s-1", "u-1", A, NOW)
    assert await state.open_messages("s-1") == [("m-1", "streaming"), ("m-2", "queued")]
    await state.finish("m-1", "s-1", A, "completed", "", 3, NOW, epoch=run.epoch)
    assert await state.open_messages("s-1") == [("m-2", "queued")]
    assert await state.withdraw("m-2", "s-1")
    assert await state.open_messages("s-1") == []
    assert await state.open_messages("s-other") == [("m-3", "queued")]


async def test_if_busy_reject_names_the_open_message_and_queues_nothing(
    state: State, redis: Redis, keys: Keys
) -> None:
    await queued(state, "m-1")
    answer = await state.accept("m-2", "s-1", "u-1", NOW, reject_if_busy=True)
    assert answer == "busy:m-1"
    assert not await redis.exists(keys.msg("s-1", "m-2"))
    assert await state.accept("m-2", "s-other", "u-1", NOW, reject_if_busy=True) == "ok"
    await redis.delete(keys.msg("s-1", "m-1"))  # gone (expired): the session is not busy any more
    assert await state.accept("m-3", "s-1", "u-1", NOW, reject_if_busy=True) == "ok"
    assert await state.open_messages("s-1") == [("m-3", "queued")]


async def test_finish_appends_the_turn_to_the_sessions_history_once(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    state = State(redis, make_settings(**TTLS, history_max_turns=2, history_max_chars=5))
    for n in range(3):
        m = f"m-{n}"
        assert await state.accept(m, "s-1", "u-1", NOW, message=f"q{n}") == "ok"
        assert (await state.message("s-1", m))["message"] == f"q{n}"  # shown while queued
        assert (await state.claim(m, "s-1", "u-1", A, NOW)).outcome == "start"
        fin = await state.finish(
            m, "s-1", A, "completed", "", 3, NOW, message=f"q{n}", answer="abcdefg"
        )
        assert fin.state == "completed"
        again = await state.finish(
            m, "s-1", A, "completed", "", 3, NOW, message=f"q{n}", answer="x"
        )
        assert again.already
        assert "message" not in await state.message("s-1", m)  # the turn holds it now
    turns = await state.history("s-1")
    assert [(t.message_id, t.message, t.answer, t.status, t.truncated) for t in turns] == [
        ("m-1", "q1", "abcde", "completed", True),  # the oldest was dropped; answers cut at 5
        ("m-2", "q2", "abcde", "completed", True),
    ]
    assert turns[0].created_at == NOW
    assert turns[0].chunks == 0
    assert 0 < await redis.ttl(state.keys.history("s-1")) <= state.settings.history_ttl_s


async def test_a_refused_request_leaves_no_turn_and_history_off_keeps_none(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    state = State(redis, make_settings(**TTLS))
    await state.finish("m-x", "s-2", A, "failed", "forbidden", 0, NOW)  # message "": no turn
    assert await state.history("s-2") == []
    off = State(redis, make_settings(**TTLS, history_max_turns=0))
    await off.finish("m-y", "s-2", A, "completed", "", 0, NOW, message="q", answer="a")
    assert await redis.exists(off.keys.history("s-2")) == 0


async def test_the_answer_so_far_restarts_with_a_takeover(state: State) -> None:
    await streaming(state)
    await append(state, "m-1", range(1, 3))
    assert await state.answer_so_far("s-1", "m-1") == "t1t2"
    async with state.redis.pipeline(transaction=False) as pipe:
        state.append(pipe, "s-1", "m-1", "restart", 3, {"seq": 3})
        await pipe.execute()
    await append(state, "m-1", range(4, 5))
    assert await state.answer_so_far("s-1", "m-1") == "t4"


async def test_who_handled_a_message_is_recorded_without_recreating_a_gone_one(
    state: State, redis: Redis
) -> None:
    await streaming(state)
    await state.served("s-1", "m-1", "api-2")
    assert await state.cancel("s-1", "m-1", instance_id="api-1") == "cancelled"
    assert await state.cancel("s-1", "m-1", instance_id="api-3") == "repeated"
    fields = await state.message("s-1", "m-1")
    assert (fields["served_by"], fields["cancelled_by"], fields["owner"]) == ("api-2", "api-1", A)
    await state.served("s-1", "m-gone", "api-2")  # its state expired: no key without a TTL appears
    assert await redis.exists(state.keys.msg("s-1", "m-gone")) == 0


class ClaimedMidStop(State):
    """A State whose session mark is followed at once by a consumer's claim of `message_id`:
    the interleaving a busy box produces now and then (CI saw it, counted `session` for an
    interrupt), made certain."""

    message_id = "m-1"

    async def cancel_session_before(
        self, session_id: str, before: str, user_id: str | None, enforce: bool
    ) -> bool:
        marked = await super().cancel_session_before(session_id, before, user_id, enforce)
        claim = await self.claim(self.message_id, session_id, "u-1", B, NOW, created=NOW)
        assert claim.outcome == "cancel", claim
        return marked


async def test_a_stop_counts_its_source_also_for_a_message_claimed_while_it_stops(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    state = ClaimedMidStop(redis, make_settings(**TTLS))
    await queued(state, "m-1")
    later = "2024-05-01T10:00:01.000000Z"
    assert await state.stop_session("s-1", later, None, False, "interrupt") is not None
    msg = await state.message("s-1", "m-1")
    assert msg.get("cancel_source") == "interrupt", msg
