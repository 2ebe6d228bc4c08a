"""The SSE response of the two stream routes: cheap per event.

At 200 streams about a third of an api process's own Python CPU was the send path of sse-starlette's
`EventSourceResponse` (docs/benchmarks.md): per event its `_stream_response` loop, a timeout
around every send, and the ASGI `send` wrappers of every middleware layer. This response
keeps its behaviour (headers, HEAD, comment heartbeats, client disconnect, dropping a client
that stopped reading, ending on server shutdown) and does per event only what must be done:

- One `await send(...)` per event, between two attribute stamps (`sending since`): no timeout
  object per send. The connection's handler task (the one the server gave this request) waits
  on the event pump, the client's disconnect and the server's shutdown with
  `asyncio.wait(timeout=...)`, waking every `send_timeout_s / 4` at most (seconds): when the
  pump has been inside one send for `send_timeout_s` the client took no bytes for that long
  (uvicorn's send only waits while the transport's write buffer is above its high-water mark),
  and the response raises `SendTimeout`, which api/stalled.py turns into an aborted
  connection; every `heartbeat_s` it writes a comment line between two events, as
  sse-starlette's ping (`: ping - <UTC time>`): also while events flow, as before (a client
  or proxy may count on them).
- Every message goes through the middleware layers, as any response's. Until 2026-12 the
  bodies skipped them (the server's own `send`, handed down by the outermost layer when every
  layer was on an allowlist of known classes, some in FastAPI's private modules): an A/B at 200
  streams measured the api's CPU per chunk at 126 µs with it and 128 without (1.02x, within
  the round-to-round spread; docs/benchmarks.md, issue 16), so the plain form stays.
- Server shutdown (api/exiting.py): when the server starts shutting down the response ends
  cleanly — the pending events are dropped, the body is terminated, the browser reconnects
  elsewhere with Last-Event-ID. The hub stopping ends the event iterator, which ends the
  response the same way.

However the response ends, the event iterator is closed (`aclose()`: its `finally` releases
the hub subscription and the `chatpipe_sse_clients` gauge) and `release()` runs (the stream
slot), also for HEAD (headers only, the iterator never starts; the routes answer HEAD with 405
today, as FastAPI adds no HEAD to a GET route) or a client gone before the first event.

Why not a library: sse-starlette is what this replaces (measured below); FastAPI's own
`fastapi.sse.EventSourceResponse` is a `StreamingResponse` driven by FastAPI's routing for
path operations that `yield`: the route could no longer answer 404/403/429/503 before the
stream starts (the checks would run inside the generator, after the 200), it has no send
timeout, and each event still crosses every middleware wrapper.

Measured (2026-11-29, 2-core box): per event through the api's middleware stack (CORS on,
an Origin header) with a fake server send, CPU µs: sse-starlette + the former
`_HeldEventSource` 6.7, this response with the bodies skipping the layers 0.6, `fastapi.sse`
(yielding `ServerSentEvent`) 48. In the whole api at 200 streams the difference the skip made
is within the noise (above), which is why it went: what an api spends per chunk is the hub,
the event loop, uvicorn's write and the kernel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class SendTimeout(TimeoutError):
    """The client took no bytes for `send_timeout_s` (api/stalled.py drops the connection)."""


_DISCONNECT = "http.disconnect"


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != _DISCONNECT:
        pass


class SSEResponse(Response):
    """`text/event-stream` of already-encoded SSE text (`events`). The media type is set per
    instance, as sse-starlette's: as a class attribute FastAPI would document the 200 as
    `text/event-stream` with schema `string`, which schemathesis then checks every event
    against (tests/security/test_fuzz_api.py); the OpenAPI stays as it was."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        release: Callable[[], Awaitable[None]],
        *,
        exiting: Callable[[], Coroutine[Any, Any, None]] | None = None,
        heartbeat_s: float,
        send_timeout_s: float,
        headers: Mapping[str, str] | None = None,
        status_code: int = 200,  # FastAPI's OpenAPI reads the route's status from this default
    ) -> None:
        self.events = events
        self.release = release
        self.exiting = exiting  # returns when the server starts shutting down
        self.heartbeat_s = heartbeat_s  # <= 0: no heartbeat
        self.send_timeout_s = send_timeout_s  # <= 0: no send timeout
        self.status_code = status_code
        self.media_type = "text/event-stream"
        self.background = None
        # the headers sse-starlette sent, in its order
        self.init_headers(
            {
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **(headers or {}),
                "Connection": "keep-alive",
            }
        )
        self._sending_since = 0.0  # loop time the pending send started; 0: none pending
        self._last_ping = 0.0  # loop time of the last heartbeat (or of the start)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._respond(scope, receive, send)
        finally:
            try:
                await self.events.aclose()  # type: ignore[attr-defined]
            finally:
                await self.release()

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if scope["method"] == "HEAD":  # headers only: the stream never starts
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        self._last_ping = loop.time()
        pump = loop.create_task(self._pump(send))
        gone = loop.create_task(_disconnected(receive))
        tasks = {pump, gone}
        if self.exiting is not None:
            tasks.add(loop.create_task(self.exiting()))
        try:
            while True:
                done, _ = await asyncio.wait(
                    tasks, timeout=self._until_check(loop.time()), return_when="FIRST_COMPLETED"
                )
                if done:
                    break
                now = loop.time()
                since = self._sending_since
                if since:
                    if now - since >= self.send_timeout_s > 0:
                        raise SendTimeout
                elif self.heartbeat_s > 0 and now - self._last_ping >= self.heartbeat_s:
                    await self._heartbeat(send, now)
        finally:
            for task in tasks:
                task.cancel()
            # the pump's end (cancelled inside the iterator) before the iterator is closed
            await asyncio.wait(tasks)
        if gone in done:
            return  # nothing can reach the client any more
        if pump in done and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()  # type: ignore[misc]
        # the events ended (done, hub stopped) or the server is shutting down; the end of the
        # body waits for the client to take what is buffered, bounded like every other send
        await self._bounded(send({"type": "http.response.body", "body": b"", "more_body": False}))

    def _until_check(self, now: float) -> float | None:
        timeout, heartbeat = self.send_timeout_s, self.heartbeat_s
        if self._sending_since and timeout > 0:
            return max(0.0, self._sending_since + timeout - now)
        checks = []
        if timeout > 0:
            checks.append(timeout / 4)  # a send that starts now is seen stalled at <= timeout
        if heartbeat > 0:
            checks.append(max(0.0, self._last_ping + heartbeat - now))
        return min(checks) if checks else None

    async def _pump(self, send: Send) -> None:
        time = asyncio.get_running_loop().time
        async for chunk in self.events:
            self._sending_since = time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._sending_since = 0.0

    async def _heartbeat(self, send: Send, now: float) -> None:
        """A comment line, as sse-starlette's ping. Bounded by the send timeout: this task is
        the one that watches the sends."""
        ping = b": ping - %s\r\n\r\n" % str(datetime.now(UTC)).encode()
        self._last_ping = now
        await self._bounded(send({"type": "http.response.body", "body": ping, "more_body": True}))

    async def _bounded(self, sent: Awaitable[None]) -> None:
        """A send made outside the pump (which the handler task watches), bounded by the send
        timeout itself."""
        if self.send_timeout_s <= 0:
            await sent
            return
        try:
            await asyncio.wait_for(sent, self.send_timeout_s)
        except TimeoutError:
            raise SendTimeout from None


def sse_response(request: Any, events: Any, release: Any, **headers: str) -> SSEResponse:
    """The SSE response of a route, with the api's heartbeat and send timeout; `release` (a
    stream slot's) runs however it ends."""
    s = request.app.state.settings
    return SSEResponse(
        events,
        release,
        exiting=request.app.state.exiting.wait,
        heartbeat_s=s.sse_heartbeat_s,
        send_timeout_s=s.sse_send_timeout_s,
        headers=headers,
    )
