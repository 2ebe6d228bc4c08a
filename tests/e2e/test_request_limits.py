"""Issue 12, item 14: what an api process spends on a request before it knows who sent it, and
how long one stalled connection can hold a stream slot.

- Credentials are checked from the headers before the body is read: a POST without them is
  answered 401 at once, its body never waited for.
- The body is capped (API_MAX_BODY_BYTES) while it streams in: a Content-Length over the cap is
  answered 413 before any of the body is read, a chunked body as soon as the cap is passed.
- The last write of an SSE response (the end of the body, after `done`) is bounded by
  SSE_SEND_TIMEOUT_S like every other write: a client that stopped reading no longer holds
  its connection and its stream slot forever after its answer ended.
- JWT_AUDIENCE set: a token for another audience, or with none, is refused.

The module's cluster: 1 api with AUTH_MODE=jwt, no ai_consumer (the answers this module reads
are written into Redis by the test itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from redis.asyncio import Redis

from chatpipe.keys import Keys
from chatpipe.settings import Settings
from tests.e2e.conftest import DEFAULT_ENV, ClusterShape
from tests.support.cluster import Cluster, new_session
from tests.support.keys import stream_key

pytestmark = pytest.mark.e2e

SECRET = "e2e-request-limits-jwt-secret-of-32-bytes+"
AUDIENCE = "chatpipe-e2e"
BODY_CAP = 4096
SEND_TIMEOUT_S = 1.0
ANSWER_MB = 16  # one SSE write far larger than the kernel buffers of a client that reads nothing


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "auth_mode": "jwt",
        "jwt_secret": SECRET,
        "jwt_audience": AUDIENCE,
        "api_max_body_bytes": BODY_CAP,
        "max_message_bytes": 1024,
        "sse_send_timeout_s": SEND_TIMEOUT_S,
        "rate_limit_per_minute": 0,
    }


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    return ClusterShape(apis=1, consumers=0, listener=False)


def bearer(user: str, **claims: object) -> str:
    payload: dict[str, object] = {"sub": user, "exp": int(time.time()) + 600, "aud": AUDIENCE}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET)


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.api_procs[0].url, timeout=10) as c:
        yield c


@contextlib.asynccontextmanager
async def raw(
    url: str, rcvbuf: int = 0
) -> AsyncIterator[tuple[asyncio.StreamReader, socket.socket]]:
    """A raw TCP connection to the api (`rcvbuf`: a small receive buffer, set before connect)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, sock
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def response_of(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[int, str]:
    """Status and body of the HTTP response the server sends (Content-Length bodies)."""
    async with asyncio.timeout(within):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(
            int(line.split(":", 1)[1])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length:")
        )
        body = (await reader.readexactly(length)).decode()
    return int(head.split(" ", 2)[1]), body


def post_head(url: str, path: str, headers: dict[str, str]) -> bytes:
    host = url.removeprefix("http://")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_post_without_credentials_is_refused_before_its_body_is_sent(
    cluster: Cluster,
) -> None:
    url = cluster.api_procs[0].url
    for path in ("/api/chat", "/api/chat/stream", "/api/cancel", "/cancel"):
        async with raw(url) as (reader, sock):
            sock.send(post_head(url, path, {"Content-Length": "200"}))  # and no body, ever
            status, body = await response_of(reader)
        assert status == 401, (path, status, body)
        assert "credentials" in json.loads(body)["detail"], body


async def test_a_body_over_the_cap_is_refused_413_before_the_rest_of_it_is_read(
    cluster: Cluster,
) -> None:
    url = cluster.api_procs[0].url
    auth = {"Authorization": f"Bearer {bearer(new_user())}"}
    # announced: refused on the header, nothing of the body sent
    async with raw(url) as (reader, sock):
        sock.send(post_head(url, "/api/chat", {**auth, "Content-Length": str(10 << 20)}))
        status, body = await response_of(reader)
    assert status == 413, body
    assert f"{BODY_CAP} bytes" in json.loads(body)["detail"], body
    # chunked, no Content-Length: refused once the cap is passed, the body never finished
    async with raw(url) as (reader, sock):
        sock.send(post_head(url, "/api/chat", {**auth, "Transfer-Encoding": "chunked"}))
        piece = b"x" * 1024
        for _ in range(BODY_CAP // len(piece) + 2):
            sock.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, body = await response_of(reader)
    assert status == 413, body
    assert "API_MAX_BODY_BYTES" in json.loads(body)["detail"], body


async def test_a_body_under_the_cap_is_accepted(client: httpx.AsyncClient) -> None:
    user = new_user()
    headers = {"Authorization": f"Bearer {bearer(user)}"}
    body = {"session_id": new_session(), "message": "hi"}
    response = await client.post("/api/chat", json=body, headers=headers)
    assert response.status_code == 202, response.text
    # chunked, as a streaming client sends it

    async def pieces() -> AsyncIterator[bytes]:
        yield json.dumps({**body, "session_id": new_session()}).encode()

    response = await client.post(
        "/api/chat", content=pieces(), headers={**headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 202, response.text


async def test_a_token_for_another_audience_or_none_is_refused(client: httpx.AsyncClient) -> None:
    body = {"session_id": new_session(), "message": "hi"}
    for aud in ("another-service", None):
        token = bearer(new_user(), aud=aud)
        response = await client.post(
            "/api/chat", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 401, (aud, response.text)
        assert "aud" in response.json()["detail"].lower(), response.text


async def test_a_client_that_stops_reading_at_the_end_of_its_answer_is_dropped(
    client: httpx.AsyncClient, cluster: Cluster, settings: Settings, redis: Redis
) -> None:
    """Its answer (16 MB) is in Redis, `done` included, so the api writes it in one piece and
    then the end of the body; the client reads nothing. The end of the body waits for the
    client to take its bytes, which it never does: the api drops the connection (and the
    megabytes it buffers for it) SSE_SEND_TIMEOUT_S later, as it does mid-answer."""
    headers = {"Authorization": f"Bearer {bearer(new_user())}"}
    response = await client.post(
        "/api/chat", json={"session_id": new_session(), "message": "hi"}, headers=headers
    )
    assert response.status_code == 202, response.text
    message_id = response.json()["message_id"]
    keys = Keys.from_settings(settings)
    stream = await stream_key(redis, keys, message_id)
    delta = "x" * (1 << 20)
    for seq in range(1, ANSWER_MB + 1):
        data = json.dumps({"seq": seq, "delta": delta})
        await redis.xadd(stream, {"e": "chunk", "s": seq, "d": data})
    done = '{"status":"completed"}'
    await redis.xadd(stream, {"e": "done", "s": ANSWER_MB + 1, "d": done})
    api = cluster.api_procs[0]
    path = f"/api/chat/{message_id}/stream"
    async with raw(api.url, rcvbuf=4096) as (stalled, sock):
        host = api.url.removeprefix("http://")
        sock.send(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            f"Authorization: {headers['Authorization']}\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):
            head = await stalled.readuntil(b"\r\n\r\n")  # the 200; the body is left unread
        assert head.startswith(b"HTTP/1.1 200"), head
        line = await api.log_line(
            lambda x: "client stopped reading" in str(x.get("msg")), within=10 * SEND_TIMEOUT_S
        )
        assert line["path"] == path
