"""`ensure_topics` reports a topic `created` only when this call created it.

On a Kafka cluster a topic's metadata reaches the brokers one by one: right after another
`chatpipe topics` (or an earlier call) created the topics, the broker that answers may not
know them yet, so they look missing, and their create answers TOPIC_ALREADY_EXISTS. They
existed: the report must say `ok` (checked like any existing topic), not `created`. CI saw
the report say `created` for the four topics on the 3-broker stack
(tests/cluster/test_kafka_durability.py, the second call). A fake admin plays that broker:
the real cluster shows the lag only now and then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from chatpipe.settings import Settings
from chatpipe.topics import TOPIC_ALREADY_EXISTS, Durability, ensure_topics, topic_specs


@dataclass
class Created:
    topic_errors: list[tuple[str, int, str | None]]


@dataclass
class Configs:
    resources: list[tuple[int, str | None, int, str, list[tuple[str, str]]]]


class LaggingAdmin:
    """One broker: the topics exist already, but it answers as if it did not know them yet
    for its first `lag` describe_topics calls."""

    def __init__(self, settings: Settings, lag: int) -> None:
        self.specs = {s.name: s for s in topic_specs(settings, Durability(1, 1))}
        self.lag = lag
        self.created: list[str] = []

    async def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"node_id": 1}]}

    async def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        if self.lag > 0:
            self.lag -= 1
            return [{"topic": n, "error_code": 3, "partitions": []} for n in names]
        return [
            {
                "topic": n,
                "error_code": 0,
                "partitions": [{"replicas": [1]} for _ in range(self.specs[n].partitions)],
            }
            for n in names
        ]

    async def describe_configs(self, resources: list[Any]) -> list[Configs]:
        return [
            Configs(
                [(0, None, 2, r.name, list(self.specs[r.name].configs.items())) for r in resources]
            )
        ]

    async def create_topics(self, topics: list[NewTopic]) -> Created:
        return Created([(t.name, TOPIC_ALREADY_EXISTS, "Topic already exists.") for t in topics])


async def test_topics_that_already_existed_are_reported_ok_not_created() -> None:
    settings = Settings(_env_file=None, topic_prefix="t.")  # type: ignore[call-arg]
    admin = LaggingAdmin(settings, lag=1)

    report = await ensure_topics(cast(AIOKafkaAdminClient, admin), settings)

    assert report.created == []
    assert sorted(report.unchanged) == sorted(admin.specs)
    assert report.drift == []
