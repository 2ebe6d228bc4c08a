"""Real chatpipe processes for the provider and operations tests, watched without sleeping.

`start(kind, settings, tmp, **env)` runs `python -m {kind}` configured only through the
environment (upper-cased settings names, as a deployment does), in a scratch directory (no
developer `.env` leaks in). A reader task follows its output (JSON log lines) into a file and
answers `await proc.line(predicate)` the moment a matching line arrives, or fails as soon as the
process exits or the deadline passes, with the log's tail in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from chatpipe.settings import Settings
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
Line = dict[str, Any]


def environment(settings: Settings, **values: object) -> dict[str, str]:
    """The process's environment: ours without inherited chatpipe settings, plus the namespace
    of `settings` and `values` (setting names, upper-cased)."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
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
    env.update({k.upper(): str(v) for k, v in base.items()})
    return env


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    url: str = ""  # an api's base URL
    lines: list[Line] = field(default_factory=list)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    async def _follow(self) -> None:
        assert self.process.stdout is not None
        with self.log_path.open("ab") as out:
            async for raw in self.process.stdout:
                out.write(raw)
                out.flush()
                try:
                    item = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    item = None
                line = item if isinstance(item, dict) else {"msg": raw.decode(errors="replace")}
                async with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        await self.process.wait()
        async with self._changed:
            self.exited.set()
            self._changed.notify_all()

    def tail(self, n: int = 25) -> str:
        return "\n".join(
            self.log_path.read_text(errors="replace").splitlines()[-n:]
            if self.log_path.exists()
            else []
        )

    async def line(self, predicate: Callable[[Line], bool], within: float = 30.0) -> Line:
        """The first log line matching `predicate` (also one already seen)."""
        seen = 0
        try:
            async with asyncio.timeout(within), self._changed:
                while True:
                    for item in self.lines[seen:]:
                        if predicate(item):
                            return item
                    seen = len(self.lines)
                    if self.exited.is_set():
                        raise AssertionError(
                            f"{self.name} exited ({self.process.returncode}):\n{self.tail()}"
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: no matching log line within {within:g}s:\n{self.tail()}"
            ) from None

    def find(self, predicate: Callable[[Line], bool]) -> list[Line]:
        return [item for item in self.lines if predicate(item)]

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await self._reader


async def start(kind: str, settings: Settings, workdir: Path, name: str, **values: object) -> Proc:
    """Start `python -m {kind}` in `workdir` (which must exist: pytest's tmp_path does)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        kind,
        env=environment(settings, instance_id=f"{settings.key_prefix}{name}", **values),
        cwd=workdir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    proc = Proc(name, process, workdir / f"{name}.log")
    proc._reader = asyncio.create_task(proc._follow(), name=f"log-{name}")
    return proc


def msg_starts(prefix: str) -> Callable[[Line], bool]:
    return lambda line: str(line.get("msg", "")).startswith(prefix)


async def start_consumer(settings: Settings, workdir: Path, name: str, **values: object) -> Proc:
    """An ai_consumer that owns every partition and has replayed the cancels topic."""
    proc = await start("ai_consumer", settings, workdir, name, **values)
    every = sorted(range(settings.topic_partitions))
    await proc.line(
        lambda line: str(line.get("msg", "")) == f"partitions assigned: {every}", within=60
    )
    await proc.line(msg_starts("replayed"), within=30)
    return proc


async def start_api(settings: Settings, workdir: Path, name: str, **values: object) -> Proc:
    """An api answering 200 on /ready. Its url is `proc.url`."""
    port = free_port()
    proc = await start(
        "api", settings, workdir, name, api_port=port, api_host="127.0.0.1", **values
    )
    proc.url = f"http://127.0.0.1:{port}"
    await proc.line(msg_starts("Uvicorn running on"), within=60)
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
