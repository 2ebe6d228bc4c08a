"""until_set: a cancel ends the iteration at once, also while the model has not produced its
next token, and closes the source (where a provider closes its upstream HTTP stream)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from ai_consumer.interrupt import until_set

TIMEOUT = 5


class Source:
    """Yields the given items, then blocks forever (a model that stalls) unless `finite`."""

    def __init__(self, items: list[str], finite: bool = False) -> None:
        self.items = items
        self.finite = finite
        self.blocked = asyncio.Event()
        self.closed = asyncio.Event()
        self.cancelled_while_blocked = False

    async def stream(self) -> AsyncIterator[str]:
        try:
            for item in self.items:
                yield item
            if not self.finite:
                self.blocked.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled_while_blocked = True
                    raise
        finally:
            self.closed.set()


async def test_event_set_while_source_blocks_ends_iteration_and_closes_source() -> None:
    source = Source(["a", "b"])
    stop = asyncio.Event()
    got: list[str] = []

    async def consume() -> None:
        async for item in until_set(source.stream(), stop):
            got.append(item)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(TIMEOUT):
        await source.blocked.wait()
    assert got == ["a", "b"]
    stop.set()
    async with asyncio.timeout(TIMEOUT):
        await task  # ends although the source never yields again
    assert source.closed.is_set()  # the source's finally ran: upstream released
    assert source.cancelled_while_blocked


async def test_source_that_ends_is_read_to_the_end_and_closed() -> None:
    source = Source(["a", "b", "c"], finite=True)
    got = [item async for item in until_set(source.stream(), asyncio.Event())]
    assert got == ["a", "b", "c"]
    assert source.closed.is_set()


async def test_event_set_before_the_first_item_yields_nothing() -> None:
    source = Source(["a"], finite=True)
    stop = asyncio.Event()
    stop.set()
    got = [item async for item in until_set(source.stream(), stop)]
    assert got == []


async def test_event_set_between_items_stops_before_the_next_item() -> None:
    source = Source(["a", "b", "c"], finite=True)
    stop = asyncio.Event()
    got: list[str] = []
    async for item in until_set(source.stream(), stop):
        got.append(item)
        if item == "a":
            stop.set()
    assert got == ["a"]
    assert source.closed.is_set()


async def test_consumer_breaking_out_closes_the_source() -> None:
    source = Source(["a", "b"])
    async with contextlib.aclosing(until_set(source.stream(), asyncio.Event())) as items:
        async for _ in items:
            break
    assert source.closed.is_set()


async def test_source_error_reaches_the_consumer() -> None:
    async def broken() -> AsyncIterator[str]:
        yield "a"
        raise ValueError("upstream said 500")

    got: list[str] = []

    async def consume() -> None:
        async for item in until_set(broken(), asyncio.Event()):
            got.append(item)

    with pytest.raises(ValueError, match="upstream said 500"):
        await consume()
    assert got == ["a"]


async def test_cancelling_the_consumer_while_the_source_blocks_closes_the_source() -> None:
    source = Source(["a"])

    async def consume() -> None:
        async for _ in until_set(source.stream(), asyncio.Event()):
            pass

    task = asyncio.create_task(consume())
    before = asyncio.all_tasks()
    try:
        async with asyncio.timeout(TIMEOUT):
            await source.blocked.wait()
        task.cancel()
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
        assert source.closed.is_set()  # the upstream is released at once
    finally:
        # the leaked `anext` step, if any: cancel it so it does not outlive the test
        for leaked in asyncio.all_tasks() - before - {asyncio.current_task()}:
            leaked.cancel()
            await asyncio.gather(leaked, return_exceptions=True)
