"""When the server starts shutting down: the open SSE responses end then.

On SIGTERM uvicorn stops accepting, then waits for open connections to end before the
lifespan's shutdown runs; an SSE response never ends by itself, so without this uvicorn would
cancel each one mid-body after its graceful timeout (`timeout_graceful_shutdown`): a broken
connection instead of an end. With it each response ends its body (api/sse.py), the browser's
EventSource reconnects, through the load balancer, to another api with Last-Event-ID and
resumes from Redis: nothing is lost.

uvicorn has no hook at the moment shutdown starts, so one task per process (started by the
lifespan) polls the server's public `should_exit` flag a few times a second; `__main__`, which
owns the server, tells it where to look (`follow`). Without a server to follow (an app run in
process by a test), it never fires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def _never() -> bool:
    return False


class ServerExit:
    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self._should_exit: Callable[[], bool] = _never
        self._event = asyncio.Event()

    def follow(self, should_exit: Callable[[], bool]) -> None:
        """Watch this flag (`lambda: server.should_exit`)."""
        self._should_exit = should_exit

    async def watch(self) -> None:
        """Set the event once the flag is up (the lifespan runs it as a task)."""
        while not self._should_exit():  # noqa: ASYNC110 (uvicorn's flag notifies no one)
            await asyncio.sleep(self.interval_s)
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
