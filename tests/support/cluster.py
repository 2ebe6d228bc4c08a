"""Real chatpipe processes for end-to-end tests: N api, M ai_consumer, 1 cancel_listener.

Every process is configured only through the environment (the settings field names upper-cased,
as a deployment does), logs JSON lines to its own file, and runs with a scratch working
directory (so a developer's `.env` does not leak in). `wait_ready()` polls with a deadline until
the apis answer /ready, the consumer group has settled over every partition and the cancel
listeners have replayed the compacted topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from chatpipe.settings import Settings
from tests.support.procs import free_port, process_env

ROOT = Path(__file__).resolve().parents[2]
Kind = Literal["api", "ai_consumer", "cancel_listener"]
T = TypeVar("T")

ASSIGNED = "partitions assigned: "
REVOKED = "partitions revoked: "
REPLAYED = "replayed"


class ClusterError(AssertionError):
    """A process did not start, exited early or did not become ready in time."""


def new_session() -> str:
    """A session id of its own for one chat (no other test's session shares it)."""
    return f"s-{uuid.uuid4().hex[:12]}"


def poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Call `check` until it returns something other than None; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise ClusterError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)  # sleep-ok: poll interval, nothing to wait on


def parse_partitions(msg: str) -> set[int]:
    """`partitions assigned: [0, 3, 6]` (or `revoked: [..] (...)`) -> {0, 3, 6}."""
    found = re.search(r"\[[\d, ]*\]", msg)
    if found is None:
        raise ValueError(f"no partition list in {msg!r}")
    return {int(p) for p in json.loads(found.group(0))}


async def apoll(
    what: str,
    check: Callable[[], Awaitable[T | None]],
    within: float,
    interval: float = 0.05,
) -> T:
    """Async `poll`: await `check()` until it returns something other than None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result is not None:
            return result
        if loop.time() >= deadline:
            raise ClusterError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)  # sleep-ok: poll interval, nothing to wait on


@dataclass
class Proc:
    """One chatpipe process and its log file."""

    name: str
    kind: Kind
    instance_id: str
    env: dict[str, str]
    log_path: Path
    port: int | None = None
    member: bool = True  # one of the cluster's own processes (not an extra a test started)
    popen: subprocess.Popen[bytes] | None = None

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
        raise ClusterError(f"{self.name} has not logged its metrics address\n{self.tail()}")

    def start(self, cwd: Path) -> None:
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.kind],
                env=self.env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
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

    def lines(self) -> list[dict[str, Any]]:
        """The log as dicts (JSON lines); a line that is not JSON comes as {"msg": line, "raw": True}."""
        out: list[dict[str, Any]] = []
        for line in self.text().splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            out.append(item if isinstance(item, dict) else {"msg": line, "raw": True})
        return out

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [line for line in self.lines() if predicate(line)]

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first log line matching `predicate`, polling the file until `timeout`."""

        def check() -> dict[str, Any] | None:
            found = self.find(predicate)
            return found[0] if found else None

        return poll(f"a matching log line of {self.name}", check, timeout)

    async def log_line(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 10.0
    ) -> dict[str, Any]:
        """`wait_for_log` for async tests (does not block the event loop)."""

        async def check() -> dict[str, Any] | None:
            found = self.find(predicate)
            return found[0] if found else None

        return await apoll(f"a matching log line of {self.name}", check, within)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-n:])

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


@dataclass
class Cluster:
    """`apis` api processes, `consumers` ai_consumer processes and one cancel_listener, all in
    the namespace of `settings` (topic prefix, key prefix, consumer group)."""

    settings: Settings
    workdir: Path
    apis: int = 2
    consumers: int = 3
    listener: bool = True
    env: dict[str, object] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    # --- building --------------------------------------------------------------------------
    def base_values(self) -> dict[str, object]:
        s = self.settings
        values: dict[str, object] = {
            "kafka_bootstrap_servers": s.kafka_bootstrap_servers,
            "redis_url": s.redis_url,
            "topic_prefix": s.topic_prefix,
            "key_prefix": s.key_prefix,
            "consumer_group": s.consumer_group,
            "topic_partitions": s.topic_partitions,
            "api_host": "127.0.0.1",
            "metrics_port": 0,  # ai_consumer / cancel_listener: a free port, see metrics_url
            "log_format": "json",
            "log_level": "INFO",
            "shutdown_grace_s": 2,
        }
        values.update(self.env)
        return values

    def make_proc(
        self, kind: Kind, name: str, overrides: Mapping[str, object] | None = None
    ) -> Proc:
        values = self.base_values()
        instance_id = f"{self.settings.key_prefix.rstrip(':')}-{name}"
        values["instance_id"] = instance_id
        port = None
        if kind == "api":
            port = free_port()
            values["api_port"] = port
        values.update(overrides or {})
        if kind == "api":
            port = int(str(values["api_port"]))
        self.workdir.mkdir(parents=True, exist_ok=True)
        return Proc(
            name=name,
            kind=kind,
            instance_id=str(values["instance_id"]),
            env=process_env(values),
            log_path=self.workdir / f"{name}.log",
            port=port,
        )

    def spawn(
        self,
        kind: Kind,
        name: str,
        overrides: Mapping[str, object] | None = None,
        *,
        member: bool = False,
    ) -> Proc:
        """Start one more process in this namespace; it is stopped with the cluster. Extras
        (member=False) do not count for readiness nor in `api_procs` / `consumer_procs`."""
        proc = self.make_proc(kind, name, overrides)
        proc.member = member
        proc.start(self.workdir)
        self.procs.append(proc)
        return proc

    def start(self) -> Cluster:
        for i in range(1, self.apis + 1):
            self.spawn("api", f"api-{i}", member=True)
        for i in range(1, self.consumers + 1):
            self.spawn("ai_consumer", f"ai-{i}", member=True)
        if self.listener:
            self.spawn("cancel_listener", "listener-1", member=True)
        return self

    # --- views -----------------------------------------------------------------------------
    def of_kind(self, kind: Kind) -> list[Proc]:
        return [p for p in self.procs if p.kind == kind and p.member]

    @property
    def api_procs(self) -> list[Proc]:
        return self.of_kind("api")

    @property
    def consumer_procs(self) -> list[Proc]:
        return self.of_kind("ai_consumer")

    @property
    def listener_procs(self) -> list[Proc]:
        return self.of_kind("cancel_listener")

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.api_procs]

    def by_instance(self, instance_id: str) -> Proc:
        for p in self.procs:
            if p.instance_id == instance_id:
                return p
        raise KeyError(instance_id)

    def diagnostics(self, n: int = 15) -> str:
        parts = []
        for p in self.procs:
            state = "running" if p.alive() else f"exited {p.returncode()}"
            parts.append(f"--- {p.name} ({state}, {p.log_path}):\n{p.tail(n)}")
        return "\n".join(parts)

    # --- readiness ---------------------------------------------------------------------------
    def _respawn_on_port_clash(self, proc: Proc) -> bool:
        """An api that lost its port to another process between `free_port()` and its bind
        (the port was free when we looked): start it again on another port."""
        if proc.kind != "api" or "address already in use" not in proc.text().lower():
            return False
        if proc.name.count("~") >= 3:
            return False
        self.retire(proc)
        self.procs.remove(proc)
        replacement = self.make_proc("api", proc.name + "~", {"instance_id": proc.instance_id})
        replacement.member = True
        replacement.start(self.workdir)
        self.procs.append(replacement)
        return True

    def _check_alive(self) -> None:
        dead = [p for p in self.procs if p.member and not p.alive()]
        dead = [p for p in dead if not self._respawn_on_port_clash(p)]
        if dead:
            names = ", ".join(f"{p.name} (exit {p.returncode()})" for p in dead)
            raise ClusterError(f"exited during start-up: {names}\n{self.diagnostics()}")

    def assignments(self) -> dict[str, set[int] | None]:
        """The latest partition assignment each consumer logged; None while it has none (not
        assigned yet, or its latest line is a revoke: a rebalance is under way)."""
        out: dict[str, set[int] | None] = {}
        for p in self.consumer_procs:
            latest: set[int] | None = None
            for line in p.lines():
                msg = str(line.get("msg", ""))
                if msg.startswith(ASSIGNED):
                    latest = parse_partitions(msg)
                elif msg.startswith(REVOKED):
                    latest = None
            out[p.name] = latest
        return out

    def group_settled(self) -> bool:
        """Every consumer owns a share and together they own each partition exactly once."""
        shares = self.assignments()
        if not shares:
            return True  # a cluster without consumers
        if any(share is None for share in shares.values()):
            return False
        owned = [p for share in shares.values() for p in share or ()]
        return sorted(owned) == list(range(self.settings.topic_partitions))

    def replayed(self, proc: Proc) -> bool:
        return any(str(line.get("msg", "")).startswith(REPLAYED) for line in proc.lines())

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                self._check_alive()
                still = []
                for p in self.api_procs:
                    try:
                        ok = client.get(f"{p.url}/ready").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if not ok:
                        still.append(p)
                pending_apis = still
                listeners = self.consumer_procs + self.listener_procs
                not_replayed = [p.name for p in listeners if not self.replayed(p)]
                settled = self.group_settled()
                if not pending_apis and not not_replayed and settled:
                    return
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"cluster not ready after {timeout:g}s: apis not ready "
                        f"{[p.name for p in pending_apis]}, not replayed {not_replayed}, "
                        f"assignments {self.assignments()}\n{self.diagnostics()}"
                    )
                time.sleep(0.2)  # sleep-ok: poll interval, nothing to wait on

    def retire(self, proc: Proc) -> None:
        """Take `proc` out of the cluster's members (before stopping or killing it on purpose)."""
        proc.member = False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process at once, SIGKILL whatever is still running after `timeout`."""
        for p in self.procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p.popen is None:
                continue
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                p.popen.wait(timeout=10)

    def restart(self, timeout: float = 60.0, between: Callable[[], None] | None = None) -> None:
        """Stop every process, run `between` (e.g. restart Redis), start them all again, each
        with the same settings and ports and a new log file, and wait until they are ready."""
        self.stop()
        if between is not None:
            between()
        for p in self.procs:
            if p.member:
                runs = len(list(self.workdir.glob(f"{p.name}*.log")))
                p.log_path = self.workdir / f"{p.name}.run{runs + 1}.log"
                p.start(self.workdir)
        self.wait_ready(timeout)

    @contextlib.contextmanager
    def running(self, timeout: float = 60.0) -> Iterator[Cluster]:
        self.start()
        try:
            self.wait_ready(timeout)
            yield self
        finally:
            self.stop()
