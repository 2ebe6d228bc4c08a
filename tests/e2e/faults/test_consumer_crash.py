"""Issue 4, fault 1: kill -9 of the ai_consumer that is streaming a message.

Real processes (2 api, 3 ai_consumer, 1 cancel_listener) on the shared Kafka + Redis, in this
module's namespace, with the default LEASE_MS (2 s) and KAFKA_SESSION_TIMEOUT_MS (10 s). A surviving instance
takes each of the dead one's streams over from Redis once its lease lapsed
(ai_consumer/takeover.py), long before the group notices the dead member: the client sees
`restart`, then the whole answer again, then one `done` (design §3.2). Issue 12: the stream
goes on within 3 s of the kill (p50/p99 of the gap printed over at least 20 streams; the
assertion leaves headroom for a loaded machine, but stays far below the session timeout).
"""

from __future__ import annotations

import asyncio
import collections
import statistics

import pytest
from redis.asyncio import Redis

from ai_consumer.llm.simulated import simulated_tokens
from chatpipe.schemas import ChatRequest
from chatpipe.settings import Settings
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
from tests.support.cluster import Cluster, new_session
from tests.support.sse import chunks, dones

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TOKENS = 60


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    # 60 tokens 250 ms apart: a 15 s answer, long enough to be killed in the middle of it also
    # when the 60 SSE streams take seconds to open (CI, at the busy start of a run, twice saw
    # every answer of the victim end before the kill, with 4.5 s and with 9 s answers)
    return {
        **DEFAULT_ENV,
        "sim_tokens": TOKENS,
        "sim_token_delay_ms": 250,
        "sim_first_token_delay_ms": 100,
    }


async def test_kill_9_of_a_streaming_consumer_ends_every_message_once(
    cluster: Cluster, apis: tuple[Api, Api], settings: Settings, redis: Redis
) -> None:
    a, b = apis
    sessions = [new_session() for _ in range(60)]  # the victim streams 20 of them at least
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
        victims = {m for m in ids if owner[m] == victim_id}
        assert victim.kind == "ai_consumer", owner
        assert len(victims) >= 20, owner
        # the precondition, read from Redis right before the kill: most of the victim's
        # answers still run (if not, the box was too slow for this test: said plainly)
        running = await states(redis, settings, victims)
        assert sum(st == "streaming" for st in running.values()) >= 10, running
        cluster.retire(victim)
        killed_at = asyncio.get_running_loop().time()
        victim.kill()
        # the takeover (the lease) + the whole answer again (15 s), with headroom
        await asyncio.gather(*(s.wait_done(within=60) for s in streams))
        events = {m: s.events for m, s in by_id.items()}

    # the victim's answers that had ended when it was killed (not `streaming` just before it,
    # or ended in the moment between): their `done` came at once, not after a takeover (the
    # lease, then 15 s of answer); every other one was cut and restarts
    ended = {
        m
        for m in victims
        if running[m] != "streaming" or dones(events[m])[0].received < killed_at + 1.0
    }
    affected = victims - ended
    assert len(affected) >= 10, (len(victims), len(ended))

    # SSE: one done each, nothing twice; the victim's messages restarted, the others untouched
    full_answer = "".join(
        simulated_tokens(ChatRequest(message_id="x", session_id="x", message="hello there"), TOKENS)
    )
    # how long each stream of the victim stopped: from the kill to its first chunk after the
    # restart, as the client received them
    gaps = sorted(
        chunks(events[m][kinds(events[m]).index("restart") + 1 :])[0].received - killed_at
        for m in affected
    )
    p50, p99 = statistics.median(gaps), gaps[min(len(gaps) - 1, round(0.99 * len(gaps)))]
    print(f"kill -9 -> stream goes on: p50 {p50:.2f} s, p99 {p99:.2f} s over {len(gaps)} streams")
    assert p99 <= 6.0, gaps  # 3 s measured on a quiet box; 10 s + the rebalance without takeover
    for m in ids:
        evs = events[m]
        sse_checks(m, evs)
        assert evs[-1].json()["status"] == "completed", (m, evs[-1].data)
        if m in affected:
            assert kinds(evs).count("restart") == 1, (m, kinds(evs))
            after = evs[kinds(evs).index("restart") + 1 :]
            assert len(chunks(after)) == TOKENS, f"{m}: the new answer is not whole"
        else:  # another instance's, or the victim's that had ended
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
