"""Running a service's main coroutine: on the event loop EVENT_LOOP names (uvloop's by
default), and with chatpipe's own errors ending the process in one readable log line (for
example a refused Kafka or Redis login at start) instead of a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from chatpipe.errors import ChatpipeError

EXIT_ERROR = 1

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class InstallUvloop(ChatpipeError):
    """EVENT_LOOP=uvloop, and uvloop is not installed: install it, or set EVENT_LOOP=auto."""


def loop_factory(event_loop: str) -> tuple[str, LoopFactory | None]:
    """(name, factory) of the loop for EVENT_LOOP: uvloop's when asked for or, for `auto`,
    when it is installed; else asyncio's own (factory None)."""
    if event_loop == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if event_loop == "uvloop":
            raise InstallUvloop(
                "EVENT_LOOP=uvloop but uvloop is not installed: pip install uvloop, or set"
                " EVENT_LOOP=auto"
            ) from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def run_service(main: Coroutine[Any, Any, None], service: str, event_loop: str = "auto") -> None:
    log = logging.getLogger(service)
    try:
        name, factory = loop_factory(event_loop)
        log.info("event loop: %s", name)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main)
    except ChatpipeError as e:
        main.close()  # not started when the loop could not be made: no "never awaited"
        log.critical("%s stopped: %s", service, e)
        raise SystemExit(EXIT_ERROR) from None
