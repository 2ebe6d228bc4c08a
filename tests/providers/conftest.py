"""`topics` for the provider and operations tests: retries while the broker's metadata lags the
create (see `tests.providers.procs.create_topics`); `redis` is the shared fixture.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chatpipe.settings import Settings
from tests.providers.procs import create_topics, delete_topics


@pytest.fixture
async def topics(settings: Settings) -> AsyncIterator[Settings]:
    await create_topics(settings)
    try:
        yield settings
    finally:
        await delete_topics(settings)
