"""Real chatpipe processes for the provider and operations tests.

`start(kind, settings, tmp, **env)` runs `python -m {kind}` (a `Proc` of tests/support/procs.py)
configured only through the environment (upper-cased settings names, as a deployment does), in
a scratch directory (no developer `.env` leaks in). `await proc.log_line(predicate)` polls its
JSON log lines until a matching one is there, or fails as soon as the process exits or the
deadline passes, with the log's tail in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from chatpipe.settings import Settings
from tests.support.procs import Proc, free_port, process_env

Line = dict[str, Any]


def environment(settings: Settings, **values: object) -> dict[str, str]:
    """The process's environment: ours without inherited chatpipe settings, plus the namespace
    of `settings` and `values` (setting names)."""
    base: dict[str, object] = {
        "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
        "redis_url": settings.redis_url,
        "topic_prefix": settings.topic_prefix,
        "key_prefix": settings.key_prefix,
        "consumer_group": settings.consumer_group,
        "topic_partitions": settings.topic_partitions,
        "log_format": "json",
        "log_level": "INFO",
        "shutdown_grace_s": 1,
    }
    base.update(values)
    return process_env(base)


def start(kind: str, settings: Settings, workdir: Path, name: str, **values: object) -> Proc:
    """Start `python -m {kind}` in `workdir` (which must exist: pytest's tmp_path does)."""
    env = environment(settings, instance_id=f"{settings.key_prefix}{name}", **values)
    proc = Proc.launch(name, [sys.executable, "-m", kind], env, workdir)
    proc.kind = kind
    return proc


def msg_starts(prefix: str) -> Callable[[Line], bool]:
    return lambda line: str(line.get("msg", "")).startswith(prefix)


async def start_consumer(settings: Settings, workdir: Path, name: str, **values: object) -> Proc:
    """An ai_consumer that owns every partition and has replayed the cancels topic."""
    proc = start("ai_consumer", settings, workdir, name, **values)
    every = sorted(range(settings.topic_partitions))
    await proc.log_line(
        lambda line: str(line.get("msg", "")) == f"partitions assigned: {every}", within=60
    )
    await proc.log_line(msg_starts("replayed"), within=30)
    return proc


async def start_api(settings: Settings, workdir: Path, name: str, **values: object) -> Proc:
    """An api answering 200 on /ready. Its url is `proc.url`."""
    port = free_port()
    proc = start("api", settings, workdir, name, api_port=port, api_host="127.0.0.1", **values)
    proc.port = port  # proc.url
    await proc.log_line(msg_starts("Uvicorn running on"), within=60)
    # listening and (normally) ready; Kafka's first metadata answer may still be on its way
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            ready = await client.get(f"{proc.url}/ready")
            if ready.status_code == 200:
                return proc
            if loop.time() > deadline:
                raise AssertionError(f"{name} not ready: {ready.text}\n{proc.tail()}")
            await asyncio.sleep(0.1)  # sleep-ok: a poll interval with a deadline, as the brief asks


@contextlib.asynccontextmanager
async def stopping(*procs: Proc) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
