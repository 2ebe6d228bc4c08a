"""Liveness and readiness of real api processes, with and without their dependencies."""

from __future__ import annotations

import asyncio
import signal
import uuid

import httpx
import pytest

from tests.e2e.conftest import Api
from tests.support.cluster import Cluster, new_session
from tests.support.procs import Proc, free_port
from tests.support.sse import SSEStream, chunks
from tests.support.wait import WaitError, apoll

pytestmark = pytest.mark.e2e


async def test_health_and_ready_on_every_api(cluster: Cluster) -> None:
    assert len(cluster.api_procs) == 2
    async with httpx.AsyncClient(timeout=5) as client:
        for proc in cluster.api_procs:
            health = await client.get(f"{proc.url}/health")
            assert health.status_code == 200, health.text
            assert health.json()["instance_id"] == proc.instance_id
            ready = await client.get(f"{proc.url}/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "ready"
            assert ready.json()["checks"] == {"redis": "ok", "kafka": "ok"}


async def _answering(client: httpx.AsyncClient, proc: Proc, within: float = 20) -> None:
    """Wait until `proc` answers /health; fail at once, with its log, if it exits instead."""

    async def check() -> bool | None:
        if not proc.alive():
            raise AssertionError(
                f"{proc.name} exited with code {proc.returncode()} instead of serving "
                f"(it must start without its dependency and report it on /ready):\n"
                f"{proc.tail(12)}"
            )
        try:
            return (await client.get(f"{proc.url}/health")).status_code == 200 or None
        except httpx.TransportError:
            return None

    try:
        await apoll(f"{proc.name} to answer /health", check, within)
    except WaitError as e:
        raise AssertionError(f"{e}\n{proc.tail(12)}") from None


async def _unready(client: httpx.AsyncClient, proc: Proc, dependency: str) -> dict[str, str]:
    ready = await client.get(f"{proc.url}/ready")
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["checks"][dependency] != "ok"
    assert dependency in body["detail"], body  # the reason names what is missing
    health = await client.get(f"{proc.url}/health")
    assert health.status_code == 200, "liveness must not depend on Kafka or Redis"
    checks: dict[str, str] = body["checks"]
    return checks


async def test_ready_is_503_while_redis_is_down(cluster: Cluster) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    proc = cluster.spawn("api", "api-no-redis", {"redis_url": dead_redis})
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await _answering(client, proc)
            checks = await _unready(client, proc, "redis")
            assert checks["kafka"] == "ok"
            # and a chat is refused with 503 + Retry-After, not hung or lost
            response = await client.post(
                f"{proc.url}/api/chat", json={"session_id": "s-no-redis", "message": "hi"}
            )
            assert response.status_code == 503, response.text
            assert response.headers.get("retry-after")
            assert "redis" in response.json()["detail"]
    finally:
        proc.terminate()


async def test_ready_is_503_while_kafka_is_down(cluster: Cluster) -> None:
    dead_kafka = f"127.0.0.1:{free_port()}"
    proc = cluster.spawn(
        "api", "api-no-kafka", {"kafka_bootstrap_servers": dead_kafka, "api_kafka_timeout_s": 2}
    )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await _answering(client, proc)
            checks = await _unready(client, proc, "kafka")
            assert checks["redis"] == "ok"
            response = await client.post(
                f"{proc.url}/api/chat", json={"session_id": "s-no-kafka", "message": "hi"}
            )
            assert response.status_code == 503, response.text
            assert response.headers.get("retry-after")
    finally:
        proc.terminate()


async def test_a_consumer_stops_promptly_and_another_takes_its_partitions(
    cluster: Cluster,
) -> None:
    """A rolling restart: SIGTERM an ai_consumer that has streamed (and is idle now); it exits
    cleanly within its shutdown grace, and a new one joins: the group settles over all
    partitions again and answers go on."""
    warm = f"s-warm-{uuid.uuid4().hex[:8]}-"
    async with httpx.AsyncClient(base_url=cluster.urls[0], timeout=10) as client:
        for i in range(6):
            response = await client.post(
                "/api/chat",
                json={"session_id": f"{warm}{i}", "message": "hi", "options": {"max_tokens": 1}},
            )
            assert response.status_code == 202, response.text

    def answered_by() -> list[Proc]:
        return [
            p
            for p in cluster.consumer_procs
            for line in p.lines()
            if str(line.get("session_id", "")).startswith(warm)
            and line.get("msg") == "message completed"
        ]

    async def all_answered() -> list[Proc] | None:
        found = answered_by()
        return found if len(found) >= 6 else None

    # a consumer that has streamed answers (so its Kafka path has been used) and is idle now
    victim = (await apoll("the 6 warm-up answers", all_answered, within=15))[0]
    cluster.retire(victim)
    loop = asyncio.get_running_loop()
    started = loop.time()
    code = await asyncio.to_thread(victim.terminate, 15.0)
    took = loop.time() - started
    # a replacement joins (before asserting, so the module's cluster stays whole either way)
    cluster.spawn("ai_consumer", f"ai-{len(cluster.procs) + 1}", member=True)
    await asyncio.to_thread(cluster.wait_ready, 60.0)

    assert code == 0, f"{victim.name} exited with {code}:\n{victim.tail(10)}"
    assert took < 3.0, (
        f"an idle ai_consumer took {took:.1f}s to stop on SIGTERM (shutdown grace 2s):\n"
        f"{victim.tail(4)}"
    )
    assert len(cluster.consumer_procs) == 3
    assert victim.instance_id not in {p.instance_id for p in cluster.consumer_procs}
    # and answers go on
    async with httpx.AsyncClient(base_url=cluster.urls[1], timeout=10) as client:
        accepted = await client.post(
            "/api/chat",
            json={"session_id": f"{warm}after", "message": "hi", "options": {"max_tokens": 2}},
        )
        assert accepted.status_code == 202, accepted.text
        async with SSEStream(client, accepted.json()["stream_url"]) as stream:
            events = await stream.until_done(within=15)
    assert events[-1].json()["status"] == "completed"


async def test_sigterm_ends_an_apis_open_streams_cleanly_and_they_resume_on_another(
    cluster: Cluster, apis: tuple[Api, Api]
) -> None:
    """A rolling deploy: an api told to stop ends each open SSE response as a response (its
    body terminated: a browser's EventSource sees the end and reconnects, no broken
    connection after uvicorn's graceful timeout cancels it) and shuts down cleanly; the
    client resumes on another api with Last-Event-ID and misses nothing."""
    proc = cluster.spawn("api", "api-leaving")
    tokens = 40  # 100 ms apart: the answer outlives the api
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
        await _answering(client, proc)
        leaving = Api(proc.name, proc.url, client)
        message_id = (await leaving.chat(new_session(), max_tokens=tokens))["message_id"]
        async with leaving.stream(message_id) as stream:
            await stream.take(2, within=10)
            proc.signal(signal.SIGTERM)
            # a broken body would raise here (httpx: incomplete chunked read)
            while await stream.next_event(within=15) is not None:
                pass
            before = list(stream.events)
        code = await proc.stop(within=15)
    # a clean shutdown (uvicorn re-raises the signal once it is done: -15), not a SIGKILL
    assert code in (0, -signal.SIGTERM), (code, proc.tail())
    assert proc.find(lambda r: r.get("msg") == "Application shutdown complete."), proc.tail()
    assert before[-1].event == "chunk", [e.event for e in before]  # cut short, no done
    async with apis[0].stream(message_id, last_event_id=before[-1].id) as resumed:
        after = await resumed.until_done(within=20)
    seqs = [e.seq for e in chunks(before) + chunks(after)]
    assert seqs == list(range(1, tokens + 1)), seqs
    assert after[-1].json()["status"] == "completed"
