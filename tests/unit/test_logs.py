"""chatpipe.logs: JSON lines name the process, and a message's ids bound once with
`log_context` reach every line logged meanwhile, also from tasks started inside it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from chatpipe.logs import JsonFormatter, RepeatFilter, TextFormatter, log_context


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("inst-1", "ai_consumer"))
    logger = logging.getLogger("test.chatpipe.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_bound_ids_reach_every_line_and_tasks_started_inside(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = captured
    with log_context(message_id="m-1", session_id="s-1"):
        logger.info("inside")
        await asyncio.create_task(_log_later(logger))
        logger.info("explicit wins", extra={"message_id": "m-2"})
    logger.info("outside")
    got = lines(out)
    assert [(g["msg"], g.get("message_id"), g.get("session_id")) for g in got] == [
        ("inside", "m-1", "s-1"),
        ("from a task", "m-1", "s-1"),
        ("explicit wins", "m-2", "s-1"),
        ("outside", None, None),
    ]
    assert {(g["service"], g["instance_id"]) for g in got} == {("ai_consumer", "inst-1")}


async def _log_later(logger: logging.Logger) -> None:
    logger.info("from a task")


def test_an_extra_cannot_rename_the_process(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = captured
    logger.info("lease owner", extra={"instance_id": "other", "service": "api"})
    (line,) = lines(out)
    assert (line["instance_id"], line["service"]) == ("inst-1", "ai_consumer")


def test_text_lines_carry_the_bound_ids() -> None:
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"})
    with log_context(message_id="m-9"):
        text = TextFormatter("inst-2", "api").format(record)
    assert "api[inst-2]" in text
    assert "'message_id': 'm-9'" in text


def test_a_flood_of_one_aiokafka_line_is_thinned_and_counted() -> None:
    now = [0.0]
    thin = RepeatFilter("aiokafka", every_s=5.0, clock=lambda: now[0])

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.makeLogRecord({"name": name, "msg": msg, "levelno": logging.ERROR})

    flood = 'Unable connect to "%s:%s": %s'
    assert thin.filter(record("aiokafka.client", flood))
    passed = [thin.filter(record("aiokafka.client", flood)) for _ in range(1000)]
    assert not any(passed)  # the repeats within 5 s are dropped ...
    assert thin.filter(record("aiokafka.client", "another line"))  # ... not other lines
    assert thin.filter(record("chatpipe.worker", flood))  # ... nor other loggers
    now[0] = 5.0
    after = record("aiokafka.client", flood)
    assert thin.filter(after)
    assert after.repeated == 1000  # the next one says how many were dropped
