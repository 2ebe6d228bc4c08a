"""A minimal HTTP/1.1 Server-Sent Events client on a raw asyncio protocol.

The load driver holds up to a thousand streams in one process, so the client must cost little
per event: each `data_received` stamps the arrival time once, decodes chunked transfer
encoding and splits the SSE events synchronously (no await per line), then calls `on_event`
for each. Only what the benchmark's servers speak is supported: HTTP/1.1, `Content-Length`,
chunked or read-until-close bodies, SSE events separated by a blank line (CRLF or LF).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

# (arrival time, event name, data, id), as bytes
OnEvent = Callable[[float, bytes, bytes, bytes], None]

_BLANK = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


@dataclass
class _Parse:
    headers_done: bool = False
    status: int = 0
    chunked: bool = False
    remaining: int | None = None  # Content-Length left, when given
    raw: bytearray = field(default_factory=bytearray)  # undecoded bytes
    body: bytearray = field(default_factory=bytearray)  # decoded body not yet split into events
    ended: bool = False
    crlf: bool | None = None  # the body's lines end with CRLF (decided on its first bytes)


class SSEProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, on_event: OnEvent) -> None:
        self.request = request
        self.on_event = on_event
        self.p = _Parse()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        p = self.p
        p.raw += data
        if not p.headers_done and not self._headers():
            return
        self._decode()
        if p.status != 200:
            return  # error body collected in p.body; reported on close
        self._events(now)
        if p.ended:
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        p = self.p
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the response headers"))
        if self.closed.done():
            return
        if p.headers_done and p.status != 200:
            self.closed.set_exception(HTTPStatusError(p.status, bytes(p.body)))
        elif exc is not None:
            self.closed.set_exception(exc)
        else:
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- parsing -------------------------------------------------------------------------
    def _headers(self) -> bool:
        p = self.p
        end = p.raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(p.raw[:end]).decode("latin-1").split("\r\n")
        del p.raw[: end + 4]
        p.status = int(head[0].split(" ", 2)[1])
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "transfer-encoding" and "chunked" in value.lower():
                p.chunked = True
            elif name == "content-length":
                p.remaining = int(value.strip())
        p.headers_done = True
        if not self.opened.done():
            self.opened.set_result(None)
        return True

    def _decode(self) -> None:
        p = self.p
        if not p.chunked:
            if p.remaining is not None:
                take = min(len(p.raw), p.remaining)
                p.remaining -= take
                p.body += p.raw[:take]
                del p.raw[:take]
                p.ended = p.remaining == 0
            else:
                p.body += p.raw
                p.raw.clear()
            return
        while True:
            line_end = p.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(p.raw[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                p.ended = True
                p.raw.clear()
                return
            start = line_end + 2
            if len(p.raw) < start + size + 2:
                return
            p.body += p.raw[start : start + size]
            del p.raw[: start + size + 2]

    def _events(self, now: float) -> None:
        p = self.p
        if not p.body:
            return
        raw = bytes(p.body)
        if p.crlf is None:  # a server uses one line separator throughout (sse-starlette: CRLF)
            p.crlf = b"\r\n" in raw
        crlf = p.crlf
        parts = raw.split(b"\r\n\r\n") if crlf else _BLANK.split(raw)
        tail = parts.pop()  # an incomplete event (or b"")
        p.body = bytearray(tail)
        on_event = self.on_event
        for block in parts:
            if not block:
                continue
            event, data, ident = b"message", b"", b""
            for line in block.split(b"\r\n") if crlf else _LINE.split(block):
                if not line or line[0] == 58:  # ':' comment (heartbeat)
                    continue
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    data = value if not data else data + b"\n" + value
                elif name == b"event":
                    event = value
                elif name == b"id":
                    ident = value
            if data or event != b"message":
                on_event(now, event, data, ident)


def build_request(method: str, host: str, port: int, path: str, body: bytes | None = None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
        "Connection: close",
    ]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def open_sse(
    host: str, port: int, method: str, path: str, body: bytes | None, on_event: OnEvent
) -> SSEProtocol:
    """Connect and send the request; returns once the connection is made (events then flow to
    `on_event`; await `protocol.closed` for the end)."""
    loop = asyncio.get_running_loop()
    request = build_request(method, host, port, path, body)
    _, protocol = await loop.create_connection(lambda: SSEProtocol(request, on_event), host, port)
    return protocol
