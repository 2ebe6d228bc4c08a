"""`topics` and `redis` for the provider and operations tests: the shared fixtures' behaviour,
with two fixes that belong in tests/conftest.py and chatpipe (reported, not owned here):

- `topics` retries while the broker's metadata lags the create (see
  `tests.providers.procs.create_topics`);
- `redis` closes its connection pool: `make_redis` builds `Redis(connection_pool=...)`, whose
  `aclose()` leaves the pool's connections open, and pytest's `filterwarnings = error` turns
  the ResourceWarnings into a failed session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from chatpipe.clients import make_redis
from chatpipe.settings import Settings
from tests.providers.procs import create_topics, delete_topics


@pytest.fixture
async def topics(settings: Settings) -> AsyncIterator[Settings]:
    await create_topics(settings)
    try:
        yield settings
    finally:
        await delete_topics(settings)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = make_redis(settings, max_connections=16)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{settings.key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose(close_connection_pool=True)
