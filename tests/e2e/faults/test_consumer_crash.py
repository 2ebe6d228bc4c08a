"""Issue 4, fault 1: kill -9 of the ai_consumer that is streaming a message.

Real processes (2 api, 3 ai_consumer, 1 cancel_listener) on a Kafka + Redis of this module's
own. The group notices the dead member after KAFKA_SESSION_TIMEOUT_MS (6 s, the broker's
minimum) and its lease has lapsed by then (LEASE_MS 3 s), so the new owner restarts the message:
the client sees `restart`, then the whole answer again, then one `done` (design §3.2).
"""

from __future__ import annotations

import asyncio
import collections

import pytest
from redis.asyncio import Redis

from ai_consumer.llm.simulated import simulated_tokens
from chatpipe.schemas import ChatRequest
from chatpipe.settings import Settings
from tests.e2e.cluster import Cluster, new_session
from tests.e2e.conftest import DEFAULT_ENV, Api
from tests.e2e.faults.consumer_support import (
    kafka_checks,
    kinds,
    owners,
    recorded,
    sse_checks,
    states,
    texts_after_last_restart,
)
from tests.e2e.records import read_responses
from tests.e2e.sse import chunks

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TOKENS = 30


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    # 30 tokens 150 ms apart: a 4.5 s answer, long enough to be killed in the middle of it
    return {
        **DEFAULT_ENV,
        "sim_tokens": TOKENS,
        "sim_token_delay_ms": 150,
        "sim_first_token_delay_ms": 100,
        "kafka_session_timeout_ms": 6000,
        "lease_ms": 3000,
    }


async def test_kill_9_of_a_streaming_consumer_ends_every_message_once(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    a, b = apis
    sessions = [new_session() for _ in range(12)]
    accepted = await asyncio.gather(*((a, b)[i % 2].chat(s) for i, s in enumerate(sessions)))
    ids = [x["message_id"] for x in accepted]
    # read each answer from the other api than the one that took it
    async with recorded((b, a)[i % 2].stream(m) for i, m in enumerate(ids)) as streams:
        by_id = dict(zip(ids, streams, strict=True))
        await asyncio.gather(
            *(
                s.wait_for(lambda evs: len(chunks(evs)) >= 2, within=20, what="2 chunks")
                for s in streams
            )
        )
        owner = await owners(redis, settings, ids)
        victim_id, _ = collections.Counter(owner.values()).most_common(1)[0]
        victim = cluster.by_instance(victim_id)
        affected = {m for m in ids if owner[m] == victim_id}
        assert affected, owner
        assert victim.kind == "ai_consumer", owner
        cluster.retire(victim)
        victim.kill()
        # detection (6 s session timeout) + the whole answer again (4.5 s), with headroom
        await asyncio.gather(*(s.wait_done(within=45) for s in streams))
        events = {m: s.events for m, s in by_id.items()}

    # SSE: one done each, nothing twice; the victim's messages restarted, the others untouched
    full_answer = "".join(
        simulated_tokens(ChatRequest(message_id="x", session_id="x", message="hello there"), TOKENS)
    )
    for m in ids:
        evs = events[m]
        sse_checks(m, evs)
        assert evs[-1].json()["status"] == "completed", (m, evs[-1].data)
        if m in affected:
            assert kinds(evs).count("restart") == 1, (m, kinds(evs))
            after = evs[kinds(evs).index("restart") + 1 :]
            assert len(chunks(after)) == TOKENS, f"{m}: the new answer is not whole"
        else:
            assert "restart" not in kinds(evs), (m, kinds(evs))
        assert texts_after_last_restart(evs) == full_answer, m

    # chat.responses: one terminal each; the victim's messages have a second, restarted start
    seen = await read_responses(
        settings,
        set(sessions),
        lambda evs: sum(e.get("type") == "chat.completed" for e in evs) >= len(ids),
        within=20,
    )
    for m in ids:
        mine = kafka_checks(m, seen)
        assert mine[-1]["type"] == "chat.completed"
        starts = [e for e in mine if e["type"] == "chat.started"]
        assert [bool(e.get("restart")) for e in starts][-1] is (m in affected), (m, starts)
        if m in affected:
            assert mine[-1]["instance_id"] != victim_id
        else:
            assert len(starts) == 1, (m, starts)

    # Redis: none stays streaming
    assert set((await states(redis, settings, ids)).values()) == {"completed"}
    assert all(p.alive() for p in cluster.consumer_procs), cluster.diagnostics()
