"""The SSE client of the tests: httpx streaming, parsed by httpx-sse's decoder, with a timeout on
every wait.

`SSEStream` opens one stream (`Last-Event-ID` sent when given) and reads it as a browser's
EventSource would; on top of httpx-sse it counts the comment lines (the api's heartbeats) and
stamps each event with the time it arrived (for latency assertions). `sse_events(response)`
reads the events of a response a test opened itself.

The bench keeps a raw-socket reader of its own (bench/): it is a load driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
from httpx_sse._decoders import SSEDecoder


class SSEError(AssertionError):
    """The stream did not open as an SSE stream, or did not deliver in time."""


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str | None
    received: float  # loop.time() when the blank line dispatching it was read

    def json(self) -> dict[str, Any]:
        value = json.loads(self.data)
        assert isinstance(value, dict), f"SSE data is not a JSON object: {self.data!r}"
        return value

    @property
    def seq(self) -> int:
        return int(self.json()["seq"])


class EventDecoder:
    """httpx-sse's decoder (spec parsing: fields, multi-line data, the last `id` carried over,
    comments ignored), its events as `SSEEvent`s stamped with their arrival. A blank line that
    ends no event (the one after a heartbeat comment) dispatches nothing: httpx-sse would make
    an empty `message` of it once an `id` has been seen."""

    def __init__(self) -> None:
        self._decoder = SSEDecoder()

    def decode(self, line: str) -> SSEEvent | None:
        sse = self._decoder.decode(line)
        if sse is None or (not sse.data and sse.event == "message"):
            return None
        return SSEEvent(sse.event, sse.data, sse.id or None, asyncio.get_running_loop().time())


async def sse_events(response: httpx.Response) -> AsyncIterator[SSEEvent]:
    """The events of a `text/event-stream` response a test opened itself, as they come."""
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise SSEError(f"{response.url}: content-type {content_type!r}, not SSE")
    decoder = EventDecoder()
    async for line in response.aiter_lines():
        found = decoder.decode(line)
        if found is not None:
            yield found


@dataclass
class SSEStream:
    """One SSE connection. Use `async with`; read with `next_event()` or let `record()` collect
    every event in the background (`events`, `wait_for()`)."""

    client: httpx.AsyncClient
    url: str
    last_event_id: str | None = None
    open_timeout: float = 10.0
    method: str = "GET"
    body: dict[str, Any] | None = None  # JSON body (POST /api/chat/stream)
    status_code: int = 0
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    events: list[SSEEvent] = field(default_factory=list)
    comments: int = 0
    _response: httpx.Response | None = None
    _lines: AsyncIterator[str] | None = None
    _decoder: EventDecoder = field(default_factory=EventDecoder)
    _stack: contextlib.AsyncExitStack | None = None
    _recorder: asyncio.Task[None] | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ended: bool = False
    _error: BaseException | None = None

    async def __aenter__(self) -> SSEStream:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        self._stack = contextlib.AsyncExitStack()
        try:
            async with asyncio.timeout(self.open_timeout):
                response = await self._stack.enter_async_context(
                    self.client.stream(self.method, self.url, headers=headers, json=self.body)
                )
                self.status_code = response.status_code
                self.headers = response.headers
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    raise SSEError(
                        f"{self.method} {self.url} -> {response.status_code}: {text[:500]}"
                    )
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise SSEError(f"{self.url}: content-type {content_type!r}, not SSE")
        except TimeoutError:
            await self._stack.aclose()
            raise SSEError(f"{self.url}: no response within {self.open_timeout:g}s") from None
        except BaseException:
            await self._stack.aclose()
            raise
        self._response = response
        self._lines = response.aiter_lines()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Drop the connection (as a browser tab that goes away). A recorded stream that got
        its `done` is first left to be ended by the server (at most 5 s): cancelling the
        recorder while httpx closes the pool's expired connections inside it would leave those
        unclosed (the unclosed-socket warnings once seen in tests/e2e/faults)."""
        if self._recorder is not None:
            if dones(self.events):  # the server ends the stream right after `done`
                with contextlib.suppress(SSEError):
                    await self.wait_ended(within=5)
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recorder
            self._recorder = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    # --- pull --------------------------------------------------------------------------
    async def _parse_next(self) -> SSEEvent | None:
        """The next event, or None when the server ended the stream."""
        assert self._lines is not None, "use `async with SSEStream(...)`"
        while True:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                return None
            if line.startswith(":"):
                self.comments += 1  # heartbeat
                if self._recorder is not None:
                    async with self._changed:
                        self._changed.notify_all()
                continue
            found = self._decoder.decode(line)
            if found is not None:
                if found.id is not None:
                    self.last_event_id = found.id
                return found

    async def next_event(self, within: float = 10.0) -> SSEEvent | None:
        """The next event (None at the end of the stream); SSEError after `within` seconds."""
        if self._recorder is not None:
            raise RuntimeError("this stream is being recorded; use wait_for()")
        try:
            async with asyncio.timeout(within):
                found = await self._parse_next()
        except TimeoutError:
            raise SSEError(
                f"{self.url}: no SSE event within {within:g}s after {len(self.events)} events"
            ) from None
        if found is not None:
            self.events.append(found)
        return found

    async def take(self, n: int, within: float = 10.0) -> list[SSEEvent]:
        """The next `n` events; fails if the stream ends before."""
        out: list[SSEEvent] = []
        for _ in range(n):
            found = await self.next_event(within)
            if found is None:
                raise SSEError(f"{self.url}: stream ended after {len(out)} of {n} events")
            out.append(found)
        return out

    async def until_done(self, within: float = 15.0) -> list[SSEEvent]:
        """Every event up to and including `done`, then checks the server ends the stream.
        `within` bounds the whole wait."""
        try:
            async with asyncio.timeout(within):
                while True:
                    found = await self.next_event(within)
                    if found is None:
                        raise SSEError(f"{self.url}: stream ended without a done event")
                    if found.event == "done":
                        break
                # the server closes the stream after `done`: nothing may follow it
                after = await self.next_event(within)
        except TimeoutError:
            raise SSEError(
                f"{self.url}: no done within {within:g}s; got {summary(self.events)}"
            ) from None
        assert after is None, f"an event after done: {after}"
        return list(self.events)

    # --- background recording ----------------------------------------------------------
    def record(self) -> SSEStream:
        """Read every event in the background into `events` until the stream ends."""

        async def run() -> None:
            try:
                while True:
                    found = await self._parse_next()
                    async with self._changed:
                        if found is None:
                            self._ended = True
                        else:
                            self.events.append(found)
                        self._changed.notify_all()
                    if found is None:
                        return
            except Exception as e:
                async with self._changed:
                    self._error = e
                    self._ended = True
                    self._changed.notify_all()

        self._recorder = asyncio.create_task(run(), name=f"sse:{self.url}")
        return self

    async def wait_for(
        self, predicate: Callable[[list[SSEEvent]], bool], within: float = 10.0, what: str = ""
    ) -> list[SSEEvent]:
        """Wait until `predicate(events)` holds (recorded streams); SSEError after `within`."""
        try:
            async with asyncio.timeout(within), self._changed:
                while not predicate(self.events):
                    if self._ended:
                        raise SSEError(
                            f"{self.url}: stream ended ({self._error!r}) before {what or 'the wait'};"
                            f" got {summary(self.events)}"
                        )
                    await self._changed.wait()
                return list(self.events)
        except TimeoutError:
            raise SSEError(
                f"{self.url}: {what or 'condition'} not met within {within:g}s;"
                f" got {summary(self.events)}"
            ) from None

    async def wait_done(self, within: float = 15.0) -> SSEEvent:
        events = await self.wait_for(
            lambda evs: any(e.event == "done" for e in evs), within, "done"
        )
        return next(e for e in events if e.event == "done")

    async def wait_ended(self, within: float = 5.0) -> list[SSEEvent]:
        """Wait until the server closed the stream (recorded streams)."""
        try:
            async with asyncio.timeout(within), self._changed:
                while not self._ended:
                    await self._changed.wait()
        except TimeoutError:
            raise SSEError(f"{self.url}: stream still open after {within:g}s") from None
        return list(self.events)


def chunks(events: list[SSEEvent]) -> list[SSEEvent]:
    return [e for e in events if e.event == "chunk"]


def dones(events: list[SSEEvent]) -> list[SSEEvent]:
    return [e for e in events if e.event == "done"]


def summary(events: list[SSEEvent]) -> str:
    kinds = [e.event for e in events]
    tail = f", last {events[-1].event}: {events[-1].data}" if events else ""
    return f"{len(events)} events {kinds[:8]}{'...' if len(kinds) > 8 else ''}{tail}"
