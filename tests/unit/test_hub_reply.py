"""The hub parses XREAD's reply as it comes off the wire (api/hub.py): a dict of stream key →
entries over RESP3, a list of [key, entries] pairs over RESP2, each entry [id, [field, value,
...]]. Both shapes must give the subscribers the same (id, fields) items. Fakes only: the real
replies are in tests/integration/test_hub.py."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, cast

import pytest
from redis._parsers.helpers import parse_xread_resp3_to_resp2_legacy
from redis.asyncio import Redis
from redis.exceptions import ClusterDownError, TryAgainError

from api.hub import Hub, RawReply, entries_of, reply_streams
from chatpipe.keys import Keys
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings

KEYS = Keys.from_settings(Settings(key_prefix="u:"))
A, B = KEYS.stream("s", "m-a").encode(), KEYS.stream("s", "m-b").encode()
CHUNK = [b"e", b"chunk", b"s", b"1", b"d", b'{"t": "x"}']
DONE = [b"e", b"done", b"s", b"2", b"d", b"{}"]


class FakeReader:
    def __init__(self) -> None:
        self.callbacks: dict[str, Any] = {}

    def set_response_callback(self, command: str, callback: Any) -> None:
        self.callbacks[command] = callback


class FakePipeline:
    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def xadd(self, *args: Any, **kwargs: Any) -> None:
        pass

    def expire(self, *args: Any) -> None:
        pass

    async def execute(self) -> list[Any]:
        return []


class FakeWriter:
    """Every stream's last entry is `last`: the hub starts a new subscriber there at the latest."""

    last = b"99-0"

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline()

    async def xrevrange(self, name: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return [(self.last, {})]

    async def xrange(self, name: str, min: str, max: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return []


def new_hub(queue_size: int = 100) -> tuple[Hub, Metrics]:
    metrics = Metrics()
    reader, writer = cast(Redis, FakeReader()), cast(Redis, FakeWriter())
    return Hub(reader, writer, KEYS, "api-u", metrics, queue_size), metrics


def resp3(streams: dict[bytes, list[list[Any]]]) -> RawReply:
    return streams


def resp2(streams: dict[bytes, list[list[Any]]]) -> RawReply:
    return [[k, v] for k, v in streams.items()]


SHAPES = pytest.mark.parametrize("shape", [resp2, resp3], ids=["resp2", "resp3"])


def test_the_hub_takes_xreads_reply_unconverted() -> None:
    reader = FakeReader()
    Hub(cast(Redis, reader), cast(Redis, FakeWriter()), KEYS, "api-u", Metrics(), 10)
    reply = {A: [[b"1-0", CHUNK]]}
    assert reader.callbacks["XREAD"](reply) is reply


def fields(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


@SHAPES
def test_both_shapes_give_the_same_streams(shape: Any) -> None:
    streams = {A: [[b"5-1", CHUNK], [b"5-2", DONE]], B: [[b"7-0", CHUNK]]}
    assert [(k, entries_of(v)) for k, v in reply_streams(shape(streams))] == [
        (A, [("5-1", fields(CHUNK)), ("5-2", fields(DONE))]),
        (B, [("7-0", {b"e": b"chunk", b"s": b"1", b"d": b'{"t": "x"}'})]),
    ]


@pytest.mark.parametrize(
    "flat",
    [
        CHUNK,
        DONE,
        [b"e", b"chunk"],
        [b"e", b"chunk", b"d", b"{}"],
        [b"e", b"chunk", b"s", b"1", b"d", b"{}", b"x", b"y"],
        [b"e", b"chunk", b"e", b"done", b"d", b"{}"],  # a field twice: the last one wins
    ],
)
def test_fields_are_what_redis_py_made_of_them(flat: list[bytes]) -> None:
    legacy = parse_xread_resp3_to_resp2_legacy({A: [[b"1-1", flat]]})
    assert [(A, entries_of([[b"1-1", flat]]))] == [
        (key, [(i.decode(), f) for i, f in entries]) for key, entries in legacy
    ]


@pytest.mark.parametrize("empty", [None, {}, []])
def test_a_read_that_timed_out_has_no_streams(empty: RawReply) -> None:
    assert list(reply_streams(empty)) == []


@SHAPES
async def test_dispatch_delivers_each_stream_to_its_subscribers_and_moves_the_cursors(
    shape: Any,
) -> None:
    hub, _ = new_hub()
    a1, a2 = await hub.subscribe("s", "m-a", (0, 0)), await hub.subscribe("s", "m-a", (0, 0))
    b = await hub.subscribe("s", "m-b", (0, 0))
    c = await hub.subscribe("s", "m-c", (0, 0))
    read_from = dict(hub._groups[0].cursors)
    wake = hub._groups[0].wake_key.encode()
    reply = {wake: [[b"3-0", [b"w", b"1"]], [b"4-7", [b"w", b"1"]]]}
    reply |= {A: [[b"5-1", CHUNK], [b"5-12", DONE]], B: [[b"7-0", CHUNK]]}
    hub._dispatch(hub._groups[0], shape(reply), read_from)

    expected_a = [("5-1", fields(CHUNK)), ("5-12", fields(DONE))]
    for sub in (a1, a2):
        assert [sub.queue.get_nowait() for _ in range(2)] == expected_a
    assert b.queue.get_nowait()[0] == "7-0"
    for sub in (a1, a2, b, c):
        assert sub.queue.empty()
    assert hub._groups[0].wake_id == "4-7"
    assert hub._groups[0].cursors == {"m-a": "5-12", "m-b": "7-0", "m-c": "0-0"}


@SHAPES
async def test_entries_read_from_a_cursor_that_changed_meanwhile_are_not_delivered(
    shape: Any,
) -> None:
    hub, _ = new_hub()
    old = await hub.subscribe("s", "m-a", (0, 0))
    read_from = dict(hub._groups[0].cursors)  # the read asks for m-a after 0-0
    hub.unsubscribe(old)  # the tab closes while the hub reads ...
    new = await hub.subscribe("s", "m-a", (5, 1))  # ... and the reloaded page resumes after 5-1
    hub._dispatch(hub._groups[0], shape({A: [[b"5-1", CHUNK], [b"5-2", DONE]]}), read_from)
    assert new.queue.empty()
    assert hub._groups[0].cursors["m-a"] == "5-1"  # the next read fetches 5-2 from the new cursor
    gone_read = dict(hub._groups[0].cursors)
    hub.unsubscribe(new)  # everyone left during the read
    hub._dispatch(hub._groups[0], shape({A: [[b"5-2", DONE]]}), gone_read)
    assert hub._groups[0].cursors == {}


@SHAPES
async def test_a_subscriber_whose_queue_fills_is_dropped_and_the_others_get_everything(
    shape: Any,
) -> None:
    hub, metrics = new_hub(queue_size=2)
    slow, fast = await hub.subscribe("s", "m-a", (0, 0)), await hub.subscribe("s", "m-a", (0, 0))
    read_from = dict(hub._groups[0].cursors)
    hub._dispatch(hub._groups[0], shape({A: [[b"1-0", CHUNK], [b"1-1", CHUNK]]}), read_from)
    assert [fast.queue.get_nowait()[0] for _ in range(2)] == ["1-0", "1-1"]
    read_from = dict(hub._groups[0].cursors)
    hub._dispatch(hub._groups[0], shape({A: [[b"1-2", CHUNK], [b"2-0", DONE]]}), read_from)
    assert slow.overflowed
    assert not fast.overflowed
    assert [fast.queue.get_nowait()[0] for _ in range(2)] == ["1-2", "2-0"]
    assert metrics.registry.get_sample_value("chatpipe_sse_slow_clients_dropped_total") == 1
    assert hub._subs["m-a"] == {fast}


class ScriptedReader(FakeReader):
    """XREAD answers from a script: an exception to raise, or a reply; then it blocks."""

    def __init__(self, answers: list[Any]) -> None:
        super().__init__()
        self.answers = answers
        self.reads = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.reads += 1
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        await asyncio.Event().wait()  # a blocked XREAD with nothing new
        return None


@pytest.mark.parametrize("refusal", [ClusterDownError, TryAgainError])
async def test_a_cluster_without_a_primary_for_a_moment_ends_no_client(
    refusal: type[Exception],
) -> None:
    """While a Redis Cluster promotes a replica it answers CLUSTERDOWN (TRYAGAIN while a slot
    moves) to every read: that is the cluster, not one client's stream, so the read is sent
    again after a backoff and every client gets its events; none is ended."""
    reader = ScriptedReader(
        [refusal("The cluster is down"), refusal("The cluster is down"), {A: [[b"5-1", CHUNK]]}]
    )
    hub = Hub(cast(Redis, reader), cast(Redis, FakeWriter()), KEYS, "api-u", Metrics(), 10)
    hub.start()
    try:
        sub = await hub.subscribe("s", "m-a", (0, 0))
        entry = await asyncio.wait_for(sub.queue.get(), 5)
        assert entry == ("5-1", fields(CHUNK))
        assert reader.reads >= 3
        assert hub.healthy
    finally:
        await hub.stop()
