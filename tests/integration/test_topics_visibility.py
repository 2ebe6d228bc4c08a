"""Regression test: `ensure_topics` right after other topics were deleted.

A broker busy deleting topics (the `topics` fixture after every test, `cluster_topics` after
every module) lists newly created topics a moment late; ensure_topics used to describe them once
and raise `TopicDrift("... not visible after create")`. It now polls until they are visible.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid

from chatpipe.clients import make_admin
from chatpipe.settings import Settings
from chatpipe.topics import ensure_topics, topic_specs


async def test_ensure_topics_right_after_other_topics_were_deleted(settings: Settings) -> None:
    spaces = [
        Settings(
            kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
            topic_prefix=f"{settings.topic_prefix}{uuid.uuid4().hex[:6]}.",
        )
        for _ in range(4)
    ]
    admin = make_admin(settings)
    await admin.start()
    try:
        await ensure_topics(admin, spaces[0])
        for previous, current in itertools.pairwise(spaces):
            await admin.delete_topics([t.name for t in topic_specs(previous)])
            await ensure_topics(admin, current)
    finally:
        for space in spaces:
            with contextlib.suppress(Exception):  # already deleted, or never created
                await admin.delete_topics([t.name for t in topic_specs(space)])
        await admin.close()
