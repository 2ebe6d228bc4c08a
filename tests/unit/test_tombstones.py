"""ai_consumer/tombstones.py: a cancel's tombstone goes after its record, and always goes."""

from __future__ import annotations

import asyncio

import pytest

from ai_consumer.tombstones import Tombstones


class Sent:
    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.event = asyncio.Event()

    async def __call__(self, key: bytes) -> None:
        self.keys.append(key)
        self.event.set()

    async def next(self) -> None:
        async with asyncio.timeout(2):
            await self.event.wait()
        self.event.clear()


async def test_a_record_seen_first_makes_the_tombstone_go_when_the_message_ends() -> None:
    sent = Sent()
    t = Tombstones(sent, wait_s=60)
    t.record_seen(b"s:m")
    assert sent.keys == []
    t.message_cancelled(b"s:m")
    await sent.next()
    assert sent.keys == [b"s:m"]
    assert t.waiting == 0


async def test_a_message_that_ends_first_waits_for_its_record() -> None:
    sent = Sent()
    t = Tombstones(sent, wait_s=60)
    t.message_cancelled(b"s:m")
    t.message_cancelled(b"s:m")  # a second end (a retry) does not send twice
    await asyncio.sleep(0)  # sleep-ok: let any wrongly scheduled send run before asserting none
    assert sent.keys == []
    assert t.waiting == 1
    t.record_seen(b"other:key")  # another message's record changes nothing
    assert t.waiting == 1
    t.record_seen(b"s:m")
    await sent.next()
    assert sent.keys == [b"s:m"]
    assert t.waiting == 0
    t.record_seen(b"s:m")  # a later duplicate of the record: no second tombstone
    t.message_cancelled(b"x:y")
    await t.close()
    assert sent.keys == [b"s:m", b"x:y"]  # close() sends what still waited


async def test_without_a_record_the_tombstone_goes_after_the_wait() -> None:
    sent = Sent()
    t = Tombstones(sent, wait_s=0.05)
    loop = asyncio.get_running_loop()
    ended = loop.time()
    t.message_cancelled(b"s:m")
    await sent.next()
    assert loop.time() - ended >= 0.04
    assert sent.keys == [b"s:m"]
    assert t.waiting == 0


async def test_a_failed_send_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(key: bytes) -> None:
        raise ConnectionError("broker away")

    t = Tombstones(broken, wait_s=60)
    t.record_seen(b"s:m")
    t.message_cancelled(b"s:m")
    await t.close()
    assert "cancel tombstone not sent" in caplog.text


async def test_the_memory_of_seen_records_is_bounded() -> None:
    sent = Sent()
    t = Tombstones(sent, wait_s=60, remember=2)
    for key in (b"a", b"b", b"c"):
        t.record_seen(key)
    t.message_cancelled(b"a")  # forgotten: waits for a record again
    assert t.waiting == 1
    t.message_cancelled(b"c")
    await sent.next()
    assert sent.keys == [b"c"]
    await t.close()
