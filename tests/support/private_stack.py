"""A Kafka broker and a Redis server of a test module's own, for tests that stop, kill or
restart them (issue 4's fault injection): the shared stack of the run is never disturbed.

It is the same `infra/local/stack.sh` a developer runs, on free ports and in a scratch state
folder. Starting takes a few seconds (Kafka's JVM); `stop`/`start`/`restart_redis` are the
faults a test injects.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.support.procs import free_port
from tests.support.services import Services

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "infra" / "local" / "stack.sh"
Service = Literal["kafka", "redis", "all"]


class StackError(AssertionError):
    """stack.sh failed; the message carries its output."""


@dataclass
class PrivateStack:
    """One stack.sh stack on its own ports and state folder."""

    state_dir: Path
    kafka_port: int
    controller_port: int
    redis_port: int
    # more stack.sh settings, e.g. the opt-in secure mode: KAFKA_SASL=scram, KAFKA_SASL_USER,
    # KAFKA_SASL_PASSWORD, REDIS_ACL_USER, REDIS_ACL_PASSWORD (docs/local-stack.md)
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def on_free_ports(
        cls, state_dir: Path, extra_env: dict[str, str] | None = None
    ) -> PrivateStack:
        return cls(state_dir, free_port(), free_port(), free_port(), dict(extra_env or {}))

    @property
    def services(self) -> Services:
        return Services(self.bootstrap, self.redis_url, "private-stack")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            KAFKA_PORT=str(self.kafka_port),
            KAFKA_CONTROLLER_PORT=str(self.controller_port),
            REDIS_PORT=str(self.redis_port),
            CHATPIPE_STACK_DIR=str(self.state_dir),
            KAFKA_HEAP=env.get("PRIVATE_STACK_KAFKA_HEAP", "384m"),
        )
        env.update(self.extra_env)
        return env

    def run(self, *args: str, timeout: float = 120) -> str:
        """Run `stack.sh ARGS...`; raise StackError with its output when it fails."""
        done = subprocess.run(
            ["bash", str(STACK), *args],
            env=self.env(),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(
                f"stack.sh {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def start(self, service: Service = "all") -> None:
        self.run("start", service)

    def stop(self, service: Service = "all") -> None:
        self.run("stop", service)

    def restart_redis(self) -> None:
        """Stop Redis and start it again with its data gone (no persistence)."""
        self.run("restart-redis")

    def wipe(self) -> None:
        self.run("wipe", "all")


@contextmanager
def private_stack(
    state_dir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[PrivateStack]:
    """A started private stack; stopped and wiped afterwards, also when the test failed."""
    stack = PrivateStack.on_free_ports(state_dir, extra_env)
    try:
        stack.start()
        yield stack
    finally:
        with suppress(StackError, subprocess.TimeoutExpired):
            stack.wipe()
