"""Dropping the connection of a client that stopped reading (SSE_SEND_TIMEOUT_S).

The SSE response (api/sse.py) raises `SendTimeout` when a send to a client has waited
`send_timeout` (the client has not taken its bytes for that long: its TCP window is closed,
the kernel buffers on both sides are full). uvicorn then only *closes* the transport,
and asyncio's close waits until the buffered bytes are written — which never happens for a
client that does not read: the socket, its buffers and the response would stay until the client
goes away. So the outermost ASGI layer catches the timeout and aborts the transport: the TCP
connection is closed at once, the process keeps nothing of that client (what the kernel still
holds for it is an orphaned socket it times out), and a browser's EventSource reconnects
with Last-Event-ID and resumes from Redis, losing nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.sse import SendTimeout

log = logging.getLogger(__name__)


class _Abortable(Protocol):
    def abort(self) -> None: ...


def _transport(send: Send) -> _Abortable | None:
    """The connection's transport: uvicorn's `send` is the bound method of its per-request
    cycle, which holds it (the outermost layer gets that `send` unwrapped). Duck-typed: uvloop's
    transports are not asyncio.Transport subclasses."""
    transport: Any = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if callable(getattr(transport, "abort", None)) else None


def _send_timed_out(exc: BaseException) -> bool:
    """A SendTimeout, alone or as the only kind in a group (task groups wrap it)."""
    if isinstance(exc, SendTimeout):
        return True
    if isinstance(exc, BaseExceptionGroup):
        timed_out, rest = exc.split(SendTimeout)
        return timed_out is not None and rest is None
    return False


class DropStalledClients:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        transport = _transport(send)
        try:
            await self.app(scope, receive, send)
        except BaseException as e:
            if transport is None or not _send_timed_out(e):
                raise
            log.warning(
                "client stopped reading its stream: connection dropped after the send timeout",
                extra={"path": scope.get("path", "")},
            )
            transport.abort()
            # let the server see the connection lost before the response ends unfinished
            await asyncio.sleep(0)


class App(FastAPI):
    """FastAPI with `DropStalledClients` as its outermost layer."""

    def build_middleware_stack(self) -> ASGIApp:
        return DropStalledClients(super().build_middleware_stack())
