"""`chatpipe topics` as an operator runs it: a subprocess, configured from the environment."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from chatpipe.settings import Settings
from chatpipe.topics import ensure_topics, topic_specs
from tests.integration.conftest import delete_topics, wait_visible

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    out: str
    err: str


def space(settings: Settings, name: str) -> Settings:
    """Settings of a topic namespace of its own inside this test's namespace."""
    return settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}{name}."})


async def chatpipe_topics(settings: Settings, cwd: Path, **extra: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPIC_")}
    env.update(extra)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        TOPIC_PREFIX=settings.topic_prefix,
        TOPIC_PARTITIONS="12",
        INSTANCE_ID=settings.instance_id,
        PYTHONPATH=str(ROOT),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatpipe.cli",
        "topics",
        cwd=cwd,  # no `.env` there: only the environment configures it
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def names(settings: Settings) -> list[str]:
    return [t.name for t in topic_specs(settings)]


async def test_first_run_creates_the_topics_second_run_changes_nothing(
    settings: Settings, admin: AIOKafkaAdminClient, tmp_path: Path
) -> None:
    s = space(settings, "cli")
    try:
        first = await chatpipe_topics(s, tmp_path)
        assert first.code == 0, first.err
        assert first.out.split("\n")[:-1] == [f"created   {n}" for n in names(s)]
        second = await chatpipe_topics(s, tmp_path)
        assert second.code == 0, second.err
        assert second.out.split("\n")[:-1] == [f"ok        {n}" for n in names(s)]
        assert "created" not in second.out
        assert "DRIFT" not in second.out + second.err
        # what the command reported is what the broker has
        report = await ensure_topics(admin, s)
        assert report.unchanged == names(s)
    finally:
        await delete_topics(admin, s)


async def precreate(
    admin: AIOKafkaAdminClient,
    settings: Settings,
    partitions: dict[str, int] | None = None,
    configs: dict[str, dict[str, str]] | None = None,
) -> None:
    """Create all four topics as the design says, except the given differences (all four, so
    the command has nothing to create and only compares)."""
    topics = [
        NewTopic(
            t.name,
            (partitions or {}).get(t.name, t.partitions),
            1,
            topic_configs={**t.configs, **(configs or {}).get(t.name, {})},
        )
        for t in topic_specs(settings)
    ]
    response = await admin.create_topics(topics)
    assert all(code == 0 for _, code, *_ in response.topic_errors), response.topic_errors
    await wait_visible(settings, names(settings))


async def test_cancels_topic_with_delete_policy_is_reported_and_left_alone(
    settings: Settings, admin: AIOKafkaAdminClient, tmp_path: Path
) -> None:
    s = space(settings, "policy")
    try:
        await precreate(admin, s, configs={s.cancels_topic: {"cleanup.policy": "delete"}})
        run = await chatpipe_topics(s, tmp_path)
        assert run.code != 0
        drift = [line for line in run.err.splitlines() if "DRIFT" in line]
        assert len(drift) == 1, run.err
        assert s.cancels_topic in drift[0]
        assert "cleanup.policy" in drift[0]
        assert "'delete'" in drift[0]
        assert "'compact'" in drift[0]
        again = await chatpipe_topics(s, tmp_path)  # it reports, it does not "fix" data policy
        assert again.code == run.code
        assert again.err == run.err
    finally:
        await delete_topics(admin, s)


async def test_wrong_partition_count_is_reported(
    settings: Settings, admin: AIOKafkaAdminClient, tmp_path: Path
) -> None:
    s = space(settings, "parts")
    try:
        await precreate(admin, s, partitions={s.requests_topic: 3, s.dlq_topic: 2})
        run = await chatpipe_topics(s, tmp_path)
        assert run.code != 0
        drift = [line for line in run.err.splitlines() if "DRIFT" in line]
        assert any(s.requests_topic in d and "partitions is 3, expected 12" in d for d in drift), (
            run.err
        )
        assert any(s.dlq_topic in d and "partitions is 2, expected 1" in d for d in drift), run.err
        assert len(drift) == 2, run.err
    finally:
        await delete_topics(admin, s)


async def test_ensure_topics_right_after_other_topics_were_deleted(
    settings: Settings, admin: AIOKafkaAdminClient
) -> None:
    spaces = [space(settings, f"race{i}") for i in range(10)]
    previous: Settings | None = None
    try:
        for current in spaces:
            if previous is not None:
                await delete_topics(admin, previous)
            await ensure_topics(admin, current)
            previous = current
    finally:
        for s in spaces:
            await delete_topics(admin, s)


async def test_min_insync_replicas_other_than_asked_is_reported(
    settings: Settings, admin: AIOKafkaAdminClient, tmp_path: Path
) -> None:
    """Issue 13: the drift check compares min.insync.replicas (and the replication factor)."""
    s = space(settings, "isr")
    try:
        await precreate(admin, s, configs={s.responses_topic: {"min.insync.replicas": "2"}})
        run = await chatpipe_topics(s, tmp_path)  # one broker: RF 1, min ISR 1 by default
        assert run.code == 2, run.err
        drift = [line for line in run.err.splitlines() if "DRIFT" in line]
        assert len(drift) == 1, run.err
        assert s.responses_topic in drift[0]
        assert "min.insync.replicas is '2', expected '1'" in drift[0], drift
    finally:
        await delete_topics(admin, s)


async def test_a_replication_factor_the_cluster_cannot_hold_is_refused_before_creating(
    settings: Settings, admin: AIOKafkaAdminClient, tmp_path: Path
) -> None:
    s = space(settings, "rf")
    try:
        run = await chatpipe_topics(s, tmp_path, TOPIC_REPLICATION_FACTOR="3")
        assert run.code == 1, run.err
        assert "TOPIC_REPLICATION_FACTOR=3 but the cluster has 1 broker(s)" in run.err
        assert not [n for n in await admin.list_topics() if n.startswith(s.topic_prefix)]
    finally:
        await delete_topics(admin, s)
