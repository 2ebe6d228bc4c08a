"""The one process launcher of the tests, and what every test that starts processes shares: a
free port and the environment builder.

A `Proc` is started with Popen (its own session, so a Ctrl-C on pytest does not reach it) and
writes its output to its own log file, so sync code (module fixtures, the fault tests that
signal, freeze and kill processes) and async tests of any event loop use it alike. Its log is
read back as lines: JSON lines as dicts, any other line as {"msg": line, "raw": True}. Waiting for
a line polls the file until a deadline, and fails at once, with the log's tail, when the process
has exited without writing it.

Users: tests/support/cluster.py (N api, M ai_consumer, cancel listeners), tests/interop/stack.py
and tests/interop/jvm.py (chatpipe and the JVM), tests/providers/procs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatpipe.settings import Settings
from tests.support.wait import WaitError, apoll, poll

ROOT = Path(__file__).resolve().parents[2]

Line = dict[str, Any]


# Ports handed out here: below the kernel's ephemeral range (32768 and up on Linux), where no
# outgoing connection takes one as its local port between `free_port()` and the process's bind
# (tests/unit/test_free_port.py), and apart from every stack's ports (9092/9093/6379, CI's
# 19092/19093/16379, the bench's 16399, the cluster stacks' 21001.., 22001.., 24092.., 29092..,
# buses 31001.., 32001..): one range per pytest-xdist worker, one for a session without xdist.
_RANGES = {
    "": range(17000, 19000),
    "gw0": range(10000, 13000),
    "gw1": range(13000, 16000),
    "gw2": range(25000, 28000),
}
_given: set[int] = set()  # this session's ports: each handed out once


def port_range(worker: str) -> range:
    """The ports of a pytest-xdist worker ("" without xdist); empty for a worker beyond gw2
    (its ports come from the kernel)."""
    return _RANGES.get(worker, range(0))


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nobody listens on right now, not handed out before in this session, from this
    worker's range below the ephemeral ports; from the kernel (bind port 0) once the range is
    used up."""
    for port in port_range(os.environ.get("PYTEST_XDIST_WORKER", "")):
        if port not in _given and _binds(port):
            _given.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        _given.add(port)
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


class ProcError(WaitError):
    """A process did not start, exited early, or did not log what was awaited in time."""


def _json(text: str) -> Line | None:
    if not text.startswith("{"):
        return None
    with contextlib.suppress(ValueError):
        item = json.loads(text)
        return item if isinstance(item, dict) else None
    return None


@dataclass
class Proc:
    """One process and its log file (stdout and stderr, or stderr apart: `merge_stderr`)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    kind: str = ""  # a chatpipe process: `python -m {kind}` (api, ai_consumer, cancel_listener)
    instance_id: str = ""
    port: int | None = None  # an api's port
    member: bool = True  # one of a Cluster's own processes (not an extra a test started)
    merge_stderr: bool = True  # False: stderr goes to log_path.with_suffix(".stderr")
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def launch(
        cls,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path | None = None,
        *,
        merge_stderr: bool = True,
    ) -> Proc:
        """Start `argv` in `cwd` (which must exist), its output in `log_path` (default
        `cwd/{name}.log`)."""
        proc = cls(
            name, argv, dict(env), log_path or cwd / f"{name}.log", merge_stderr=merge_stderr
        )
        proc.start(cwd)
        return proc

    @property
    def url(self) -> str:
        if self.port is None:
            raise ValueError(f"{self.name} is not an api process")
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Where this process serves Prometheus metrics: an api at /metrics on its own port;
        an ai_consumer or cancel_listener on the free port it picked at start (METRICS_PORT=0)
        and logged as `metrics listening on http://host:port/metrics`."""
        if self.kind == "api":
            return f"{self.url}/metrics"
        for line in self.lines():
            url = line.get("metrics_url")
            if url:
                return str(url)
        raise ProcError(f"{self.name} has not logged its metrics address\n{self.tail()}")

    def start(self, cwd: Path) -> None:
        with contextlib.ExitStack() as files:
            out = files.enter_context(self.log_path.open("ab"))
            err: Any = subprocess.STDOUT
            if not self.merge_stderr:
                err = files.enter_context(self.log_path.with_suffix(".stderr").open("ab"))
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a Ctrl-C on pytest does not reach it; stop() does
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    # --- logs ----------------------------------------------------------------------------
    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[Line]:
        """The log as dicts (JSON lines); a line that is not JSON comes as {"msg": line, "raw": True}."""
        out: list[Line] = []
        for line in self.text().splitlines():
            if not line.strip():
                continue
            item = _json(line)
            out.append(item if item is not None else {"msg": line, "raw": True})
        return out

    def json_lines(self) -> list[Line]:
        """The JSON lines of the log only (what a tool printed as data, without its noise)."""
        return [item for line in self.text().splitlines() if (item := _json(line)) is not None]

    def find(self, predicate: Callable[[Line], bool]) -> list[Line]:
        return [line for line in self.lines() if predicate(line)]

    def _first(self, predicate: Callable[[Line], bool]) -> Line | None:
        """The first line matching `predicate`; ProcError when the process has exited without
        writing one (its whole output is in the file by then)."""
        exited = self.popen is not None and self.popen.poll() is not None  # before reading
        found = self.find(predicate)
        if found:
            return found[0]
        if exited:
            raise ProcError(
                f"{self.name} exited (code {self.returncode()}) before the awaited log line:\n"
                f"{self.tail()}"
            )
        return None

    def wait_for_log(self, predicate: Callable[[Line], bool], timeout: float = 10.0) -> Line:
        """The first log line matching `predicate` (earlier lines count too), polling the file
        until `timeout`."""
        try:
            return poll(
                f"a matching log line of {self.name}", lambda: self._first(predicate), timeout
            )
        except ProcError:
            raise
        except WaitError as e:
            raise ProcError(f"{e}:\n{self.tail()}") from None

    async def log_line(self, predicate: Callable[[Line], bool], within: float = 10.0) -> Line:
        """`wait_for_log` for async tests (does not block the event loop)."""

        async def check() -> Line | None:
            return self._first(predicate)

        try:
            return await apoll(f"a matching log line of {self.name}", check, within)
        except ProcError:
            raise
        except WaitError as e:
            raise ProcError(f"{e}:\n{self.tail()}") from None

    def tail(self, n: int = 30) -> str:
        text = "\n".join(self.text().splitlines()[-n:])
        err = self.log_path.with_suffix(".stderr")
        if not self.merge_stderr and err.is_file():
            text += "\n--- stderr ---\n" + "\n".join(
                err.read_text(errors="replace").splitlines()[-n:]
            )
        return text

    # --- stopping ------------------------------------------------------------------------
    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a crash."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`. Returns the exit code."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(timeout=10)

    async def stop(self, within: float = 10.0) -> int | None:
        """`terminate` for async tests (does not block the event loop)."""
        return await asyncio.to_thread(self.terminate, within)

    async def wait_exit(self, within: float) -> int:
        """The exit code of a process that ends by itself; ProcError if it still runs after
        `within` seconds."""
        assert self.popen is not None, f"{self.name} was never started"
        try:
            return await asyncio.to_thread(self.popen.wait, within)
        except subprocess.TimeoutExpired:
            raise ProcError(
                f"{self.name} still running after {within:g}s:\n{self.tail()}"
            ) from None
