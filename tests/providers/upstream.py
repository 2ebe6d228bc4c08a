"""A fake OpenAI-compatible model server for tests: a raw ASGI app under uvicorn (what vLLM
runs on), on a free 127.0.0.1 port, served by the test's own event loop.

It answers `POST .../v1/chat/completions` with a Server-Sent Events stream chosen by the
last user message (so an end-to-end test picks the upstream's behaviour through the chat
message it posts to the api):

| message | answer |
|---|---|
| anything else | `reply(message)`: 5 deltas, then a finish chunk, a usage chunk, `[DONE]` |
| `hold:N` | N deltas, then nothing until the client disconnects (a long generation) |
| `slow:N` | N deltas (`w0 `, `w1 `, ...) 50 ms apart, then a normal finish |
| `stall` | 200 and the headers, then nothing (a model that never produces a token) |
| `silent` | not even the headers (a server that accepted the connection and hangs) |
| `status:CODE` | that status with an OpenAI-style JSON error body ("model is overloaded") |
| `status-html:CODE` / `status-text:CODE` | an HTML page / plain text error body |
| `echo-key` | 401 with a body that repeats the Authorization header it got |
| `malformed` | one good delta, then `data: {not json` |
| `error-event` | one good delta, then `data: {"error": {...}}` (vLLM's in-stream error) |
| `cut` | one delta, then the end of the body without a finish chunk or `[DONE]` |
| `drop` | one delta, then the connection is dropped in the middle of the chunked body |
| `json` | a non-streamed `chat.completion` (a server that ignores `stream: true`) |

Each request becomes a `Call` recording the headers, the JSON body, the path and - the point
of it - when the client disconnected before the response was complete (`disconnected_at`, in
the loop's time: the same clock as the test's `loop.time()`). A client that reads a response
to its end is not counted as disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn

from tests.support.wait import apoll

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH_SUFFIX = "/v1/chat/completions"
ERROR_MESSAGE = "model is overloaded, try again later"


def reply(message: str) -> list[str]:
    """The deltas the fake server streams for an ordinary `message`."""
    return [f"{message}", " is", " answered", " in", " order"]


def completion_chunk(
    content: str | None, *, role: bool = False, finish: str | None = None
) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    chunk = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


# the model's own counts: not one token per delta (a server may send several tokens at once)
PROMPT_TOKENS, COMPLETION_TOKENS = 11, 7
USAGE_CHUNK = (
    b'data: {"id":"chatcmpl-test","choices":[],"usage":{"prompt_tokens":11,'
    b'"completion_tokens":7,"total_tokens":18}}\n\n'
)
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class Call:
    """One request the fake server received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float
    client_port: int
    chunks_sent: int = 0
    completing: bool = False
    disconnected_at: float | None = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def message(self) -> str:
        messages = self.body.get("messages") or [{}]
        return str(messages[-1].get("content", ""))


class FakeOpenAI:
    """The ASGI app plus what it saw. `await fake.next_call()` waits for the next request."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._arrivals: asyncio.Queue[Call] = asyncio.Queue()
        self._closing = asyncio.Event()
        self.url = ""  # set by `serve`

    async def next_call(self, within: float = 5.0) -> Call:
        async with asyncio.timeout(within):
            return await self._arrivals.get()

    async def call_for(self, message_id: str, within: float = 30.0) -> Call:
        """The request made for chatpipe message `message_id` (its X-Request-Id), once it
        arrived (polled: the server may run in another thread's loop)."""

        async def found() -> Call | None:
            return next(
                (c for c in self.calls if c.headers.get("x-request-id") == message_id), None
            )

        return await apoll(f"the upstream call of {message_id}", found, within=within)

    def close(self) -> None:
        """Let held responses end (teardown)."""
        self._closing.set()

    # --- ASGI ---------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http", scope["type"]
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        loop = asyncio.get_running_loop()
        call = Call(
            path=scope["path"],
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=orjson.loads(raw) if raw else {},
            received_at=loop.time(),
            client_port=int(scope["client"][1]),
        )
        self.calls.append(call)
        self._arrivals.put_nowait(call)
        watcher = asyncio.create_task(self._watch(receive, call))
        try:
            if not call.path.endswith(PATH_SUFFIX) or scope["method"] != "POST":
                await self._status(send, call, 404, b"not found", b"text/plain")
            else:
                await self._answer(send, call)
        finally:
            call.ended.set()
            if not call.disconnected.is_set():
                watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, receive: Receive, call: Call) -> None:
        """uvicorn answers `receive()` with http.disconnect the moment the socket closes."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not call.completing:
            call.disconnected_at = asyncio.get_running_loop().time()
            call.disconnected.set()

    async def _hold(self, call: Call) -> None:
        """Send nothing more until the client goes away (or the test ends)."""
        closing = asyncio.ensure_future(self._closing.wait())
        gone = asyncio.ensure_future(call.disconnected.wait())
        try:
            await asyncio.wait({closing, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            gone.cancel()

    async def _start(self, send: Send, status: int = 200, headers: list[Any] | None = None) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": headers or SSE_HEADERS}
        )

    async def _chunk(self, send: Send, call: Call, data: bytes, last: bool = False) -> None:
        if last:
            call.completing = True
        await send({"type": "http.response.body", "body": data, "more_body": not last})
        call.chunks_sent += 1

    async def _status(self, send: Send, call: Call, status: int, body: bytes, ctype: bytes) -> None:
        await self._start(send, status, [(b"content-type", ctype)])
        await self._chunk(send, call, body, last=True)

    async def _answer(self, send: Send, call: Call) -> None:
        text = call.message
        kind, _, arg = text.partition(":")
        if kind == "status":
            body = orjson.dumps({"error": {"message": ERROR_MESSAGE, "type": "server_error"}})
            await self._status(send, call, int(arg), body, b"application/json")
        elif kind == "status-html":
            page = b"<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"
            await self._status(send, call, int(arg), page, b"text/html")
        elif kind == "status-text":
            await self._status(send, call, int(arg), b"no such model\n", b"text/plain")
        elif text == "echo-key":
            body = orjson.dumps(
                {"error": {"message": f"bad key {call.headers.get('authorization')}"}}
            )
            await self._status(send, call, 401, body, b"application/json")
        elif text == "silent":
            await self._hold(call)
        elif text == "stall":
            await self._start(send)
            await self._hold(call)
        elif kind == "slow":  # N deltas, 50 ms apart (a long answer), then a normal finish
            await self._start(send)
            await self._chunk(send, call, completion_chunk("", role=True))
            for i in range(int(arg)):
                await asyncio.sleep(0.05)  # sleep-ok: the model's pace, not a wait for a test
                await self._chunk(send, call, completion_chunk(f"w{i} "))
            await self._chunk(send, call, completion_chunk(None, finish="stop"))
            await self._chunk(send, call, USAGE_CHUNK)
            await self._chunk(send, call, DONE, last=True)
        elif kind == "hold":
            await self._start(send)
            await self._chunk(send, call, completion_chunk("", role=True))
            for i in range(int(arg)):
                await self._chunk(send, call, completion_chunk(f"t{i} "))
            await self._hold(call)
        elif text == "malformed":
            await self._start(send)
            await self._chunk(send, call, completion_chunk("fine"))
            await self._chunk(send, call, b"data: {not json\n\n", last=True)
        elif text == "error-event":
            await self._start(send)
            await self._chunk(send, call, completion_chunk("fine"))
            error = {"error": {"message": "CUDA out of memory", "code": 500}}
            await self._chunk(send, call, b"data: " + orjson.dumps(error) + b"\n\n", last=True)
        elif text == "cut":
            await self._start(send)
            await self._chunk(send, call, completion_chunk("partial"))
            await self._chunk(send, call, b"", last=True)
        elif text == "drop":
            await self._start(send)
            await self._chunk(send, call, completion_chunk("partial"))
            raise ConnectionAbortedError("the model server went away")  # uvicorn drops the socket
        elif text == "json":
            whole = {
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "all at once"}}
                ],
            }
            await self._status(send, call, 200, orjson.dumps(whole), b"application/json")
        else:
            await self._start(send)
            # what real servers send around the content: a role-only delta, an empty content
            await self._chunk(send, call, completion_chunk(None, role=True))
            await self._chunk(send, call, completion_chunk(""))
            await self._chunk(send, call, b": keep-alive comment\n\n")
            for piece in reply(text):
                await self._chunk(send, call, completion_chunk(piece))
            await self._chunk(send, call, completion_chunk(None, finish="stop"))
            await self._chunk(send, call, USAGE_CHUNK)
            await self._chunk(send, call, DONE, last=True)


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: it runs inside the test process's loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening_socket() -> socket.socket:
    """A socket bound to a free port and already listening: clients may connect before the
    server task has started, the kernel queues them (nothing to wait for)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve(fake: FakeOpenAI) -> AsyncIterator[FakeOpenAI]:
    """Run `fake` on 127.0.0.1:{free port} in this loop; `fake.url` is its base URL."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        fake,
        lifespan="off",
        ws="none",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="fake-openai")
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        fake.close()
        server.should_exit = True
        await task
        sock.close()


@contextlib.contextmanager
def serve_in_thread(fake: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """Run `fake` in a thread with its own loop, for processes a module starts before any
    test's loop runs; the test reads `fake.calls` (appended by that loop)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        async with serve(fake):
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise AssertionError("the fake OpenAI server did not start within 10 s")
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def provider_env(fake: FakeOpenAI, model: str = "fake-model") -> dict[str, object]:
    """The settings of processes whose ai_consumers answer through `fake`."""
    return {
        "llm_provider": "openai",
        "llm_base_url": f"{fake.url}/v1",
        "llm_model": model,
        "llm_timeout_s": 5.0,
    }


def refused_url() -> str:
    """A base URL nothing listens on (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
