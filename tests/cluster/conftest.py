"""The local cluster stack (infra/local/cluster.sh): 3 Kafka brokers and a Redis Cluster of
6 nodes, started once per test session (a no-op when it runs already) and left up, like the
single-node stack. Test helpers stop, kill -9 and restart one node by name."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "local" / "cluster.sh"


@dataclass(frozen=True)
class ClusterStack:
    env: dict[str, str]  # what `cluster.sh start` printed last: the clients' environment

    @property
    def bootstrap(self) -> str:
        return self.env["KAFKA_BOOTSTRAP_SERVERS"]

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [str(SCRIPT), *args], capture_output=True, text=True, timeout=180, check=False
        )
        assert done.returncode == 0, f"cluster.sh {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def stop(self, node: str) -> None:
        self.run("stop-node", node)

    def kill(self, node: str) -> None:
        self.run("kill-node", node)

    def start(self, node: str) -> None:
        """Back, and answering (a broker: it lists all three brokers again)."""
        self.run("start-node", node)


def parse_env(line: str) -> dict[str, str]:
    words = shlex.split(line)
    assert words[0] == "export", line
    return dict(w.split("=", 1) for w in words[1:])


@pytest.fixture(scope="session")
def cluster_stack() -> ClusterStack:
    done = subprocess.run(
        [str(SCRIPT), "start"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"cluster.sh start:\n{done.stdout}{done.stderr}"
    return ClusterStack(parse_env(done.stdout.strip().splitlines()[-1]))
