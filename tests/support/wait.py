"""Waiting with a deadline for something that has no event to wait on (a log file, an HTTP
answer, a Redis key): call a check at an interval until it returns something, or fail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitError(AssertionError):
    """Something did not happen before its deadline (a process did not start, exited, ...)."""


def poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Call `check` until it returns something other than None; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise WaitError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)  # sleep-ok: poll interval, nothing to wait on


async def apoll(
    what: str,
    check: Callable[[], Awaitable[T | None]],
    within: float,
    interval: float = 0.05,
) -> T:
    """Async `poll`: await `check()` until it returns something other than None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result is not None:
            return result
        if loop.time() >= deadline:
            raise WaitError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(interval)  # sleep-ok: poll interval, nothing to wait on
