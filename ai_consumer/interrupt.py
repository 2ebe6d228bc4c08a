"""Iterate an async generator until an event is set, without waiting for its next item."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def until_set(source: AsyncIterator[T], event: asyncio.Event) -> AsyncGenerator[T, None]:
    """Yield from `source` until it ends or `event` is set.

    The event wins even while `source` is blocked (a model that has not produced its first
    token): the pending `__anext__` is cancelled and `source` is closed, which is where a
    provider closes its upstream HTTP stream.

    The steps run in the caller's task (no Task and no `asyncio.wait` per item: this is on
    every token): when the event is set while a step is pending, that task is cancelled, and
    the cancellation is taken back here. A cancel of the caller from elsewhere still
    propagates.
    """
    task = asyncio.current_task()
    assert task is not None
    stepping = False
    interrupted = False

    def interrupt(_: object) -> None:
        nonlocal interrupted
        if stepping and not interrupted and event.is_set():
            interrupted = True
            task.cancel()

    waiter = asyncio.ensure_future(event.wait())
    waiter.add_done_callback(interrupt)
    try:
        while not event.is_set():
            stepping = True
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if interrupted and task.uncancel() == 0:
                    return  # the event won while the source was blocked
                raise
            finally:
                stepping = False
            if interrupted:  # the source swallowed our cancellation and went on
                task.uncancel()
                return
            yield item
    finally:
        waiter.remove_done_callback(interrupt)
        waiter.cancel()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
