"""The SSE response of the stream routes (api/sse.py) with a fake server: a fake ASGI receive
(the client's disconnect is a message put on it) and fake sends that record the messages,
one of which can block as a client that stopped reading does. The real checks are the e2e
tests (tests/e2e/test_stream.py, tests/e2e/faults/test_slow_client.py)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from api.sse import SendTimeout, SSEResponse

WITHIN = 5.0  # seconds any awaited outcome may take


class Events:
    """An event iterator as ChatService._events: what is put comes out; its `finally` is seen."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.started = False
        self.closed = asyncio.Event()

    async def iterate(self) -> AsyncIterator[bytes]:
        self.started = True
        try:
            while (item := await self.queue.get()) is not None:
                yield item
        finally:
            self.closed.set()


class Slot:
    def __init__(self) -> None:
        self.released = asyncio.Event()

    async def release(self) -> None:
        self.released.set()


class Server:
    """Records what is sent. After `stall_after` bodies, the send blocks forever (a client that
    stopped reading)."""

    def __init__(self, stall_after: int | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent = asyncio.Condition()
        self.stall_after = stall_after
        self.stalled = asyncio.Event()

    @property
    def body_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    async def send(self, message: Any) -> None:
        limit = math.inf if self.stall_after is None else self.stall_after
        if message["type"] == "http.response.body" and len(self.body_messages) >= limit:
            self.stalled.set()
            await asyncio.Event().wait()
        async with self.sent:
            self.messages.append(dict(message))
            self.sent.notify_all()

    async def receive(self) -> dict[str, Any]:
        return await self.received.get()

    async def bodies(self, n: int) -> list[bytes]:
        async with self.sent:
            await asyncio.wait_for(self.sent.wait_for(lambda: len(self.body_messages) >= n), WITHIN)
        return [m["body"] for m in self.body_messages]

    def scope(self, method: str = "GET") -> dict[str, Any]:
        return {"type": "http", "method": method, "path": "/s"}


class Exit:
    """The server's shutdown, as api/exiting.py's ServerExit.wait."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()


def response(events: Events, slot: Slot, **kwargs: Any) -> SSEResponse:
    settings: dict[str, Any] = {"heartbeat_s": 15.0, "send_timeout_s": 30.0, **kwargs}
    return SSEResponse(events.iterate(), slot.release, **settings)


async def test_events_go_out_then_the_body_ends_when_they_end() -> None:
    events, slot, server = Events(), Slot(), Server()
    sse = response(events, slot, headers={"X-Message-Id": "m1"})
    task = asyncio.create_task(sse(server.scope(), server.receive, server.send))
    await events.queue.put(b"id: 1-1\r\nevent: chunk\r\ndata: {}\r\n\r\n")
    assert await server.bodies(1) == [b"id: 1-1\r\nevent: chunk\r\ndata: {}\r\n\r\n"]
    await events.queue.put(None)  # the iterator ends (done sent, or the hub stopped)
    await asyncio.wait_for(task, WITHIN)

    start = server.messages[0]
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    assert dict(start["headers"]) == {
        b"cache-control": b"no-cache",
        b"x-accel-buffering": b"no",
        b"x-message-id": b"m1",
        b"connection": b"keep-alive",
        b"content-type": b"text/event-stream; charset=utf-8",
    }
    assert server.messages[-1] == {
        "type": "http.response.body",
        "body": b"",
        "more_body": False,
    }
    assert all(m["more_body"] for m in server.body_messages[:-1])
    assert events.closed.is_set()
    assert slot.released.is_set()


async def test_the_servers_shutdown_ends_the_body_and_releases_everything() -> None:
    events, slot, server, exiting = Events(), Slot(), Server(), Exit()
    sse = response(events, slot, exiting=exiting.wait)
    task = asyncio.create_task(sse(server.scope(), server.receive, server.send))
    await events.queue.put(b"one")
    await server.bodies(1)
    exiting.event.set()
    await asyncio.wait_for(task, WITHIN)  # ends although the iterator has more to come
    assert [m["body"] for m in server.body_messages] == [b"one", b""]
    assert server.messages[-1]["more_body"] is False  # a terminated body, not a cut one
    assert events.closed.is_set()
    assert slot.released.is_set()


async def test_a_client_disconnect_ends_the_response_and_releases_everything() -> None:
    events, slot, server = Events(), Slot(), Server()
    task = asyncio.create_task(response(events, slot)(server.scope(), server.receive, server.send))
    await events.queue.put(b"one")
    await server.bodies(1)
    await server.received.put({"type": "http.request", "body": b"", "more_body": False})
    await server.received.put({"type": "http.disconnect"})
    await asyncio.wait_for(task, WITHIN)  # ends although the iterator has nothing more
    assert events.closed.is_set(), "the event iterator was not closed (hub subscription kept)"
    assert slot.released.is_set()
    assert [m["body"] for m in server.body_messages] == [b"one"]  # nothing after the disconnect


async def test_an_idle_stream_gets_comment_heartbeats() -> None:
    events, slot, server = Events(), Slot(), Server()
    sse = response(events, slot, heartbeat_s=0.05)
    task = asyncio.create_task(sse(server.scope(), server.receive, server.send))
    pings = await server.bodies(2)
    for ping in pings:
        # one comment line, as sse-starlette's ping: ": ping - <UTC time>"
        assert re.fullmatch(rb": ping - \d{4}-\d\d-\d\d [\d:.]+\+00:00\r\n\r\n", ping), ping
    await events.queue.put(None)
    await asyncio.wait_for(task, WITHIN)


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout() -> None:
    events, slot, server = Events(), Slot(), Server(stall_after=1)
    sse = response(events, slot, send_timeout_s=0.3)
    task = asyncio.create_task(sse(server.scope(), server.receive, server.send))
    await events.queue.put(b"taken")
    await events.queue.put(b"never taken")
    await asyncio.wait_for(server.stalled.wait(), WITHIN)
    loop = asyncio.get_running_loop()
    stalled_at = loop.time()
    with pytest.raises(SendTimeout):
        await asyncio.wait_for(task, WITHIN)
    assert loop.time() - stalled_at + 0.01 >= 0.3  # not before the timeout (clock granularity)
    assert events.closed.is_set()
    assert slot.released.is_set()


async def test_a_stalled_heartbeat_is_dropped_too() -> None:
    events, slot, server = Events(), Slot(), Server(stall_after=0)
    sse = response(events, slot, heartbeat_s=0.05, send_timeout_s=0.3)
    with pytest.raises(SendTimeout):
        await asyncio.wait_for(sse(server.scope(), server.receive, server.send), WITHIN)
    assert server.stalled.is_set()
    assert slot.released.is_set()


async def test_head_answers_the_headers_and_never_starts_the_stream() -> None:
    events, slot, server = Events(), Slot(), Server()
    await asyncio.wait_for(
        response(events, slot)(server.scope("HEAD"), server.receive, server.send), WITHIN
    )
    start, *bodies = server.messages
    assert start["type"] == "http.response.start"
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert bodies == [{"type": "http.response.body", "body": b"", "more_body": False}]
    assert not events.started
    assert slot.released.is_set()


async def test_an_iterator_failure_still_releases_and_is_raised() -> None:
    slot, server = Slot(), Server()

    async def failing() -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError("boom")

    sse = SSEResponse(failing(), slot.release, heartbeat_s=15, send_timeout_s=30)
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(sse(server.scope(), server.receive, server.send), WITHIN)
    assert slot.released.is_set()
