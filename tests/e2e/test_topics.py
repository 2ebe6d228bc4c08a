"""A product bug found by the e2e suite, as a minimal failing test (belongs in tests/integration).

`chatpipe.topics.ensure_topics` creates the missing topics and then describes them once; when
the broker is still busy (here: deleting other topics, as the `topics` fixture does after every
test and `cluster_topics` after every module), the new topics are not in its metadata yet and
ensure_topics raises `TopicDrift("... not visible after create")` although they were created.
`chatpipe topics` and every test creating topics fail at random. Fix: after create_topics, poll
`_actual()` with a deadline (say 10 s) until every created topic is described without error.
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
            await ensure_topics(admin, current)  # raises TopicDrift: not visible after create
    finally:
        for space in spaces:
            with contextlib.suppress(Exception):  # already deleted, or never created
                await admin.delete_topics([t.name for t in topic_specs(space)])
        await admin.close()
