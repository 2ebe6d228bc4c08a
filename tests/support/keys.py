"""Redis keys of a message the test knows by its id alone: its session from `where`
(chatpipe/keys.py, layout 2), as the api finds it."""

from __future__ import annotations

from redis.asyncio import Redis

from chatpipe.keys import Keys


async def session_of(redis: Redis, keys: Keys, message_id: str) -> str:
    value = await redis.get(keys.where(message_id))
    assert value is not None, f"Redis has no `where` of message {message_id}"
    return value.decode() if isinstance(value, bytes) else str(value)


async def msg_key(redis: Redis, keys: Keys, message_id: str) -> str:
    """The key of the message's state hash."""
    return keys.msg(await session_of(redis, keys, message_id), message_id)


async def stream_key(redis: Redis, keys: Keys, message_id: str) -> str:
    """The key of the message's event stream."""
    return keys.stream(await session_of(redis, keys, message_id), message_id)


async def msg_keys(redis: Redis, keys: Keys, message_ids: list[str]) -> list[str | None]:
    """The state hash key of each message, in one round trip (None: Redis does not know the
    message yet, as one produced straight to Kafka before a consumer took it)."""
    async with redis.pipeline(transaction=False) as pipe:
        for m in message_ids:
            pipe.get(keys.where(m))
        sessions = await pipe.execute()
    return [
        None if s is None else keys.msg(s.decode() if isinstance(s, bytes) else str(s), m)
        for m, s in zip(message_ids, sessions, strict=True)
    ]
