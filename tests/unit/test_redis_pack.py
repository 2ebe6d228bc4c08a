"""Commands packed by hiredis (chatpipe/redis_pack.py) are byte for byte what redis-py's own
asyncio packer sends, and what that packer refuses is refused too (DataError)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from chatpipe.redis_pack import HiredisPacking, use_hiredis_packing

COMMANDS: list[tuple[Any, ...]] = [
    ("XADD", "p:chat:stream:m-1", "MAXLEN", "~", 10_000, "*", "e", "chunk", "s", 12, "d", b"{}"),
    ("SET", "k", 1.5),
    ("SET", "k", -3),
    ("SET", "k", 2**70),
    ("SET", "ké", "vä ü"),
    ("SET", "k", 0.1),
    ("SET", "k", bytearray(b"x")),
    ("SET", "k", memoryview(b"y")),
    ("CONFIG GET", "maxmemory"),
    (b"SCRIPT EXISTS", b"abc"),
    ("XREAD", "COUNT", 1000, "BLOCK", 10_000, "STREAMS", *[f"s{i}" for i in range(200)]),
]


class Fast(HiredisPacking, Connection):
    pass


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_same_bytes_as_redis_py(command: tuple[Any, ...]) -> None:
    assert b"".join(Fast().pack_command(*command)) == b"".join(Connection().pack_command(*command))


@pytest.mark.parametrize("value", [None, True])
def test_what_redis_py_refuses_is_refused(value: Any) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        Fast().pack_command("SET", "k", value)


def test_a_pool_packs_with_hiredis_and_keeps_its_connection_class() -> None:
    pool = BlockingConnectionPool.from_url("rediss://localhost:6390/0")
    base = pool.connection_class
    use_hiredis_packing(pool)
    use_hiredis_packing(pool)  # idempotent
    assert issubclass(pool.connection_class, HiredisPacking)
    assert issubclass(pool.connection_class, base)  # TLS stays TLS
    assert pool.connection_class.__mro__[2] is base
