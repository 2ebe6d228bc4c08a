"""Fixtures: real Kafka + Redis (tests/support/services.py), one namespace per test.

Every test gets its own topic names (prefix), consumer group and Redis key prefix, so tests
never see each other's data, on a shared broker and server.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from redis.asyncio import Redis

from chatpipe.clients import make_admin, make_redis
from chatpipe.settings import Settings
from chatpipe.topics import ensure_topics, topic_specs
from tests.support.services import HOW, Services, services


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (`-n 2 --dist loadgroup`), a module's tests run on one worker (its
    module-scoped processes and topics are started once), and tests/cluster's all on one: they
    stop and kill nodes of the one cluster stack, so none may run beside another."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            path = item.nodeid.split("::", 1)[0]
            group = "cluster" if path.startswith("tests/cluster/") else path
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def real_services() -> Iterator[Services]:
    with services() as found:
        if found is None:
            pytest.fail(HOW, pytrace=False)
        yield found


def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ns() -> str:
    """A fresh namespace: topic prefix `{ns}.`, key prefix `{ns}:`, group `{ns}-ai`."""
    return namespace()


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(real_services: Services, ns: str) -> SettingsFactory:
    """Settings pointing at the real services, inside this test's namespace."""

    def build(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "kafka_bootstrap_servers": real_services.kafka,
            "redis_url": real_services.redis_url,
            "topic_prefix": f"{ns}.",
            "key_prefix": f"{ns}:",
            "consumer_group": f"{ns}-ai",
            "topic_partitions": 12,
            "instance_id": f"test-{ns}",
            "log_format": "text",
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return build


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


@pytest.fixture
async def topics(settings: Settings) -> AsyncIterator[Settings]:
    """Creates this test's topics, deletes them afterwards; yields the settings naming them."""
    admin = make_admin(settings)
    await admin.start()
    try:
        await ensure_topics(admin, settings)
        yield settings
    finally:
        names = [t.name for t in topic_specs(settings)]
        with contextlib.suppress(Exception):
            await admin.delete_topics(names)
        await admin.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client of the real Redis; deletes this test's keys (its key prefix) afterwards."""
    client = make_redis(settings, max_connections=16)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{settings.key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
