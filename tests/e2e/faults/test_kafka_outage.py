"""Issue 4, fault 7: the Kafka broker stops for 10 s and comes back.

While it is away the api answers new chats with 503 and Retry-After within API_KAFKA_TIMEOUT_S
(2 s here, 5 s by default), never hanging; answers already streaming go on through Redis and end
with exactly one `done` on SSE, and their terminal event reaches chat.responses once the broker
is back. Afterwards every process works again as it is (same pids, none restarted).

Issue 12, item 5: every partition works again for every api. While the broker is away the chats
are posted to one session per partition (not to new random sessions, which would land on a
partition that still works and hide one that does not): an idempotent producer whose batch for
a partition expired has a gap in that partition's sequence numbers, and the broker refuses its
next record there with OutOfOrderSequenceNumber. Afterwards each of those sessions must be
accepted again by each api.

Issue 12, item 9: a 503 means "not queued". The api's producer may still deliver a record it
gave up on (a batch in flight when the broker went away, sent again when it is back); such a
record is skipped (the api withdrew the message in Redis), so the user's retry does not get a
second answer. A retry with the same `message_id` is accepted and answered once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid

import httpx
import pytest
from aiokafka.partitioner import murmur2

from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, Api, ClusterShape
from tests.e2e.faults.consumer_support import recorded
from tests.e2e.faults.own_stack import OWN_STACK, real_services  # noqa: F401
from tests.e2e.records import of_message, read_responses, terminal
from tests.interop.stack import read_topic
from tests.support.cluster import Cluster, new_session
from tests.support.private_stack import PrivateStack
from tests.support.sse import chunks, dones
from tests.support.wait import apoll

pytestmark = [pytest.mark.e2e, pytest.mark.faults, OWN_STACK]

TIMEOUT_S = 2.0
OUTAGE_S = 10.0
IN_FLIGHT = 3


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {**DEFAULT_ENV, "api_kafka_timeout_s": TIMEOUT_S, "retry_after_s": 2}


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """2 api + 1 ai_consumer + 1 cancel_listener."""
    return ClusterShape(consumers=1, ready_timeout=90)


def sessions_per_partition(partitions: int) -> list[str]:
    """One new session id for each partition (chatpipe keys chat.requests by session)."""
    found: dict[int, str] = {}
    while len(found) < partitions:
        session = new_session()
        found.setdefault((murmur2(session.encode()) & 0x7FFFFFFF) % partitions, session)
    return [found[p] for p in range(partitions)]


async def timed_post(
    api: Api, session: str, message_id: str | None = None
) -> tuple[httpx.Response, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = {"session_id": session, "message": "hi", "options": {"max_tokens": 3}}
    if message_id is not None:
        body["message_id"] = message_id
    response = await api.client.post("/api/chat", json=body)
    return response, loop.time() - started


async def test_a_kafka_outage_gives_bounded_503s_and_everything_resumes(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, private: PrivateStack
) -> None:
    a, b = apis
    loop = asyncio.get_running_loop()
    pids = {p.name: p.pid for p in cluster.procs}
    sessions = [new_session() for _ in range(IN_FLIGHT)]
    ids = [(await a.chat(s, max_tokens=60))["message_id"] for s in sessions]  # 6 s answers
    # opened together and recorded; each one opened is closed, whatever fails
    async with recorded(b.stream(m) for m in ids) as streams:
        for s in streams:
            await s.wait_for(lambda evs: len(chunks(evs)) >= 1, within=20, what="a chunk")

        # chats keep coming on every partition, from both apis, while the broker shuts down
        # and while it is away (as in production: a producer sees the broker go)
        each = sessions_per_partition(settings.topic_partitions)
        answers: list[tuple[int, str | None, float]] = []
        refused: dict[str, str] = {}  # message_id -> session of every 503 (before or after)
        stopped: list[float] = []  # when the broker was down

        async def keep_posting() -> None:
            while not stopped or loop.time() - stopped[0] < OUTAGE_S:
                sent = loop.time()
                sent_ids = [(s, uuid.uuid4().hex) for _ in (a, b) for s in each]
                posts = [
                    timed_post(api, session, message_id)
                    for api, (session, message_id) in zip(
                        [a] * len(each) + [b] * len(each), sent_ids, strict=True
                    )
                ]
                results = await asyncio.gather(*posts)
                for (session, message_id), (response, _) in zip(sent_ids, results, strict=True):
                    if response.status_code == 503:
                        refused[message_id] = session
                for response, took in results:
                    if stopped and sent >= stopped[0]:  # sent with the broker down
                        status, retry = response.status_code, response.headers.get("retry-after")
                        answers.append((status, retry, took))
                await asyncio.sleep(0.2)  # sleep-ok: pacing the load, nothing to wait on

        posting = asyncio.create_task(keep_posting())
        try:
            await asyncio.to_thread(private.stop, "kafka")
            stopped.append(loop.time())
            await posting
        finally:
            posting.cancel()
        ready = await a.client.get("/ready")
        assert ready.status_code == 503, ready.text

        # in flight: every answer ends on SSE, once, the broker still away
        for s in streams:
            await s.wait_done(within=20)
        await asyncio.to_thread(private.start, "kafka")

    assert len(answers) >= 4, answers
    assert {status for status, _, _ in answers} == {503}, answers
    assert all(retry == "2" for _, retry, _ in answers), answers
    # bounded: API_KAFKA_TIMEOUT_S plus the request's own work (headroom for a loaded machine)
    assert max(took for _, _, took in answers) <= TIMEOUT_S + 1.5, answers
    for s, message_id in zip(streams, ids, strict=True):
        names = [e.event for e in s.events]
        assert names.count("done") == 1, (message_id, names)
        assert names[-1] == "done", (message_id, names)

    # back: both apis accept again on every partition (the sessions they failed on during the
    # outage), and the consumer answers, with the same processes
    async def accepted(api: Api, session: str) -> str | None:
        response, _ = await timed_post(api, session)
        return str(response.json()["message_id"]) if response.status_code == 202 else None

    back = loop.time()
    after: list[str] = []  # accepted after the outage, one per api and partition
    for api in (a, b):
        for partition, session in enumerate(each):
            message_id = await apoll(
                f"{api.name} to accept chats again on partition {partition}",
                functools.partial(accepted, api, session),
                max(5.0, 60 - (loop.time() - back)),
            )
            after.append(message_id)
        async with api.stream(message_id) as stream:
            events = await stream.until_done(within=60)
        assert [d.json()["status"] for d in dones(events)] == ["completed"], events
    assert {p.name: p.pid for p in cluster.procs} == pids
    assert all(p.alive() for p in cluster.procs)

    # the terminal events of the answers that were in flight reached chat.responses, once each
    seen = await read_responses(
        settings,
        set(sessions),
        lambda evs: all(terminal(evs, m) for m in ids),
        within=60,
    )
    for message_id in ids:
        assert len(terminal(of_message(seen, message_id))) == 1, of_message(seen, message_id)

    # item 9: no 503'd message is answered, also when the broker took its record late. Per
    # session order: once the messages accepted after the outage (same sessions) have ended,
    # every earlier record of those sessions has been handled.
    assert refused, "no chat was refused during the outage"
    later = await read_responses(
        settings, set(each), lambda evs: all(terminal(evs, m) for m in after), within=60
    )
    answered = {str(e.get("message_id")) for e in later} & refused.keys()
    queued = {
        str(json.loads(r.value)["message_id"])
        for r in await read_topic(settings, settings.requests_topic)
        if r.value is not None and r.key is not None and r.key.decode() in set(each)
    }
    print(f"{len(refused)} chats refused 503, {len(queued & refused.keys())} of them in Kafka late")
    assert not answered, f"answered after a 503: {sorted(answered)}"
    # the user's retry with the same message_id: accepted, answered once
    message_id, session = next(iter(refused.items()))
    response, _ = await timed_post(a, session, message_id)
    assert response.status_code == 202, response.text
    async with b.stream(message_id) as stream:
        events = await stream.until_done(within=30)
    assert [d.json()["status"] for d in dones(events)] == ["completed"], events
