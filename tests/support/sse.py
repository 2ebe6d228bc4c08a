"""The SSE reader of the tests that only need the events of a response: httpx-sse (spec
parsing, `id` carried over, comments skipped), with chatpipe's JSON data decoded.

tests/e2e/sse.py keeps a reader of its own on purpose: it counts comments (the heartbeats)
and stamps each event with the time it arrived, which the timing and heartbeat tests assert.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: dict[str, Any]  # the event's JSON data
    id: str | None


async def sse_events(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """The events of a `text/event-stream` response, as they come."""
    async for e in EventSource(response).aiter_sse():
        if e.data:
            yield SSEEvent(e.event, json.loads(e.data), e.id or None)
