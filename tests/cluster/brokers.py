"""What the brokers of the cluster stack say, through the admin client: who leads which
partition, which replicas are in sync. cluster.sh names broker `node.id` N `kafka-N`."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Collection
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from chatpipe.clients import make_admin
from chatpipe.settings import Settings
from tests.support.wait import apoll


def node_name(broker_id: int) -> str:
    """The cluster.sh node of a broker id (`node.id`)."""
    return f"kafka-{broker_id}"


@contextlib.asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = make_admin(settings)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def partitions(admin: AIOKafkaAdminClient, topics: Collection[str]) -> list[dict[str, Any]]:
    """Every partition of `topics` as the brokers describe it (leader, replicas, isr)."""
    found = await admin.describe_topics(list(topics))
    missing = [t["topic"] for t in found if t["error_code"] != 0]
    assert not missing, f"topics not described: {missing}"
    return [p for t in found for p in t["partitions"]]


async def leaders(admin: AIOKafkaAdminClient, topic: str) -> collections.Counter[int]:
    """How many partitions of `topic` each broker leads."""
    return collections.Counter(p["leader"] for p in await partitions(admin, [topic]))


async def led_by_others(admin: AIOKafkaAdminClient, topic: str, broker: int) -> bool | None:
    """True once every partition of `topic` has a live leader other than `broker` (None while
    not, or while the brokers do not answer)."""
    try:
        found = await partitions(admin, [topic])
    except KafkaError:
        return None
    return True if all(p["leader"] not in (broker, -1) for p in found) else None


async def wait_in_sync(
    admin: AIOKafkaAdminClient, topics: Collection[str], replicas: int = 3, within: float = 60.0
) -> None:
    """Until every partition of `topics` has all `replicas` replicas in its ISR."""
    behind: list[tuple[int, list[int]]] = []

    async def check() -> bool | None:
        try:
            found = await partitions(admin, topics)
        except KafkaError:
            return None
        behind[:] = [(p["partition"], p["isr"]) for p in found if len(p["isr"]) < replicas]
        return None if behind else True

    try:
        await apoll(f"ISR of {replicas} for every partition", check, within, interval=0.25)
    except AssertionError as e:
        raise AssertionError(f"{e}: (partition, isr) still behind: {behind}") from None
