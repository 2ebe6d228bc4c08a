"""Issue 13, must-show 3 and 2: chatpipe's processes (3 api, 3 ai_consumer, 1 cancel_listener)
on the 3-broker cluster stack, topics with replication factor 3 and min.insync.replicas 2,
lose a broker while answers stream and new chats keep arriving (10 a second), as users send
them: each chat a session of its own, its answer read over SSE from another api than the one
that took it, a 503 sent again with the same message_id after its Retry-After.

3. A graceful stop (SIGTERM: a controlled shutdown) of the consumer group's coordinator, down
   for 30 s while chats flow: no 503 at all, every answer streams whole without a restart,
   no process restarts. It runs first: on brokers that have had no fault for a while (a
   broker that rejoined seconds before, on a saturated box, can hold acks=all writes longer
   than API_KAFKA_TIMEOUT_S when leadership moves: docs/scaling.md).
2. kill -9 of the broker that leads most chat.requests partitions, with 60 answers streaming:
   no 202'd chat is lost, every message ends with exactly one terminal event on SSE and on
   chat.responses, no client sees an event twice, every POST answers within
   API_KAFKA_TIMEOUT_S during the election (p50/p99 printed). The broker comes back and every
   partition has its 3 replicas in sync again.

The numbers printed go to docs/scaling.md (measured by an e2e run on a shared 2-core box).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from ai_consumer.llm.simulated import simulated_tokens
from chatpipe.schemas import ChatRequest
from chatpipe.settings import Settings
from tests.cluster.brokers import (
    admin_client,
    leaders,
    led_by_others,
    node_name,
    partitions,
    wait_in_sync,
)
from tests.cluster.conftest import ClusterStack, api_clients
from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.e2e.faults.consumer_support import kafka_checks, kinds, sse_checks
from tests.e2e.records import read_responses, terminal
from tests.support.cluster import Cluster, new_session
from tests.support.partitions import partition_of
from tests.support.sse import SSEEvent, SSEStream, chunks
from tests.support.wait import apoll

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.faults]

LONG = 60  # tokens of the answers streaming when the broker goes: 250 ms apart, 15 s
SHORT = 8  # tokens of the chats that keep arriving (options.max_tokens): 2 s
TOKEN_MS = 250
RATE = 10.0  # new chats a second
BOUND_S = 5.0  # API_KAFKA_TIMEOUT_S (its default): a POST answers 202 or 503 within it
HEADROOM_S = 2.5  # a 503 also withdraws the message (Redis), on a box busy with the election
AFTER_KILL_S = 12.0  # chats keep arriving this long after the kill
STOPPED = 10  # of the 60 live answers, stopped (a Stop click) during the election
OUTAGE_S = 30.0
ATTEMPTS = 10  # a client's POSTs of one chat (503, Retry-After, again) before the test fails


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "sim_tokens": LONG,
        "sim_token_delay_ms": TOKEN_MS,
        "sim_first_token_delay_ms": 100,
        "api_kafka_timeout_s": BOUND_S,
        "retry_after_s": 1,
        "sse_heartbeat_s": 15.0,  # the default: no comment traffic beside the chunks
    }


@dataclass(frozen=True)
class Post:
    sent: float  # loop.time()
    took: float
    status: int
    retry_after: str | None


@dataclass
class Chat:
    session: str
    message_id: str
    tokens: int
    posts: list[Post] = field(default_factory=list)
    stream: SSEStream | None = None
    cancel: Post | None = None  # its Stop click, if any

    @property
    def events(self) -> list[SSEEvent]:
        assert self.stream is not None, f"{self.message_id} was never accepted"
        return self.stream.events


class Users:
    """Chats as users send them, each answer recorded over SSE from the next api (the streams
    stay open until the exit stack closes)."""

    def __init__(self, apis: list[Api], streams: contextlib.AsyncExitStack) -> None:
        self.apis = apis
        self.streams = streams
        self.chats: list[Chat] = []
        self._sending: set[asyncio.Task[Chat]] = set()

    async def send(self, tokens: int) -> Chat:
        """POST one chat (again after each 503's Retry-After), then open its stream."""
        i = len(self.chats)
        api, reader = self.apis[i % len(self.apis)], self.apis[(i + 1) % len(self.apis)]
        chat = Chat(new_session(), uuid.uuid4().hex, tokens)
        self.chats.append(chat)
        body: dict[str, Any] = {
            "session_id": chat.session,
            "message": "hello there",
            "message_id": chat.message_id,
        }
        if tokens != LONG:
            body["options"] = {"max_tokens": tokens}
        loop = asyncio.get_running_loop()
        for _ in range(ATTEMPTS):
            sent = loop.time()
            response = await api.client.post("/api/chat", json=body)
            post = Post(
                sent, loop.time() - sent, response.status_code, response.headers.get("retry-after")
            )
            chat.posts.append(post)
            if response.status_code == 202:
                break
            assert response.status_code == 503, (
                f"{api.name}: {response.status_code} {response.text}"
            )
            # sleep-ok: the client honours Retry-After before sending again
            wait_s = float(post.retry_after or 1)
            await asyncio.sleep(wait_s)  # sleep-ok: a client honours Retry-After
        else:
            raise AssertionError(
                f"{chat.message_id}: not accepted in {ATTEMPTS} POSTs: {chat.posts}"
            )
        stream = reader.stream(chat.message_id, open_timeout=20)
        await stream.__aenter__()
        self.streams.push_async_exit(stream.__aexit__)
        chat.stream = stream.record()
        return chat

    async def stop(self, chat: Chat) -> None:
        """The Stop click, on another api than the one streaming the answer."""
        i = self.chats.index(chat)
        api = self.apis[(i + 2) % len(self.apis)]
        loop = asyncio.get_running_loop()
        sent = loop.time()
        response = await api.client.post(
            "/api/cancel", json={"session_id": chat.session, "message_id": chat.message_id}
        )
        chat.cancel = Post(sent, loop.time() - sent, response.status_code, None)
        assert (response.status_code, response.json()["status"]) == (200, "cancelled"), (
            f"{api.name}: {response.status_code} {response.text}"
        )

    async def keep_sending(self, tokens: int, until: Callable[[], bool]) -> None:
        """RATE new chats a second, each on a task of its own (a slow POST delays no other),
        until `until()`; then wait until each is accepted and its stream open."""
        loop = asyncio.get_running_loop()
        start, n = loop.time(), 0
        try:
            while not until():
                task = asyncio.create_task(self.send(tokens))
                self._sending.add(task)
                n += 1
                # sleep-ok: pacing the load, nothing to wait on
                pace_s = max(0.0, start + n / RATE - loop.time())
                await asyncio.sleep(pace_s)  # sleep-ok: 10 chats a second
            await asyncio.gather(*self._sending)
        finally:  # the test failed meanwhile: no chat goes on sending
            for task in self._sending:
                task.cancel()


@contextlib.asynccontextmanager
async def users(cluster: Cluster) -> AsyncIterator[Users]:
    # idle connections are dropped before the api's (uvicorn's 5 s keep-alive) closes them: a
    # request on a connection the server is closing fails without an answer
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=100, keepalive_expiry=2)
    timeout = httpx.Timeout(BOUND_S + 10.0, read=30.0)
    async with (
        api_clients(cluster, limits, timeout) as apis,
        contextlib.AsyncExitStack() as streams,
    ):
        yield Users(apis, streams)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return (
        f"p50 {statistics.median(values):.2f} s, p99 {percentile(values, 0.99):.2f} s, "
        f"max {max(values):.2f} s over {len(values)}"
    )


def largest_gap(events: list[SSEEvent]) -> float:
    """The longest wait between two chunks of one answer (or before its `done`)."""
    times = [e.received for e in events if e.event in ("chunk", "done")]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def answer(tokens: int) -> str:
    return "".join(
        simulated_tokens(ChatRequest(message_id="x", session_id="x", message="hello there"), tokens)
    )


async def check_every_chat(chats: Iterable[Chat], settings: Settings) -> None:
    """Each answer whole (or as far as its Stop), once: on SSE exactly one `done` (completed,
    or cancelled), the last, nothing twice, no restart; on chat.responses exactly one terminal
    event, the last."""
    chats = list(chats)
    for chat in chats:
        events = chat.events
        sse_checks(chat.message_id, events)
        status = "cancelled" if chat.cancel else "completed"
        assert events[-1].json()["status"] == status, (chat.message_id, events[-1].data)
        assert "restart" not in kinds(events), (chat.message_id, kinds(events))
        text = "".join(str(e.json()["delta"]) for e in chunks(events))
        assert answer(chat.tokens).startswith(text), chat.message_id
        assert chat.cancel or text == answer(chat.tokens), chat.message_id
    ids = {c.message_id for c in chats}
    seen = await read_responses(
        settings,
        {c.session for c in chats},
        lambda evs: ids <= {str(e["message_id"]) for e in terminal(evs)},
        within=60,
    )
    for chat in chats:
        status = "cancelled" if chat.cancel else "completed"
        assert kafka_checks(chat.message_id, seen)[-1]["type"] == f"chat.{status}"


async def live(chats: list[Chat]) -> None:
    """Until every answer of `chats` streams (two chunks each)."""
    await asyncio.gather(
        *(
            c.stream.wait_for(lambda evs: len(chunks(evs)) >= 2, within=30, what="2 chunks")
            for c in chats
            if c.stream is not None
        )
    )


async def answered_since(crowd: Users, since: float, n: int) -> None:
    """Until `n` POSTs sent since `since` have their answer."""

    async def check() -> bool | None:
        done = sum(1 for c in crowd.chats for p in c.posts if p.sent >= since)
        return True if done >= n else None

    await apoll(f"{n} chats answered", check, within=30)


def topics(settings: Settings) -> list[str]:
    return [settings.requests_topic, settings.cancels_topic, settings.responses_topic]


@contextlib.asynccontextmanager
async def on_the_cluster(
    cluster: Cluster, settings: Settings
) -> AsyncIterator[tuple[AIOKafkaAdminClient, Users]]:
    """An admin client and the users, on brokers with every partition in sync."""
    async with admin_client(settings) as admin, users(cluster) as crowd:
        await wait_in_sync(admin, topics(settings))
        yield admin, crowd


async def streaming(crowd: Users, n: int) -> list[Chat]:
    """`n` long answers, sent at once, each streaming when this returns."""
    long = await asyncio.gather(*(crowd.send(LONG) for _ in range(n)))
    await live(long)
    return long


async def all_done(crowd: Users) -> None:
    for chat in crowd.chats:
        assert chat.stream is not None
        await chat.stream.wait_done(within=60)


async def rejoin(
    cluster_stack: ClusterStack, admin: AIOKafkaAdminClient, settings: Settings, node: str
) -> tuple[float, float]:
    """Start `node` again: (seconds until it answers, seconds more until every partition has
    its 3 replicas in sync again)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.to_thread(cluster_stack.start, node)
    answered = loop.time()
    await wait_in_sync(admin, topics(settings), within=120)
    return answered - began, loop.time() - answered


@contextlib.asynccontextmanager
async def back_up(cluster_stack: ClusterStack, node: str) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Whatever fails, `node` runs again afterwards (the next test needs every broker): the
    body puts its own restart (a task) in the list, or it is started here."""
    restarts: list[asyncio.Task[Any]] = []
    try:
        yield restarts
    finally:
        await asyncio.gather(*restarts, return_exceptions=True)
        await asyncio.to_thread(cluster_stack.start, node)


async def test_a_broker_stopped_for_30_s_costs_no_503_and_no_stream(
    cluster: Cluster, cluster_stack: ClusterStack, cluster_settings: Settings
) -> None:
    settings = cluster_settings
    loop = asyncio.get_running_loop()
    async with on_the_cluster(cluster, settings) as (admin, crowd):
        node = node_name(await admin.find_coordinator(settings.consumer_group))
        over: list[bool] = []
        arriving = asyncio.create_task(crowd.keep_sending(SHORT, lambda: bool(over)))
        async with back_up(cluster_stack, node) as restarts:
            try:
                await streaming(crowd, 20)  # chats arrive meanwhile
                stopping = loop.time()
                await asyncio.to_thread(cluster_stack.stop, node)
                down = loop.time()
                # sleep-ok: the outage itself lasts OUTAGE_S, chats flowing all along
                await asyncio.sleep(OUTAGE_S)  # sleep-ok: the outage lasts this long
                over.append(True)
                await arriving
            finally:
                arriving.cancel()
            restarts.append(asyncio.create_task(rejoin(cluster_stack, admin, settings, node)))
            await all_done(crowd)
            await check_every_chat(crowd.chats, settings)
            answered, in_sync = await restarts[0]

    posts = [p for c in crowd.chats for p in c.posts]
    print(
        f"\nSIGTERM of {node} (the consumer group's coordinator): stopped in "
        f"{down - stopping:.1f} s, then down {OUTAGE_S:g} s; {len(crowd.chats)} chats\n"
        f"POST latency, all: {spread([p.took for p in posts])}\n"
        f"largest gap between chunks, per answer: "
        f"{spread([largest_gap(c.events) for c in crowd.chats])}\n"
        f"{node} back: answering after {answered:.1f} s, every partition 3 in sync "
        f"{in_sync:.1f} s later"
    )
    # (a POST answers 503 once Kafka has not acked within API_KAFKA_TIMEOUT_S: none did)
    refused = [round(p.sent - stopping, 1) for p in posts if p.status != 202]
    assert not refused, f"chats refused, sent this many seconds after the stop began: {refused}"
    assert all(p.alive() for p in cluster.procs), cluster.diagnostics()


async def test_kill_9_of_the_busiest_broker_loses_no_chat_and_ends_each_once(
    cluster: Cluster, cluster_stack: ClusterStack, cluster_settings: Settings
) -> None:
    settings = cluster_settings
    loop = asyncio.get_running_loop()
    async with on_the_cluster(cluster, settings) as (admin, crowd):
        victim, _ = (await leaders(admin, settings.requests_topic)).most_common(1)[0]
        node = node_name(victim)
        led = {
            p["partition"]
            for p in await partitions(admin, [settings.requests_topic])
            if p["leader"] == victim
        }
        killed: list[float] = []

        def arrived_long_enough() -> bool:
            return bool(killed) and loop.time() - killed[0] >= AFTER_KILL_S

        async def elected() -> bool | None:
            return await led_by_others(admin, settings.requests_topic, victim)

        arriving = asyncio.create_task(crowd.keep_sending(SHORT, arrived_long_enough))
        async with back_up(cluster_stack, node) as restarts:
            try:
                long = await streaming(crowd, 60)  # chats arrive meanwhile
                # what a POST takes on this box with all this going on, before the fault
                calm = loop.time()
                await answered_since(crowd, calm, 10)
                killed.append(loop.time())
                await asyncio.to_thread(cluster_stack.kill, node)
                dead = loop.time()
                # Stop clicked on 10 of the live answers while the partitions have no leader
                stops = asyncio.gather(*(crowd.stop(c) for c in long[:STOPPED]))
                await apoll(f"new leaders for what {node} led", elected, within=30, interval=0.1)
                election = loop.time() - killed[0]
                # the broker comes back (as its supervisor restarts it) while chats arrive
                restarts.append(asyncio.create_task(rejoin(cluster_stack, admin, settings, node)))
                await stops
                await arriving
            finally:
                arriving.cancel()
            await all_done(crowd)
            # the 60 answers were streaming when the broker died
            ended = sorted(round(c.events[-1].received - dead, 2) for c in long)
            assert ended[0] > 0, (
                f"answers ended {ended} s after the kill, which took {dead - killed[0]:.1f} s; "
                f"first chunks {sorted(round(chunks(c.events)[0].received - dead, 1) for c in long)}"
            )
            await check_every_chat(crowd.chats, settings)
            answered, in_sync = await restarts[0]

    # POSTs sent during the election. An acks=all write waits for every replica in the ISR:
    # the chats of every partition wait until the dead broker is fenced and leaves the ISRs,
    # not only those of the partitions it led.
    during = [(c, p) for c in crowd.chats for p in c.posts if 0 <= p.sent - killed[0] <= election]
    its = [p.took for c, p in during if partition_of(c.session, settings.topic_partitions) in led]
    others = [
        p.took for c, p in during if partition_of(c.session, settings.topic_partitions) not in led
    ]
    before = [p.took for c in crowd.chats for p in c.posts if calm <= p.sent < killed[0]]
    refused = [p for c in crowd.chats for p in c.posts if p.status == 503]
    print(
        f"\nkill -9 of {node} (led {len(led)} of {settings.topic_partitions} chat.requests "
        f"partitions): new leaders after {election:.2f} s; {len(crowd.chats)} chats, "
        f"{len(refused)} POSTs answered 503 (each sent again)\n"
        f"POST latency just before the kill: {spread(before)}\n"
        f"POST latency during the election, its partitions: {spread(its)}\n"
        f"POST latency during the election, the others: {spread(others)}\n"
        f"largest gap between chunks of the 60 live answers: "
        f"{spread([largest_gap(c.events) for c in long])}\n"
        f"{node} back: answering after {answered:.1f} s, every partition 3 in sync "
        f"{in_sync:.1f} s later"
    )
    # a Stop stops its answer from Redis at once; the answer to the click waits for Kafka
    clicks = [c.cancel for c in long if c.cancel]
    stopped = [c.events[-1].received - c.cancel.sent for c in long if c.cancel]
    print(
        f"Stop during the election: answered in {spread([c.took for c in clicks])}; "
        f"the answer stopped (done: cancelled on SSE) in {spread(stopped)}"
    )
    assert its, "no chat was sent to the dead broker's partitions during the election"
    assert max(stopped) <= BOUND_S - 1, stopped  # through Redis: no wait for a new leader
    # within its bound: API_KAFKA_TIMEOUT_S on top of what a POST took just before
    took = [p.took for _, p in during]
    assert max(took) <= BOUND_S + max(before) + HEADROOM_S, (max(took), max(before))
    assert all(p.retry_after == "1" for p in refused), refused
    assert all(p.alive() for p in cluster.procs), cluster.diagnostics()
