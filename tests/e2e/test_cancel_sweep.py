"""chat.cancels does not grow without bound: the standalone cancel listener (a real process)
tombstones the cancel records whose work is done — cancels of messages already final, cancels
from a user who did not send the message, records that are no cancel, cancels of messages
Redis never saw once they are older than CANCEL_RECORD_MAX_AGE_S, and a pending cancel once
its message is final — and leaves alone those still pending and those under a key that is not
the canonical one. A listener started afterwards replays only what is left.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from chatpipe.keys import cancel_record_key
from chatpipe.schemas import ChatCancel
from chatpipe.settings import Settings
from chatpipe.state import State
from tests.e2e.conftest import ClusterShape
from tests.e2e.records import foreign_producer
from tests.interop.stack import read_topic
from tests.support.wait import apoll

pytestmark = pytest.mark.e2e

NOW = "2024-05-01T10:00:00.000000Z"
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """The standalone cancel listener only: the test writes the message states itself."""
    return ClusterShape(apis=0, consumers=0, listener=True)


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        "enforce_ownership": True,
        "cancel_sweep_interval_s": 0.3,
        "cancel_sweep_grace_s": 1.0,
        "cancel_record_max_age_s": 3600,
    }


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    async with foreign_producer(settings) as p:
        yield p


async def folded(settings: Settings) -> dict[bytes, bytes | None]:
    """chat.cancels as compaction will leave it: the last value of each key."""
    last: dict[bytes, bytes | None] = {}
    for r in await read_topic(settings, settings.cancels_topic):
        if r.key is not None:
            last[r.key] = r.value
    return last


async def test_cancel_records_whose_work_is_done_are_tombstoned(
    cluster: object, settings: Settings, redis: Redis, producer: AIOKafkaProducer
) -> None:
    state = State(redis, settings)
    u = uuid.uuid4().hex[:6]
    ids = {n: (f"s-{n}-{u}", f"m-{n}-{u}") for n in ("done", "live", "foreign", "old", "new")}
    await state.accept(*reversed(ids["done"]), "alice", NOW)
    assert (await state.claim(*reversed(ids["done"]), "alice", "i-1", NOW)).outcome == "start"
    await state.finish(*reversed(ids["done"]), "i-1", "completed", "", 3, NOW)
    await state.accept(*reversed(ids["live"]), "alice", NOW)
    await state.accept(*reversed(ids["foreign"]), "alice", NOW)

    async def send(name: str, user: str, timestamp_ms: int | None = None) -> bytes:
        session_id, message_id = ids[name]
        key = cancel_record_key(session_id, message_id).encode()
        value = ChatCancel(session_id=session_id, message_id=message_id, user_id=user).to_json()
        await producer.send_and_wait(
            settings.cancels_topic, value, key=key, timestamp_ms=timestamp_ms
        )
        return key

    now_ms = int(time.time() * 1000)
    done = await send("done", "alice")  # the message had ended before its cancel came
    live = await send("live", "alice")  # queued: the cancel is still to do its work
    foreign = await send("foreign", "mallory")  # not the sender's: ignored
    old = await send("old", "alice", timestamp_ms=now_ms - 2 * DAY_MS)  # never came
    new = await send("new", "alice")  # not seen yet, but young: may still come
    junk = f"junk-{u}".encode()
    await producer.send_and_wait(settings.cancels_topic, b"not a cancel", key=junk)
    # a 1.1 producer's unescaped key for ids with ':': applied, never tombstoned by chatpipe
    odd_session, odd_message = f"s-{u}:1", f"m-{u}"
    odd_value = ChatCancel(session_id=odd_session, message_id=odd_message).to_json()
    odd = f"{odd_session}:{odd_message}".encode()
    await producer.send_and_wait(settings.cancels_topic, odd_value, key=odd)

    gone = {done, foreign, old, junk}

    async def swept() -> dict[bytes, bytes | None] | None:
        topic = await folded(settings)
        return topic if all(topic.get(k, b"") is None for k in gone) else None

    topic = await apoll("the done, foreign, old and junk cancels tombstoned", swept, within=20)
    assert all(topic[k] is not None for k in (live, new, odd)), topic

    # the queued message ends (its streamer died before its own tombstone): swept then
    assert (await state.claim(*reversed(ids["live"]), "alice", "i-1", NOW)).outcome == "cancel"
    await state.finish(*reversed(ids["live"]), "i-1", "cancelled", "cancelled by user", 0, NOW)

    async def live_swept() -> dict[bytes, bytes | None] | None:
        topic = await folded(settings)
        return topic if topic.get(live, b"") is None else None

    topic = await apoll("the ended message's cancel tombstoned", live_swept, within=20)
    assert {k for k, v in topic.items() if v is not None} == {new, odd}
