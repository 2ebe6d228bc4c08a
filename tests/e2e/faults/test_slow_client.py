"""Issue 4, fault 9: an SSE client that stops reading does not slow anyone, and is dropped.

The slow client is a raw TCP socket that sends its GET and never reads: a small receive buffer
and a small MSS keep the kernel buffers small, so the api's writes to it block after ~200 KB
(about 2,000 chunk events). To get there quickly the module's simulator streams 1 token per ms
and the slow client joins a long answer that already has thousands of chunks (the backlog comes
in one burst). The same answer, and short answers of other sessions, are read by ordinary
clients on the same api process (the same SSE hub) meanwhile; they must go at the pace they had
with the same load and no stalled client. The api drops the stalled connection after
SSE_SEND_TIMEOUT_S (4 s here, 30 s by default): the TCP connection is reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.e2e.conftest import DEFAULT_ENV, Api, ClusterShape
from tests.support.cluster import Cluster, new_session
from tests.support.sse import SSEStream, chunks
from tests.support.wait import apoll

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

SEND_TIMEOUT_S = 4.0
LONG = 3000  # tokens of the long answer: ~3 s at 1 ms each on an idle machine
STALL_AT = 2000  # ~220 KB of SSE events: more than the stalled client's buffers take
SHORT = 100  # tokens of the other sessions' answers
DROPPED = "client stopped reading its stream"


@pytest.fixture(scope="module")
def cluster_env() -> dict[str, object]:
    return {
        **DEFAULT_ENV,
        "sim_token_delay_ms": 1,
        "sim_first_token_delay_ms": 50,
        "sse_send_timeout_s": SEND_TIMEOUT_S,
    }


@pytest.fixture(scope="module")
def cluster_shape() -> ClusterShape:
    """2 api + 1 ai_consumer + 1 cancel_listener."""
    return ClusterShape(consumers=1, ready_timeout=90)


async def short_answer(api: Api) -> float:
    """Seconds from sending a short message to its `done`, read as a browser does."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    accepted = await api.chat(new_session(), max_tokens=SHORT)
    async with api.stream(accepted["message_id"]) as stream:
        events = await stream.until_done(within=30)
    assert len(chunks(events)) == SHORT
    return loop.time() - started


async def short_answers(api: Api, n: int = 5) -> list[float]:
    return list(await asyncio.gather(*(short_answer(api) for _ in range(n))))


def max_gap(stream: SSEStream, start: float, end: float) -> float:
    """The longest wait between two chunk events of `stream` received in [start, end]."""
    times = [e.received for e in chunks(stream.events) if start <= e.received <= end]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@contextlib.contextmanager
def stalled_reader(url: str, path: str) -> Iterator[socket.socket]:
    """A raw connection that asks for `path` as SSE and then reads nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.connect((host, int(port)))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        yield sock
    finally:
        sock.close()


def closed_by_server(sock: socket.socket, within: float) -> str:
    """Read what is left; how the server ended the connection ("reset" or "eof"). Raises
    TimeoutError when the connection is still open after `within` seconds."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    while True:
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            return "reset"
        if not data:
            return "eof"
        if time.monotonic() > deadline:
            raise TimeoutError("the server keeps sending")


async def test_a_client_that_stops_reading_slows_no_one_and_is_dropped(
    cluster: Cluster, apis: tuple[Api, Api]
) -> None:
    a, _ = apis
    api_proc = cluster.api_procs[0]
    loop = asyncio.get_running_loop()

    # a long answer read by an ordinary client: the load of the whole test
    long = await a.chat(new_session(), max_tokens=LONG)
    path = f"/api/chat/{long['message_id']}/stream"
    async with a.stream(long["message_id"]) as reader:
        reader.record()
        # baseline: short answers of other sessions, with that load and no stalled client
        await reader.wait_for(lambda evs: len(evs) >= 200, within=60, what="200 chunks")
        t0 = loop.time()
        baseline = await short_answers(a)
        baseline_gap = max_gap(reader, t0, loop.time())
        # enough backlog that the stalled client's buffers fill at once when it joins
        await reader.wait_for(lambda evs: len(evs) >= STALL_AT, within=60, what="the backlog")
        with stalled_reader(a.url, path) as sock:
            connected, connected_wall = loop.time(), time.time()
            during = await short_answers(a)
            t1 = loop.time()
            gap = max_gap(reader, connected, t1)
            # headroom: 2 cores shared with other test runs make timings noisy; a client
            # that held up the hub or the api would add the send timeout (4 s) or more
            assert t1 - connected < SEND_TIMEOUT_S, "the check ran after the drop: no evidence"
            assert max(during) <= 2 * max(baseline) + 1.5, (baseline, during)
            assert gap <= max(1.5, 3 * baseline_gap), (baseline_gap, gap)

            # dropped per the send timeout: not before it, and not long after
            line = await api_proc.log_line(lambda x: DROPPED in str(x.get("msg")), within=20)
            assert line["path"] == path
            dropped_after = datetime.fromisoformat(line["at"]).timestamp() - connected_wall
            assert SEND_TIMEOUT_S - 0.2 <= dropped_after <= SEND_TIMEOUT_S + 10, dropped_after
            how = await asyncio.to_thread(closed_by_server, sock, 5.0)
            assert how in ("reset", "eof")
        # the answer the stalled client asked for went on for its other reader: the consumer
        # was not held up either
        await reader.wait_done(within=90)
    assert len(chunks(reader.events)) == LONG
    # the api is still fine for everyone
    assert max(await short_answers(a, 2)) <= 2 * max(baseline) + 1.0

    async def no_more_sse_clients() -> bool | None:
        response = await a.client.get("/metrics")
        assert response.status_code == 200, response.text
        rows = [r for r in response.text.splitlines() if r.startswith("chatpipe_sse_clients ")]
        assert rows, "no chatpipe_sse_clients gauge"
        return True if float(rows[0].split()[1]) == 0 else None

    # the stalled client's response ended too (its generator was closed): nothing kept
    await apoll("the api to forget the stalled client", no_more_sse_clients, 5)
