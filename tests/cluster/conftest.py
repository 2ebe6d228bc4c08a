"""The local cluster stack (infra/local/cluster.sh): 3 Kafka brokers and a Redis Cluster of
6 nodes, started once per test session (a no-op when it runs already) and left up, like the
single-node stack. Test helpers stop, kill -9 and restart one node by name.

chatpipe's processes run on it through the e2e harness (tests/e2e/conftest.py's `cluster` and
`cluster_topics`, with `cluster_settings` here): a module's own namespace on the 3 brokers
(topics created as `chatpipe topics` does: RF 3, min ISR 2), 3 api + 3 ai_consumer + 1
cancel_listener, and `cluster_redis` as their Redis (see there)."""

from __future__ import annotations

import contextlib
import shlex
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from chatpipe.settings import Settings
from tests.conftest import namespace

# the e2e harness's fixtures, on this folder's `cluster_settings` (pytest finds them by name)
from tests.e2e.conftest import Api, ClusterShape, cluster, cluster_topics  # noqa: F401
from tests.support.cluster import Cluster
from tests.support.services import Services

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


@pytest.fixture(scope="session")
def cluster_redis(cluster_stack: ClusterStack, real_services: Services) -> dict[str, object]:
    """The Redis of chatpipe's processes on the cluster stack (their REDIS_* settings): the
    stack's Redis Cluster, as a deployment across machines runs it (issue 13: the broker faults
    are shown with every process on the cluster stack)."""
    return {"redis_url": cluster_stack.env["REDIS_URL"], "redis_cluster": True}


@pytest.fixture(scope="module")
def cluster_settings(cluster_stack: ClusterStack, cluster_redis: dict[str, object]) -> Settings:
    """The module's chatpipe settings on the cluster stack: topics, keys and consumer group of
    a namespace of its own."""
    ns = namespace()
    return Settings(
        _env_file=None,
        kafka_bootstrap_servers=cluster_stack.bootstrap,
        topic_prefix=f"{ns}.",
        key_prefix=f"{ns}:",
        consumer_group=f"{ns}-ai",
        topic_partitions=12,
        instance_id=f"test-{ns}",
        log_format="json",
        **cluster_redis,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """Issue 13's shape: 3 api + 3 ai_consumer + 1 cancel_listener (90 s to be ready: the
    group's first join on 3 brokers, on a shared 2-core box)."""
    return ClusterShape(apis=3, consumers=3, ready_timeout=90)


@contextlib.asynccontextmanager
async def api_clients(
    processes: Cluster, limits: httpx.Limits, timeouts: httpx.Timeout
) -> AsyncIterator[list[Api]]:
    """A client of each api process of `processes`, closed at the end."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            Api(
                p.name,
                p.url,
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=p.url, limits=limits, timeout=timeouts)
                ),
            )
            for p in processes.api_procs
        ]
