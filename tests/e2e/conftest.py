"""Fixtures of the end-to-end tests: one cluster of real processes per test module.

`ns` is overridden here with module scope, so the shared fixtures of tests/conftest.py
(`make_settings`, `settings`, `redis`) name the same topics and keys as the module's cluster.
The topics are created once per module (like the `topics` fixture, which would delete them
after every test, under the cluster's feet) and deleted at the end of the module.

A module changes the simulator's pace by overriding the `cluster_env` fixture, and the
processes it runs (how many of each, how long they may take to be ready) by overriding
`cluster_shape`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest

from chatpipe.clients import make_admin
from chatpipe.settings import Settings
from chatpipe.topics import ensure_topics, topic_specs
from tests.conftest import namespace
from tests.providers.upstream import FakeOpenAI, serve_in_thread
from tests.support.cluster import Cluster
from tests.support.services import Services
from tests.support.sse import SSEStream

T = TypeVar("T")

# The simulator's pace for most modules: 60 tokens, 100 ms apart (a 6 s answer unless a
# request asks for fewer with options.max_tokens), 300 ms before the first token (an LLM's
# time to first token: what makes "a cancel right after sending" land before any chunk).
# SSE heartbeats every 0.5 s, so a test sees them during a short stream.
DEFAULT_ENV: dict[str, object] = {
    "sim_tokens": 60,
    "sim_token_delay_ms": 100,
    "sim_first_token_delay_ms": 300,
    "max_message_bytes": 8192,
    "sse_heartbeat_s": 0.5,
}


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, on a loop of its own in a helper thread
    (module-scoped fixtures are sync; the tests' loops are per test)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


@pytest.fixture(scope="module")
def ns() -> str:
    """One namespace per module: the module's cluster and its tests' `settings` share it."""
    return namespace()


@pytest.fixture(scope="module")
def cluster_settings(real_services: Services, ns: str) -> Settings:
    """The module's settings (the same values as `make_settings`, at module scope)."""
    return Settings(
        kafka_bootstrap_servers=real_services.kafka,
        redis_url=real_services.redis_url,
        topic_prefix=f"{ns}.",
        key_prefix=f"{ns}:",
        consumer_group=f"{ns}-ai",
        topic_partitions=12,
        instance_id=f"test-{ns}",
        log_format="json",
    )


@pytest.fixture(scope="module")
def cluster_topics(cluster_settings: Settings) -> Iterator[Settings]:
    """Creates the module's topics (ensure_topics), deletes them after the module."""

    async def create() -> None:
        admin = make_admin(cluster_settings)
        await admin.start()
        try:
            await ensure_topics(admin, cluster_settings)
        finally:
            await admin.close()

    async def delete() -> None:
        admin = make_admin(cluster_settings)
        await admin.start()
        try:
            await admin.delete_topics([t.name for t in topic_specs(cluster_settings)])
        finally:
            await admin.close()

    run_async(create)
    try:
        yield cluster_settings
    finally:
        with contextlib.suppress(Exception):
            run_async(delete)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    """A recording OpenAI-compatible model server for the module (in a thread of its own: the
    module's processes start before any test's loop); see `provider_env`."""
    with serve_in_thread(FakeOpenAI()) as fake:
        yield fake


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    """Extra settings of every process of the module's cluster (override per module)."""
    return dict(DEFAULT_ENV)


@dataclass(frozen=True)
class ClusterShape:
    """The processes of a module's cluster, and how long they may take to be ready."""

    apis: int = 2
    consumers: int = 3
    listener: bool = True
    ready_timeout: float = 60.0


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """2 api + 3 ai_consumer + 1 cancel_listener, 60 s to be ready (override per module)."""
    return ClusterShape()


@pytest.fixture(scope="module")
def cluster(
    cluster_topics: Settings,
    cluster_env: dict[str, object],
    cluster_shape: ClusterShape,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """The module's processes (`cluster_shape`), ready (see Cluster.wait_ready)."""
    workdir = tmp_path_factory.mktemp(f"cluster-{cluster_topics.topic_prefix.rstrip('.')}")
    shape = cluster_shape
    processes = Cluster(
        cluster_topics,
        workdir,
        apis=shape.apis,
        consumers=shape.consumers,
        listener=shape.listener,
        env=cluster_env,
    )
    with processes.running(timeout=shape.ready_timeout) as running:
        yield running


@dataclass
class Api:
    """One api process seen from a client."""

    name: str
    url: str
    client: httpx.AsyncClient

    async def chat(
        self,
        session_id: str,
        message: str = "hello there",
        *,
        max_tokens: int | None = None,
        message_id: str | None = None,
    ) -> dict[str, Any]:
        """POST /api/chat; asserts the 202 and returns its body."""
        body: dict[str, Any] = {"session_id": session_id, "message": message}
        if max_tokens is not None:
            body["options"] = {"max_tokens": max_tokens}
        if message_id is not None:
            body["message_id"] = message_id
        response = await self.client.post("/api/chat", json=body)
        assert response.status_code == 202, f"{self.name}: {response.status_code} {response.text}"
        accepted: dict[str, Any] = response.json()
        assert accepted["status"] == "queued"
        assert accepted["session_id"] == session_id
        return accepted

    async def cancel(self, session_id: str, message_id: str) -> httpx.Response:
        return await self.client.post(
            "/api/cancel", json={"session_id": session_id, "message_id": message_id}
        )

    def stream(
        self, message_id: str, last_event_id: str | None = None, open_timeout: float = 10.0
    ) -> SSEStream:
        return SSEStream(self.client, f"/api/chat/{message_id}/stream", last_event_id, open_timeout)


@pytest.fixture
async def apis(cluster: Cluster, settings: Settings) -> AsyncIterator[tuple[Api, Api]]:
    """Clients of the two api processes: tests send a chat to one and cancel on the other."""
    assert settings.key_prefix == cluster.settings.key_prefix, "settings and cluster differ"
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    timeout = httpx.Timeout(10.0, read=30.0)
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for proc in cluster.api_procs[:2]:
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=proc.url, limits=limits, timeout=timeout)
            )
            out.append(Api(proc.name, proc.url, client))
        yield out[0], out[1]
