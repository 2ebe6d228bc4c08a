"""A minimal HTTP/1.1 JSON client for the driver's POSTs (chat, cancel) on keep-alive
connections, O(1) per request.

httpx's pool scans every pooled connection on each request (`_assign_requests_to_connections`,
`has_expired`, a socket readability check each): with a pool sized for 1,000 streams that was
38% of the driver's CPU at n=200, and it delayed the requests the driver times. Here each
host has a free list; a connection idle longer than `idle_s` (below uvicorn's 5 s keep-alive)
is closed rather than reused. Only what the benchmark's servers speak: `Content-Length` or
chunked bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Response:
    def __init__(self, status: int, content: bytes) -> None:
        self.status_code = status
        self.content = content

    def json(self) -> object:
        return orjson.loads(self.content)


class JSONClient:
    def __init__(self, timeout_s: float = 30.0, idle_s: float = 3.0) -> None:
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self._free: dict[tuple[str, int], list[_Conn]] = {}

    async def post(self, host: str, port: int, path: str, body: object) -> Response:
        """POST `body` as JSON. Raises ConnectionError (an OSError) or TimeoutError."""
        payload = orjson.dumps(body)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        async with asyncio.timeout(self.timeout_s):
            conn = self._take(host, port)
            reused = conn is not None
            if conn is None:
                conn = await self._open(host, port)
            try:
                status, content, keep = await self._exchange(conn, head + payload)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                conn.close()
                if not reused:
                    raise ConnectionError(f"{type(e).__name__}: {e}") from None
                # the server closed an idle connection as we reused it: once more, fresh
                conn = await self._open(host, port)
                try:
                    status, content, keep = await self._exchange(conn, head + payload)
                except (ConnectionError, asyncio.IncompleteReadError) as e2:
                    conn.close()
                    raise ConnectionError(f"{type(e2).__name__}: {e2}") from None
            except BaseException:
                conn.close()
                raise
        if keep:
            conn.used = time.monotonic()
            self._free.setdefault((host, port), []).append(conn)
        else:
            conn.close()
        return Response(status, content)

    def _take(self, host: str, port: int) -> _Conn | None:
        free = self._free.get((host, port))
        now = time.monotonic()
        while free:
            conn = free.pop()
            if now - conn.used < self.idle_s and not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    @staticmethod
    async def _open(host: str, port: int) -> _Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return _Conn(reader, writer)

    @staticmethod
    async def _exchange(conn: _Conn, request: bytes) -> tuple[int, bytes, bool]:
        conn.writer.write(request)
        head = await conn.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await conn.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await conn.reader.readuntil(b"\r\n")
                    break
                parts.append(await conn.reader.readexactly(size))
                await conn.reader.readexactly(2)
            content = b"".join(parts)
        else:
            content = await conn.reader.readexactly(int(headers.get("content-length", "0")))
        return status, content, headers.get("connection") != "close"

    async def aclose(self) -> None:
        for free in self._free.values():
            for conn in free:
                conn.close()
        self._free.clear()
