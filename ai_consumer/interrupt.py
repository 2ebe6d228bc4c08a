"""Iterate an async generator until an event is set, without waiting for its next item."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def until_set(source: AsyncIterator[T], event: asyncio.Event) -> AsyncGenerator[T, None]:
    """Yield from `source` until it ends or `event` is set.

    The event wins even while `source` is blocked (a model that has not produced its first
    token): the pending `__anext__` is cancelled and `source` is closed, which is where a
    provider closes its upstream HTTP stream.
    """
    waiter = asyncio.ensure_future(event.wait())
    step: asyncio.Future[T] | None = None
    try:
        while not event.is_set():
            step = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        waiter.cancel()
        if step is not None and not step.done():
            # our own task was cancelled mid-step: stop the step before closing the source
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await step
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
