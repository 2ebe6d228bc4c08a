"""Issue 13, must-show 4: kill -9 of one Redis primary while 60 answers stream.

chatpipe's processes (3 api, 3 ai_consumer, 1 cancel_listener, REDIS_CLUSTER=true) run on the
cluster stack: its 3 Kafka brokers and its Redis Cluster of 3 primaries + 3 replicas
(cluster-node-timeout 3 s). 60 sessions are chosen so that 20 have their bucket (hash tag
`{<bucket>}`, chatpipe/keys.py) on the primary that holds the most buckets, 40 on the other
two; each answer is read over SSE from another api than the one that took it. The primary is
killed (-9) while every answer streams; its replica is promoted; the killed node is started
again afterwards and rejoins as a replica (in a `finally`: later tests find a healthy cluster).

Cancels are sent before the kill, during the failover (between the kill and the promotion:
over the api, a 503 sent again after its Retry-After, and straight to chat.cancels as a Spring
frontend would), and after the promotion, half of them to messages of the killed shard.

What it asserts: every message ends with exactly one terminal event, on SSE and on
chat.responses; no SSE client sees an event id or a seq twice; no answer restarts (one
`chat.started` each: every owner was alive, ai_consumer/takeover.py waits a lease after Redis
comes back); no message stays `streaming` in Redis; every cancelled message ends `cancelled`,
every other one `completed` with its whole answer; every cancel listener replays chat.cancels
once the promoted replica answers (a new run_id among the primaries); no event of the other
shards is missing from Redis afterwards. What it prints (docs/reliability.md): when the
replica was promoted, the p50/p99 of the largest gap between two events of one answer on the
killed shard and on the others, the restarts, the cancels' attempts, and the events SSE
clients had read that the promoted replica lacks (what asynchronous replication lost).

Not to be run beside another pytest session on the same cluster stack: each session's
`cluster_stack` fixture runs `cluster.sh start`, which starts again any node another session
killed on purpose (the promotion wait then fails, saying so).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import statistics
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from aiokafka.errors import KafkaError
from redis.crc import key_slot
from redis.exceptions import RedisError

from ai_consumer.llm.simulated import simulated_tokens
from chatpipe.clients import make_redis
from chatpipe.codec import headers_for
from chatpipe.errors import ChatpipeError
from chatpipe.keys import Keys, cancel_record_key
from chatpipe.schemas import ChatCancel, ChatRequest
from chatpipe.settings import Settings
from tests.cluster.brokers import admin_client
from tests.cluster.conftest import ClusterStack, api_clients
from tests.conftest import namespace
from tests.e2e.conftest import DEFAULT_ENV, Api, run_async
from tests.e2e.faults.consumer_support import (
    kafka_checks,
    kinds,
    recorded,
    sse_checks,
    states,
    texts_after_last_restart,
)
from tests.e2e.records import foreign_producer, read_responses, terminal
from tests.support.cluster import Cluster, new_session
from tests.support.sse import SSEEvent, chunks
from tests.support.wait import apoll, poll

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.faults]

TOKENS = 150  # 200 ms apart: a 30 s answer, live from before the kill to after the promotion
TOKEN_MS = 200
STREAMS = 60
ON_VICTIM = 20  # of them on the killed primary's shard
HOST = "127.0.0.1"
REPLAYING = "Redis came back empty: replaying"


@pytest.fixture(scope="module")
def cluster_settings(cluster_stack: ClusterStack) -> Settings:
    """The module's settings on the cluster stack: its 3 brokers and its Redis Cluster. The
    topics are created with replication factor 3 once all 3 brokers are registered (another
    module may have one down for a while: tests/cluster/test_broker_faults.py)."""
    ns = namespace()
    settings = Settings(
        _env_file=None,
        kafka_bootstrap_servers=cluster_stack.bootstrap,
        redis_url=cluster_stack.env["REDIS_URL"],
        redis_cluster=True,
        topic_prefix=f"{ns}.",
        key_prefix=f"{ns}:",
        consumer_group=f"{ns}-ai",
        topic_partitions=12,
        instance_id=f"test-{ns}",
        log_format="json",
    )

    async def three_brokers() -> None:
        async def check() -> bool | None:
            with contextlib.suppress(KafkaError, ChatpipeError, OSError):
                async with admin_client(settings) as admin:
                    found = await admin.describe_cluster()
                    return True if len(found["brokers"]) == 3 else None
            return None

        await apoll("3 Kafka brokers registered", check, within=120, interval=0.5)

    run_async(three_brokers)
    return settings


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "sim_tokens": TOKENS,
        "sim_token_delay_ms": TOKEN_MS,
        "sim_first_token_delay_ms": 100,
        "retry_after_s": 1,
        # the sink's writes wait this long for the shard's new primary before the streams end
        # `failed`: a failover takes 4-6 s here, but one whose first election fails takes
        # another 2 x cluster-node-timeout (6 s), past the default 10 s (docs/reliability.md)
        "sink_redis_retry_s": 20,
    }


# --- the Redis Cluster, as its nodes see it ------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One line of CLUSTER NODES."""

    node_id: str
    flags: set[str]
    primary_id: str  # "-" for a primary
    slots: list[tuple[int, int]]

    @property
    def primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


@dataclass(frozen=True)
class RedisNodes:
    """The 6 nodes of cluster.sh: ports base..base+5, named redis-1..redis-6."""

    base: int

    @classmethod
    def of(cls, stack: ClusterStack) -> RedisNodes:
        port = urlsplit(stack.env["REDIS_URL"]).port
        assert port is not None, stack.env
        return cls(port)  # cluster.sh prints the URL of its first node

    @property
    def ports(self) -> list[int]:
        return [self.base + i for i in range(6)]

    def name(self, port: int) -> str:
        return f"redis-{port - self.base + 1}"

    def ask(self, port: int, *command: str) -> Any:
        """One command to one node (None: it does not answer)."""
        try:
            with redis.Redis(
                HOST, port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True
            ) as client:
                return client.execute_command(*command)
        except (RedisError, OSError):
            return None

    def info(self, port: int) -> dict[str, str] | None:
        """CLUSTER INFO of `port` (None: it does not answer)."""
        found = self.ask(port, "CLUSTER", "INFO")
        if not isinstance(found, str):
            return None
        return dict(line.split(":", 1) for line in found.splitlines() if ":" in line)

    def view(self, port: int) -> dict[int, Node] | None:
        """CLUSTER NODES as `port` sees the cluster, by port."""
        found = self.ask(port, "CLUSTER", "NODES")
        if not isinstance(found, str):
            return None
        out = {}
        for line in found.splitlines():
            words = line.split()
            if len(words) < 8:
                continue
            address = words[1].split("@")[0]
            ranges = []
            for word in words[8:]:
                if word.startswith("["):  # a slot being migrated or imported
                    continue
                first, _, last = word.partition("-")
                ranges.append((int(first), int(last or first)))
            node = Node(words[0], set(words[2].split(",")), words[3], ranges)
            out[int(address.rsplit(":", 1)[1])] = node
        return out

    def primaries(self, port: int) -> dict[int, list[tuple[int, int]]] | None:
        """The live primaries `port` knows and their slot ranges."""
        nodes = self.view(port)
        if nodes is None:
            return None
        return {p: n.slots for p, n in nodes.items() if n.primary and not n.failed and n.slots}

    def replica_of(self, port: int) -> int:
        """The replica of the primary at `port`."""
        nodes = self.view(port)
        assert nodes is not None, f"{self.name(port)} does not answer"
        found = [p for p, n in nodes.items() if n.primary_id == nodes[port].node_id]
        assert len(found) == 1, (self.name(port), nodes)
        return found[0]

    def promoted(self, port: int, replica: int, slots: set[int]) -> bool | None:
        """True once `replica` is a primary serving every slot of `slots`, and the cluster is
        ok again as it sees it (all 16384 slots served). `port`, the killed primary, must not
        answer meanwhile."""
        assert self.ask(port, "PING") is None, (
            f"{self.name(port)} answers again before its replica took its slots: started by "
            "someone else (another test session's `cluster.sh start`?)"
        )
        role = self.ask(replica, "ROLE")
        info = self.info(replica)
        if not isinstance(role, list) or role[0] != "master" or info is None:
            return None
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
            return None
        found = self.primaries(replica) or {}
        ranges = found.get(replica, [])
        return True if all(in_ranges(slot, ranges) for slot in slots) else None

    def healthy(self) -> bool | None:
        """Every node answers and says cluster_state ok; 3 primaries cover the 16384 slots,
        each with one replica whose link to it is up."""
        for port in self.ports:
            info = self.info(port)
            if info is None or info.get("cluster_state") != "ok":
                return None
            if info.get("cluster_slots_ok") != "16384":
                return None
        nodes = self.view(self.base)
        if nodes is None or len(nodes) != 6 or any(n.failed for n in nodes.values()):
            return None
        primaries = [p for p, n in nodes.items() if n.primary and n.slots]
        replicas = [p for p, n in nodes.items() if "slave" in n.flags]
        if len(primaries) != 3 or len(replicas) != 3:
            return None
        for port in replicas:
            replication = self.ask(port, "INFO", "replication")
            if not isinstance(replication, dict) or replication.get("master_link_status") != "up":
                return None
        return True

    def wait_healthy(self, stack: ClusterStack, within: float = 60.0) -> None:
        """Start any node that is down, then wait until the cluster is healthy again."""
        for port in self.ports:
            if self.ask(port, "PING") is None:
                stack.start(self.name(port))
        poll("a healthy Redis Cluster (6 nodes, 3 primaries, links up)", self.healthy, within, 0.2)


def in_ranges(slot: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= slot <= b for a, b in ranges)


def bucket_slot(bucket: int) -> int:
    """The hash slot of every key of a bucket: the slot of its hash tag's content."""
    return key_slot(str(bucket).encode())


# --- the users --------------------------------------------------------------------------------


@dataclass
class Chat:
    session: str
    message_id: str
    on_victim: bool
    writer: Api  # took the chat
    reader: Api  # serves its SSE stream
    canceller: Api
    cancel_phase: str = ""  # before | during | after | kafka ("" not cancelled)
    cancels: list[tuple[int, float]] = field(default_factory=list)  # (status, took) per POST
    events: list[SSEEvent] = field(default_factory=list)


def pick_sessions(keys: Keys, victim_buckets: set[int]) -> Iterator[tuple[str, bool]]:
    """STREAMS sessions of their own: ON_VICTIM of them in a bucket of the victim."""
    on, off = 0, 0
    while on + off < STREAMS:
        session = new_session()
        mine = keys.bucket(session) in victim_buckets
        if mine and on < ON_VICTIM:
            on += 1
            yield session, True
        elif not mine and off < STREAMS - ON_VICTIM:
            off += 1
            yield session, False


async def send_chat(chat: Chat, within: float = 30.0) -> None:
    """POST /api/chat as a client would: a 503 (Kafka away: another module may be taking a
    broker down) is sent again with the same message_id after its Retry-After."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    body = {"session_id": chat.session, "message": "hello there", "message_id": chat.message_id}
    while True:
        response = await chat.writer.client.post("/api/chat", json=body)
        if response.status_code == 202:
            return
        assert response.status_code == 503, (chat.message_id, response.status_code, response.text)
        assert loop.time() < deadline, (chat.message_id, response.text)
        # sleep-ok: the client honours Retry-After before sending again
        wait_s = float(response.headers.get("retry-after", "1"))
        await asyncio.sleep(wait_s)  # sleep-ok: a client honours Retry-After


async def cancel_until_taken(chat: Chat, phase: str, within: float = 30.0) -> None:
    """POST /api/cancel as a browser's page would: a 503 is sent again after its Retry-After,
    a request that got no answer at all (a kept-alive connection the api closed as it was
    reused) at once. `chat.cancels` records each POST (0: no answer)."""
    chat.cancel_phase = phase
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        sent = loop.time()
        try:
            response = await chat.canceller.cancel(chat.session, chat.message_id)
        except httpx.TransportError:
            chat.cancels.append((0, loop.time() - sent))
            assert loop.time() < deadline, (chat.message_id, chat.cancels)
            continue
        chat.cancels.append((response.status_code, loop.time() - sent))
        if response.status_code == 200:
            assert response.json()["status"] == "cancelled", (chat.message_id, response.text)
            return
        assert response.status_code == 503, (chat.message_id, response.status_code, response.text)
        assert loop.time() < deadline, (chat.message_id, chat.cancels)
        # sleep-ok: the client honours Retry-After before sending again
        wait_s = float(response.headers.get("retry-after", "1"))
        await asyncio.sleep(wait_s)  # sleep-ok: a client honours Retry-After


async def cancel_on_kafka(chats: list[Chat], settings: Settings) -> None:
    """A cancel record straight on chat.cancels (a Spring frontend's way): the listeners mirror
    it into Redis, retrying while the shard has no primary."""
    async with foreign_producer(settings) as producer:
        for chat in chats:
            chat.cancel_phase = "kafka"
            record = ChatCancel(session_id=chat.session, message_id=chat.message_id)
            await producer.send_and_wait(
                settings.cancels_topic,
                record.to_json(),
                key=cancel_record_key(chat.session, chat.message_id).encode(),
                headers=headers_for(record.type),
            )


# --- what is measured -----------------------------------------------------------------------


def largest_gap(events: list[SSEEvent]) -> float:
    """The longest wait between two events of one answer (chunks, a restart, the done)."""
    times = [e.received for e in events if e.event in ("chunk", "restart", "done")]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"p50 {statistics.median(values):.2f} s, p99 {percentile(values, 0.99):.2f} s, "
        f"max {max(values):.2f} s over {len(values)}"
    )


def replays(proc_lines: list[dict[str, Any]]) -> int:
    return sum(1 for line in proc_lines if str(line.get("msg", "")).startswith(REPLAYING))


def full_answer() -> str:
    request = ChatRequest(message_id="x", session_id="x", message="hello there")
    return "".join(simulated_tokens(request, TOKENS))


# --- the test ---------------------------------------------------------------------------------


async def test_kill_9_of_a_redis_primary_during_60_streams(
    cluster: Cluster, cluster_stack: ClusterStack
) -> None:
    settings = cluster.settings
    keys = Keys.from_settings(settings)
    nodes = RedisNodes.of(cluster_stack)
    await asyncio.to_thread(nodes.wait_healthy, cluster_stack)
    layout = await asyncio.to_thread(nodes.primaries, nodes.base)
    assert layout is not None
    assert len(layout) == 3, layout
    buckets_of = {
        port: {b for b in range(keys.buckets) if in_ranges(bucket_slot(b), ranges)}
        for port, ranges in layout.items()
    }
    # the primary with the most buckets (then the highest port: not the URL's node if equal)
    victim = max(layout, key=lambda p: (len(buckets_of[p]), p))
    victim_buckets = buckets_of[victim]
    victim_slots = {bucket_slot(b) for b in victim_buckets}
    replica = await asyncio.to_thread(nodes.replica_of, victim)
    listeners = cluster.consumer_procs + cluster.listener_procs
    full = full_answer()
    loop = asyncio.get_running_loop()
    killed = False
    timeline: dict[str, float] = {}

    try:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
        timeout = httpx.Timeout(15.0, read=60.0)
        async with api_clients(cluster, limits, timeout) as apis:
            chats: list[Chat] = []
            for i, (session, on_victim) in enumerate(pick_sessions(keys, victim_buckets)):
                chats.append(
                    Chat(
                        session,
                        uuid.uuid4().hex,
                        on_victim,
                        apis[i % 3],
                        apis[(i + 1) % 3],
                        apis[(i + 2) % 3],
                    )
                )
            timeline["posting"] = loop.time()
            await asyncio.gather(*(send_chat(c) for c in chats))
            async with recorded(
                c.reader.stream(c.message_id, open_timeout=20) for c in chats
            ) as streams:
                await asyncio.gather(
                    *(
                        s.wait_for(lambda evs: len(chunks(evs)) >= 2, within=30, what="2 chunks")
                        for s in streams
                    )
                )
                timeline["all streaming"] = loop.time()
                # who cancels when: 3 of the victim's shard and 3 of the others in each phase
                victims = [c for c in chats if c.on_victim]
                others = [c for c in chats if not c.on_victim]
                phase = {
                    "before": victims[0:3] + others[0:3],
                    "during": victims[3:6] + others[3:6],
                    "kafka": victims[6:7] + others[6:7],
                    "after": victims[7:10] + others[7:10],
                }
                await asyncio.gather(*(cancel_until_taken(c, "before") for c in phase["before"]))
                before = {p.name: replays(p.lines()) for p in listeners}

                timeline["kill"] = loop.time()
                await asyncio.to_thread(cluster_stack.kill, nodes.name(victim))
                killed = True
                timeline["killed"] = loop.time()
                async with asyncio.TaskGroup() as during:  # cancelled if the wait fails
                    for chat in phase["during"]:
                        during.create_task(cancel_until_taken(chat, "during"))
                    await cancel_on_kafka(phase["kafka"], settings)
                    await asyncio.to_thread(
                        poll,
                        f"{nodes.name(replica)} promoted for the killed primary's slots",
                        lambda: nodes.promoted(victim, replica, victim_slots),
                        30.0,
                        0.1,
                    )
                    timeline["promoted"] = loop.time()
                timeline["during cancels taken"] = loop.time()
                await asyncio.gather(*(cancel_until_taken(c, "after") for c in phase["after"]))
                timeline["after cancels taken"] = loop.time()

                async def all_replayed() -> bool | None:
                    now = {p.name: replays(p.lines()) for p in listeners}
                    return True if all(now[n] > before[n] for n in now) else None

                await apoll("every cancel listener replayed chat.cancels", all_replayed, 30)
                timeline["replayed"] = loop.time()
                await asyncio.gather(*(s.wait_done(within=60) for s in streams))
                timeline["all done"] = loop.time()
                for chat, stream in zip(chats, streams, strict=True):
                    chat.events = list(stream.events)
    finally:
        if killed:
            await asyncio.to_thread(nodes.wait_healthy, cluster_stack, 90.0)

    # --- what the clients saw -------------------------------------------------------------
    t0 = timeline["kill"]
    print(
        f"\nkilled {nodes.name(victim)} (port {victim}, buckets {sorted(victim_buckets)}); "
        f"{nodes.name(replica)} promoted; "
        + ", ".join(f"{k} {v - t0:+.2f} s" for k, v in timeline.items())
    )
    # what asynchronous replication lost: events SSE clients had read from the killed primary
    # that its promoted replica never got (a client resuming from before them would not see
    # them again; chat.responses has them)
    check = make_redis(settings, max_connections=16)
    try:
        stored = {}
        for chat in chats:
            entries = cast(
                list[tuple[bytes, Any]],
                await check.xrange(keys.stream(chat.session, chat.message_id)),
            )
            stored[chat.message_id] = {i.decode() for i, _ in entries}
        found = await states(check, settings, [c.message_id for c in chats])
    finally:
        await check.aclose()
    lost = {
        c.message_id: [e.id for e in c.events if e.id not in stored[c.message_id]] for c in chats
    }
    print(
        "events read over SSE, then lost with the primary: "
        f"{sum(len(lost[c.message_id]) for c in chats if c.on_victim)} on the killed shard, "
        f"{sum(len(lost[c.message_id]) for c in chats if not c.on_victim)} on the others"
    )
    restarted = [c for c in chats if "restart" in kinds(c.events)]
    status = {c.message_id: c.events[-1].json().get("status") if c.events else None for c in chats}
    print(
        "restarted: "
        f"{sum(c.on_victim for c in restarted)} of {ON_VICTIM} on the killed shard, "
        f"{sum(not c.on_victim for c in restarted)} of {STREAMS - ON_VICTIM} on the others"
    )
    for name in ("before", "during", "after"):
        tries = [c.cancels for c in chats if c.cancel_phase == name]
        print(f"cancels {name}: {tries}")
    live = [c for c in chats if c.cancel_phase != "before"]
    gaps_victim = [largest_gap(c.events) for c in live if c.on_victim]
    gaps_other = [largest_gap(c.events) for c in live if not c.on_victim]
    print(f"largest gap, killed shard: {spread(gaps_victim)}")
    print(f"largest gap, other shards: {spread(gaps_other)}")
    print(f"final statuses: {sorted(collections.Counter(status.values()).items())}")

    for chat in chats:
        sse_checks(chat.message_id, chat.events)
        wanted = "cancelled" if chat.cancel_phase else "completed"
        assert status[chat.message_id] == wanted, (
            chat.message_id,
            chat.on_victim,
            chat.cancel_phase,
            chat.events[-1].data,
        )
        if wanted == "completed":
            assert texts_after_last_restart(chat.events) == full, chat.message_id
    # every owner was alive: each kept its streams (ai_consumer/takeover.py waits a lease
    # after Redis comes back before taking any over); nothing was generated twice
    assert not restarted, [(c.message_id, c.on_victim, kinds(c.events)) for c in restarted]

    seen = await read_responses(
        settings,
        {c.session for c in chats},
        lambda evs: len({e["message_id"] for e in terminal(evs)}) >= STREAMS,
        within=60,
    )
    for chat in chats:
        mine = kafka_checks(chat.message_id, seen)
        wanted = "chat.cancelled" if chat.cancel_phase else "chat.completed"
        assert mine[-1]["type"] == wanted, (chat.message_id, mine[-1])
        starts = [e for e in mine if e["type"] == "chat.started"]
        assert len(starts) == 1, (chat.message_id, starts)

    assert not any(lost[c.message_id] for c in chats if not c.on_victim), lost
    assert "streaming" not in found.values(), found
    for chat in chats:
        wanted = "cancelled" if chat.cancel_phase else "completed"
        assert found[chat.message_id] == wanted, (chat.message_id, found[chat.message_id])
