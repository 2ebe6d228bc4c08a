"""chatpipe/entry.py: every process runs on the event loop EVENT_LOOP names (uvloop's by
default: asyncio's own loop machinery was a third of the ai_consumer's CPU per token)."""

from __future__ import annotations

import asyncio
import sys
from unittest import mock

import pytest

from chatpipe.entry import loop_factory, run_service
from chatpipe.settings import Settings


def loop_module_of_run(event_loop: str) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_service(main(), "test", event_loop)
    return seen[0]


def test_the_default_is_uvloop_and_asyncio_can_be_asked_for() -> None:
    assert Settings().event_loop == "auto"
    assert loop_module_of_run("auto").startswith("uvloop")
    assert loop_module_of_run("uvloop").startswith("uvloop")
    assert loop_module_of_run("asyncio").startswith("asyncio")


async def never_run() -> None:
    """A service's main coroutine that must not start: its loop cannot be made."""
    raise AssertionError("ran without its event loop")


def test_auto_without_uvloop_falls_back_and_uvloop_without_it_says_what_to_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with mock.patch.dict(sys.modules, {"uvloop": None}):  # `import uvloop` raises ImportError
        assert loop_factory("auto") == ("asyncio", None)
        with pytest.raises(SystemExit) as exited:
            run_service(never_run(), "test", "uvloop")
    assert exited.value.code == 1
    assert "pip install uvloop, or set EVENT_LOOP=auto" in caplog.text
