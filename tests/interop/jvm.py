"""The Java interop project (interop/java): build it once, run its producer and consumer."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatpipe.settings import Settings
from tests.support.procs import ROOT, Proc, ProcError, process_env

PROJECT = ROOT / "interop" / "java"
JAR = PROJECT / "target" / "chatpipe-interop.jar"
PRODUCER = "dev.chatpipe.interop.ChatProducer"
CONSUMER = "dev.chatpipe.interop.ResponseConsumer"
TERMINAL = {"chat.completed", "chat.cancelled", "chat.failed"}


def missing_tools() -> list[str]:
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def build() -> Path:
    """`mvn -B -q -o package` (offline, fast once ~/.m2 has everything), else online."""
    attempts = [["mvn", "-B", "-q", "-o", "package"], ["mvn", "-B", "-q", "package"]]
    output = ""
    for argv in attempts:
        done = subprocess.run(
            argv, cwd=PROJECT, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode == 0 and JAR.is_file():
            return JAR
        output += f"$ {' '.join(argv)} (exit {done.returncode})\n{done.stdout[-4000:]}{done.stderr[-4000:]}\n"
    raise RuntimeError(f"the Java interop project did not build:\n{output}")


@dataclass(frozen=True)
class Java:
    jar: Path
    settings: Settings
    workdir: Path

    def _argv(self, main: str, *args: str) -> list[str]:
        return ["java", "-cp", str(self.jar), main, *args]

    def produce(
        self, command: str, session_id: str, message_id: str | None, *extra: str, jackson: int = 2
    ) -> dict[str, Any]:
        """Run ChatProducer; returns the JSON line it printed about the record it sent
        (`message_id` None: a session-cancel, which names none)."""
        argv = self._argv(
            PRODUCER,
            self.settings.kafka_bootstrap_servers,
            self.settings.topic_prefix,
            command,
            session_id,
            *([] if message_id is None else [message_id]),
            "--jackson",
            str(jackson),
            *extra,
        )
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False, env=process_env({})
        )
        if done.returncode != 0:
            raise ProcError(f"ChatProducer {command} failed ({done.returncode}):\n{done.stderr}")
        lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
        assert len(lines) == 1, done.stdout
        sent: dict[str, Any] = lines[0]
        return sent

    def start_consumer(
        self, message_ids: list[str], jackson: int = 2, timeout_s: float = 60, name: str = ""
    ) -> Proc:
        """Start ResponseConsumer for `message_ids`; it exits once each has a terminal event."""
        argv = self._argv(
            CONSUMER,
            self.settings.kafka_bootstrap_servers,
            self.settings.topic_prefix,
            ",".join(message_ids),
            "--jackson",
            str(jackson),
            "--timeout-s",
            str(timeout_s),
        )
        label = name or f"java-consumer-{jackson}"
        return Proc.launch(
            label,
            argv,
            process_env({}),
            self.workdir,
            self.workdir / f"{label}.log",
            merge_stderr=False,
        )
