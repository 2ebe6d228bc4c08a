"""Real chatpipe processes for end-to-end tests: N api, M ai_consumer, 1 cancel_listener, each a
`Proc` of tests/support/procs.py.

Every process is configured only through the environment (the settings field names upper-cased,
as a deployment does), logs JSON lines to its own file, and runs with a scratch working
directory (so a developer's `.env` does not leak in). `wait_ready()` polls with a deadline until
the apis answer /ready, the consumer group has settled over every partition and the cancel
listeners have replayed the compacted topic.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from chatpipe.settings import Settings
from tests.support.procs import Proc, ProcError, free_port, process_env

Kind = Literal["api", "ai_consumer", "cancel_listener"]

ASSIGNED = "partitions assigned: "
REVOKED = "partitions revoked: "
REPLAYED = "replayed"


def new_session() -> str:
    """A session id of its own for one chat (no other test's session shares it)."""
    return f"s-{uuid.uuid4().hex[:12]}"


def parse_partitions(msg: str) -> set[int]:
    """`partitions assigned: [0, 3, 6]` (or `revoked: [..] (...)`) -> {0, 3, 6}."""
    found = re.search(r"\[[\d, ]*\]", msg)
    if found is None:
        raise ValueError(f"no partition list in {msg!r}")
    return {int(p) for p in json.loads(found.group(0))}


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
            "redis_cluster": s.redis_cluster,
            "redis_key_buckets": s.redis_key_buckets,
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
            argv=[sys.executable, "-m", kind],
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
            raise ProcError(f"exited during start-up: {names}\n{self.diagnostics()}")

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
                    raise ProcError(
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
