"""What every test that starts processes shares: a free port, the environment builder, and an
asyncio process launcher whose output is read line by line (tests/interop/stack.py: chatpipe and
the JVM; tests/providers/procs.py). tests/e2e/cluster.py starts its processes with Popen and a log
file instead: its fault tests signal, freeze and kill them from sync code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port nobody listens on right now (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_env(values: Mapping[str, object]) -> dict[str, str]:
    """The environment of a chatpipe process: ours, without any chatpipe setting inherited
    from the environment of the test run, plus `values` (setting names, any case) upper-cased,
    and this checkout on PYTHONPATH."""
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in values.items():
        env[key.upper()] = str(value)
    return env


class ProcError(AssertionError):
    """A process did not start, died, or something did not happen before its deadline."""


@dataclass
class Proc:
    """A subprocess whose merged stdout/stderr is read line by line into `lines` (and a file)."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    url: str = ""  # an api's base URL
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    eof: bool = False
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        merge_stderr: bool = True,
    ) -> Proc:
        # stderr merged into the lines, or (a tool whose stdout is data) into its own file
        with contextlib.ExitStack() as files:
            stderr: int | Any = asyncio.subprocess.STDOUT
            if not merge_stderr:
                stderr = files.enter_context(log_path.with_suffix(".stderr").open("ab"))
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env),
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                limit=4 * 1024 * 1024,
            )
        proc = cls(name, process, log_path)
        proc._reader = asyncio.create_task(proc._read(), name=f"read-{name}")
        return proc

    async def _read(self) -> None:
        assert self.process.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as log:
            while True:
                raw = await self.process.stdout.readline()
                async with self.changed:
                    if not raw:
                        self.eof = True
                        self.changed.notify_all()
                        return
                    line = raw.decode(errors="replace").rstrip("\n")
                    log.write(line + "\n")
                    log.flush()
                    self.lines.append(line)
                    self.changed.notify_all()

    async def wait_for(self, what: str, predicate: Callable[[str], bool], within: float) -> str:
        """The first output line matching `predicate` (earlier lines count too)."""
        seen = 0

        def found() -> str | None:
            nonlocal seen
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            return None

        async def wait() -> str:
            async with self.changed:
                while True:
                    line = found()
                    if line is not None:
                        return line
                    if self.eof:
                        raise ProcError(
                            f"{self.name} exited (code {await self.process.wait()}) before "
                            f"{what}:\n{self.tail()}"
                        )
                    await self.changed.wait()

        try:
            return await asyncio.wait_for(wait(), within)
        except TimeoutError:
            raise ProcError(f"{self.name}: no {what} within {within:g}s:\n{self.tail()}") from None

    async def wait_exit(self, within: float) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            raise ProcError(
                f"{self.name} still running after {within:g}s:\n{self.tail()}"
            ) from None
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
        return code

    def tail(self, n: int = 40) -> str:
        text = "\n".join(self.lines[-n:])
        err = self.log_path.with_suffix(".stderr")
        if err.is_file():
            text += "\n--- stderr ---\n" + "\n".join(
                err.read_text(errors="replace").splitlines()[-n:]
            )
        return text

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    async def stop(self, within: float = 10.0) -> int | None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), within)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        return self.process.returncode

    async def line(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 30.0
    ) -> dict[str, Any]:
        """The first JSON log line matching `predicate` (earlier lines count too)."""

        def matches(text: str) -> bool:
            item = _json(text)
            return item is not None and predicate(item)

        return _json(await self.wait_for("a matching log line", matches, within)) or {}

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [item for item in self.json_lines() if predicate(item)]


def _json(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    with contextlib.suppress(ValueError):
        item = json.loads(text)
        return item if isinstance(item, dict) else None
    return None
