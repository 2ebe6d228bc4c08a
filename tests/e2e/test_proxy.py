"""infra/nginx/nginx.conf in front of two real api processes, as in the multi-node compose:
round-robin with no stickiness, an SSE stream arrives event by event (not buffered until the
end), and a cancel sent through the proxy stops the stream the proxy serves. Needs Debian's
nginx (apt-get install nginx-light; infra/local/install.sh installs it); skipped without it.

The module's cluster: 2 api, 1 ai_consumer, no standalone listener; 100 ms per token.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ClusterShape
from tests.support.cluster import Cluster
from tests.support.nginx import nginx, prepare
from tests.support.procs import Proc, free_port
from tests.support.sse import SSEStream, chunks
from tests.support.wait import poll

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def needs_nginx() -> None:
    if nginx() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    return ClusterShape(consumers=1, listener=False)


class Proxy:
    def __init__(self, workdir: Path, url: str, proc: Proc) -> None:
        self.workdir = workdir
        self.url = url
        self.proc = proc

    def access_log(self) -> str:
        return (self.workdir / "stdout.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def proxy(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("nginx")
    port = free_port()
    upstreams = [f"127.0.0.1:{p.port}" for p in cluster.api_procs]
    cmd = prepare(workdir, upstreams, port)
    proc = Proc.launch("nginx", cmd, dict(os.environ), workdir, workdir / "stdout.log")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool | None:
        if not proc.alive():
            errors = (workdir / "error.log").read_text(errors="replace")
            raise AssertionError(f"nginx exited {proc.returncode()}: {errors[-2000:]}")
        try:
            return True if httpx.get(f"{url}/health", timeout=1).status_code == 200 else None
        except httpx.HTTPError:
            return None

    try:
        poll("nginx to answer /health", up, timeout=15)
        yield Proxy(workdir, url, proc)
    finally:
        proc.terminate()


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=httpx.Timeout(10, read=30)) as c:
        yield c


async def chat(client: httpx.AsyncClient, session: str, max_tokens: int | None = None) -> str:
    body: dict[str, object] = {"session_id": session, "message": "through the proxy"}
    if max_tokens is not None:
        body["options"] = {"max_tokens": max_tokens}
    answer = await client.post("/api/chat", json=body)
    assert answer.status_code == 202, answer.text
    message_id: str = answer.json()["message_id"]
    return message_id


async def test_sse_arrives_event_by_event_through_nginx(client: httpx.AsyncClient) -> None:
    message_id = await chat(client, f"s-{uuid.uuid4().hex[:12]}", max_tokens=20)
    async with SSEStream(client, f"/api/chat/{message_id}/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = await stream.until_done(within=20)
    got = chunks(events)
    assert len(got) == 20
    assert events[-1].json()["status"] == "completed"
    # 20 tokens 100 ms apart take ~1.9 s from the first chunk to the last: a buffering proxy
    # would hand them over together at the end. Half of that leaves headroom for a busy host.
    spread = got[-1].received - got[0].received
    assert spread >= 0.95, f"chunks arrived within {spread:.3f}s: the proxy buffers the stream"


async def test_cancel_through_nginx_stops_the_stream_it_serves(
    client: httpx.AsyncClient, proxy: Proxy, cluster: Cluster
) -> None:
    session = f"s-{uuid.uuid4().hex[:12]}"
    message_id = await chat(client, session)
    async with SSEStream(client, f"/api/chat/{message_id}/stream") as stream:
        stream.record()
        await stream.wait_for(lambda evs: bool(chunks(evs)), within=10, what="a chunk")
        answer = await client.post(
            "/api/cancel", json={"session_id": session, "message_id": message_id}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cancelled"
        done = await stream.wait_done(within=10)
    assert done.json()["status"] == "cancelled"
    assert len(chunks(stream.events)) < 60

    # round-robin without stickiness: the requests went to both instances
    def both() -> set[str] | None:
        used = set(re.findall(r"upstream=(127\.0\.0\.1:\d+)", proxy.access_log()))
        wanted = {f"127.0.0.1:{p.port}" for p in cluster.api_procs}
        return used if wanted <= used else None

    deadline = time.monotonic() + 5
    while both() is None and time.monotonic() < deadline:
        await client.get("/health")  # one more request to tip the log (each is logged)
    assert both() is not None, proxy.access_log()[-2000:]
