"""Ownership in the Redis scripts (chatpipe/state.py) on a real Redis: a session belongs to the
user who sent its first message; another user's chat, cancel or Kafka record changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from chatpipe.settings import Settings
from chatpipe.state import State

NOW = "2024-05-01T10:00:00.000000Z"


@pytest.fixture
def state(make_settings: Callable[..., Settings], redis: Redis) -> State:
    return State(redis, make_settings(enforce_ownership=True, session_owner_ttl_s=500))


@pytest.fixture
def open_state(make_settings: Callable[..., Settings], redis: Redis) -> State:
    return State(redis, make_settings())


async def snapshot(redis: Redis, prefix: str) -> dict[bytes, object]:
    out: dict[bytes, object] = {}
    async for key in redis.scan_iter(match=f"{prefix}*"):
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = await redis.hgetall(key)
        elif kind == b"set":  # a session's open messages
            out[key] = await redis.smembers(key)
        else:
            out[key] = await redis.get(key)
    return out


async def test_the_first_sender_owns_the_session(state: State, redis: Redis) -> None:
    assert await state.accept("m1", "s1", "alice", NOW, enforce=True) == "ok"
    assert await state.session_owner("s1") == "alice"
    assert 0 < await redis.ttl(state.keys.owner("s1")) <= 500
    assert await state.accept("m2", "s1", "alice", NOW, enforce=True) == "ok"

    before = await snapshot(redis, state.settings.key_prefix)
    assert await state.accept("m3", "s1", "bob", NOW, enforce=True) == "forbidden"
    assert await state.accept("m1", "s-bob", "bob", NOW, enforce=True) == "forbidden"  # A's id
    assert await state.cancel("s1", "m1", "bob", enforce=True) == "forbidden"
    assert await state.cancel("s1", "m1", None, enforce=True) == "forbidden"
    assert await snapshot(redis, state.settings.key_prefix) == before, "bob changed something"

    assert await state.cancel("s1", "m1", "alice", enforce=True) == "cancelled"
    assert await state.accept("m1", "s1", "alice", NOW, enforce=True) == "queued"  # 409 path


async def test_without_enforcement_nothing_is_owned(open_state: State) -> None:
    assert await open_state.accept("m1", "s1", "alice", NOW) == "ok"
    assert await open_state.session_owner("s1") is None
    assert await open_state.accept("m2", "s1", "bob", NOW) == "ok"
    assert await open_state.cancel("s1", "m1") == "cancelled"


async def mirror(state: State, session: str, message: str, user: str | None) -> int:
    async with state.redis.pipeline(transaction=False) as pipe:
        await state.mirror_cancel(pipe, session, message, user)
        (result,) = await pipe.execute()
    return int(result)


async def test_kafka_cancels_from_another_user_set_no_flag(state: State, redis: Redis) -> None:
    await state.accept("m1", "s1", "alice", NOW, enforce=True)
    flag = state.keys.cancel("s1", "m1")
    assert await mirror(state, "s1", "m1", "bob") == -1
    assert await mirror(state, "s1", "m1", None) == -1  # no user_id: nobody's to cancel
    assert not await redis.exists(flag)
    # a cancel before its request was seen: checked against the session's owner
    assert await mirror(state, "s1", "m-later", "bob") == -1
    assert await mirror(state, "s1", "m-later", "alice") == 1
    assert await mirror(state, "s1", "m1", "alice") == 1
    assert await redis.exists(flag)


async def test_kafka_requests_are_claimed_only_by_the_session_owner(
    state: State, redis: Redis
) -> None:
    await state.accept("m1", "s1", "alice", NOW, enforce=True)
    pipe_args = [("m-bob", "s1", "bob"), ("m-anon", "s1", None)]
    async with redis.pipeline(transaction=False) as pipe:
        for message, session, user in pipe_args:
            await state.observe(pipe, message, session, user, NOW)
        await pipe.execute()

    assert (await state.claim("m-bob", "s1", "bob", "i1", NOW)).detail == "session"
    assert (await state.claim("m-anon", "s1", None, "i1", NOW)).detail == "user"
    hijack = await state.claim("m1", "s1", "bob", "i1", NOW)  # bob replays alice's record
    assert (hijack.outcome, hijack.detail) == ("forbidden", "message")
    assert await state.message("s1", "m1") == {
        "state": "queued",
        "session": "s1",
        "user": "alice",
        "created": NOW,
    }
    assert not await redis.exists(state.keys.lease("s1", "m1"))

    assert (await state.claim("m1", "s1", "alice", "i1", NOW)).outcome == "start"
    # a session first seen on Kafka is owned by that record's user
    assert (await state.claim("m-new", "s-new", "carol", "i1", NOW)).outcome == "start"
    assert await state.session_owner("s-new") == "carol"
