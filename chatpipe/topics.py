"""`chatpipe topics`: create the v1 topics idempotently and report drift in existing ones."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from chatpipe.errors import DurabilityUnreachable, TopicDrift
from chatpipe.settings import Settings

TOPIC_ALREADY_EXISTS = 36
MAX_BYTES = str(10 * 1024 * 1024)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    replication_factor: int | None = None  # None: not checked (the cluster decides)


@dataclass(frozen=True)
class Durability:
    """How many copies of each partition, and how many must have a record before it is acked
    (with acks=all, which every chatpipe producer uses)."""

    replication_factor: int
    min_insync_replicas: int

    @classmethod
    def of(cls, settings: Settings, brokers: int) -> Durability:
        rf = settings.topic_replication_factor or (3 if brokers >= 3 else 1)
        min_isr = settings.topic_min_insync_replicas or max(1, rf - 1)
        if rf > brokers:
            raise DurabilityUnreachable(
                f"TOPIC_REPLICATION_FACTOR={rf} but the cluster has {brokers} broker(s)"
            )
        if min_isr > rf:
            raise DurabilityUnreachable(
                f"TOPIC_MIN_INSYNC_REPLICAS={min_isr} is over TOPIC_REPLICATION_FACTOR={rf}: "
                "no write could be acked"
            )
        return cls(rf, min_isr)


def topic_specs(settings: Settings, durability: Durability | None = None) -> list[TopicSpec]:
    """The design's topics (§2): partitions and the configs we insist on; with `durability`,
    also their replication factor and min.insync.replicas."""
    n = settings.topic_partitions
    specs = [
        # big enough that an oversized record can be produced, read and dead-lettered whole
        TopicSpec(
            settings.requests_topic, n, {"cleanup.policy": "delete", "max.message.bytes": MAX_BYTES}
        ),
        TopicSpec(
            settings.cancels_topic,
            n,
            {
                "cleanup.policy": "compact",
                # roll segments hourly so the compactor can reach them; keep tombstones 1 day
                "segment.ms": "3600000",
                "delete.retention.ms": "86400000",
                "min.cleanable.dirty.ratio": "0.1",
            },
        ),
        TopicSpec(settings.responses_topic, n, {"cleanup.policy": "delete"}),
        TopicSpec(
            settings.dlq_topic, 1, {"cleanup.policy": "delete", "max.message.bytes": MAX_BYTES}
        ),
    ]
    if durability is None:
        return specs
    isr = {"min.insync.replicas": str(durability.min_insync_replicas)}
    return [
        TopicSpec(s.name, s.partitions, {**s.configs, **isr}, durability.replication_factor)
        for s in specs
    ]


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"created   {name}" for name in self.created]
        out += [f"ok        {name}" for name in self.unchanged]
        out += [f"DRIFT     {d}" for d in self.drift]
        return out


@dataclass(frozen=True)
class Actual:
    partitions: int
    configs: dict[str, str]
    replication_factor: int  # the smallest of its partitions'


async def _actual(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, Actual]:
    """The topics of `names` that the brokers both list and describe the configs of. On a
    cluster, a topic just created is listed by one broker and not yet known to the one that
    answers describe_configs (UNKNOWN_TOPIC_OR_PARTITION, no configs): it counts as not there
    yet, rather than as a topic with none of our configs (a false drift)."""
    meta = await admin.describe_topics(names)
    found = {t["topic"]: t["partitions"] for t in meta if t["error_code"] == 0}
    if not found:
        return {}
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in found]
    )
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            if resource[0] == 0:
                configs[resource[3]] = {e[0]: e[1] for e in resource[4]}
    return {
        name: Actual(
            len(parts),
            configs[name],
            min((len(p["replicas"]) for p in parts), default=0),
        )
        for name, parts in found.items()
        if name in configs
    }


def _differences(spec: TopicSpec, actual: Actual) -> list[str]:
    out = []
    if actual.partitions != spec.partitions:
        out.append(f"{spec.name}: partitions is {actual.partitions}, expected {spec.partitions}")
    rf = spec.replication_factor
    if rf is not None and actual.replication_factor != rf:
        out.append(f"{spec.name}: replication factor is {actual.replication_factor}, expected {rf}")
    for key, want in spec.configs.items():
        have = actual.configs.get(key)
        if have != want:
            out.append(f"{spec.name}: {key} is {have!r}, expected {want!r}")
    return out


async def ensure_topics(admin: AIOKafkaAdminClient, settings: Settings) -> TopicReport:
    """Create what is missing; compare what exists. Raises TopicDrift listing every difference."""
    cluster = await admin.describe_cluster()
    durability = Durability.of(settings, len(cluster["brokers"]))
    specs = topic_specs(settings, durability)
    report = TopicReport()
    actual = await _actual(admin, [s.name for s in specs])
    missing = [s for s in specs if s.name not in actual]
    if missing:
        response = await admin.create_topics(
            [
                NewTopic(
                    s.name, s.partitions, durability.replication_factor, topic_configs=s.configs
                )
                for s in missing
            ]
        )
        for name, code, *rest in response.topic_errors:
            if code == 0:
                report.created.append(name)
            elif code != TOPIC_ALREADY_EXISTS:
                raise TopicDrift(
                    f"{name}: create failed with error {code} {rest[0] if rest else ''}"
                )
        # a new topic shows in metadata a moment later (longer right after deletions). One
        # that already existed (a concurrent creator won the race, or the broker that answered
        # did not know it yet: on a cluster, metadata reaches the brokers one by one) is
        # checked like any existing topic, and reported `ok` when it matches
        names = [s.name for s in missing]
        for _ in range(100):
            actual.update(await _actual(admin, names))
            if all(name in actual for name in names):
                break
            await asyncio.sleep(0.1)
    for spec in specs:
        if spec.name not in actual:
            raise TopicDrift(f"{spec.name}: not visible after create")
        diffs = _differences(spec, actual[spec.name])
        report.drift.extend(diffs)
        if not diffs and spec.name not in report.created:
            report.unchanged.append(spec.name)
    if report.drift:
        raise TopicDrift("\n".join(report.drift))
    return report
