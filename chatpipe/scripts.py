"""The Redis Lua scripts of chatpipe/state.py, one file each under chatpipe/lua/: what a script
does, then its KEYS and ARGV by name, then its body (as arq/lua.py keeps its scripts).

`register` makes a script callable on a client or a pipeline. On a single Redis it is
redis-py's `Script` (EVALSHA; a pipeline loads it first). A Redis Cluster node's script cache is
its own: not replicated, empty after a restart or on a new node, and redis-py's cluster
pipeline does not load scripts. There a script is sent whole (EVAL): Redis keeps it compiled by
its SHA1, so the cost is the bytes of its text, and no failover or restart can leave a node
that answers NOSCRIPT.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.typing import EncodableT, KeyT


def load_script(name: str) -> str:
    """The text of chatpipe/lua/{name}.lua (shipped in the package)."""
    return resources.files("chatpipe").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


class Script(Protocol):
    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Any = None,
    ) -> Any: ...


class EvalScript:
    """A script sent whole with every call (EVAL), for a Redis Cluster."""

    def __init__(self, client: Redis, body: str) -> None:
        self.client = client
        self.body = body

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Any = None,
    ) -> Any:
        keys = keys or []
        target = client if client is not None else self.client
        command = target.eval(self.body, len(keys), *keys, *(args or []))
        if isinstance(target, ClusterPipeline):
            return command  # queued (a cluster pipeline queues synchronously)
        return await command


def register(redis: Redis, body: str) -> Script:
    """The script `body` as a callable for `redis` (see the module's docstring)."""
    if isinstance(redis, RedisCluster):
        return EvalScript(redis, body)
    return redis.register_script(body)
