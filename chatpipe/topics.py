"""`chatpipe topics`: create the v1 topics idempotently and report drift in existing ones."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from chatpipe.errors import TopicDrift
from chatpipe.settings import Settings

TOPIC_ALREADY_EXISTS = 36
MAX_BYTES = str(10 * 1024 * 1024)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The design's topics (§2): partitions and the configs we insist on."""
    n = settings.topic_partitions
    return [
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


async def _actual(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, tuple[int, dict[str, str]]]:
    meta = await admin.describe_topics(names)
    found = {t["topic"]: len(t["partitions"]) for t in meta if t["error_code"] == 0}
    if not found:
        return {}
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in found]
    )
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            entries = resource[4]
            configs[resource[3]] = {e[0]: e[1] for e in entries}
    return {name: (parts, configs.get(name, {})) for name, parts in found.items()}


def _differences(spec: TopicSpec, partitions: int, configs: dict[str, str]) -> list[str]:
    out = []
    if partitions != spec.partitions:
        out.append(f"{spec.name}: partitions is {partitions}, expected {spec.partitions}")
    for key, want in spec.configs.items():
        have = configs.get(key)
        if have != want:
            out.append(f"{spec.name}: {key} is {have!r}, expected {want!r}")
    return out


async def ensure_topics(admin: AIOKafkaAdminClient, settings: Settings) -> TopicReport:
    """Create what is missing; compare what exists. Raises TopicDrift listing every difference."""
    specs = topic_specs(settings)
    report = TopicReport()
    actual = await _actual(admin, [s.name for s in specs])
    missing = [s for s in specs if s.name not in actual]
    if missing:
        response = await admin.create_topics(
            [
                NewTopic(
                    s.name, s.partitions, settings.topic_replication_factor, topic_configs=s.configs
                )
                for s in missing
            ]
        )
        for name, code, *rest in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise TopicDrift(
                    f"{name}: create failed with error {code} {rest[0] if rest else ''}"
                )
        # a new topic shows in metadata a moment later (longer right after deletions); a
        # concurrent creator may have won the race: check it like any existing topic
        names = [s.name for s in missing]
        for _ in range(100):
            actual.update(await _actual(admin, names))
            if all(name in actual for name in names):
                break
            await asyncio.sleep(0.1)
        report.created = [s.name for s in missing]
    for spec in specs:
        if spec.name not in actual:
            raise TopicDrift(f"{spec.name}: not visible after create")
        diffs = _differences(spec, *actual[spec.name])
        report.drift.extend(diffs)
        if not diffs and spec.name not in report.created:
            report.unchanged.append(spec.name)
    if report.drift:
        raise TopicDrift("\n".join(report.drift))
    return report
