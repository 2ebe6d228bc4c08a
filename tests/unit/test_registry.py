"""Registry: a cancel that arrives before its stream starts still stops it; memory is bounded."""

from __future__ import annotations

from ai_consumer.registry import Registry


def test_cancel_before_start_marks_the_stream_cancelled_at_start() -> None:
    registry = Registry()
    assert registry.cancel("m-1", at=100.0) is False  # not running here (yet)
    stream = registry.start("m-1", "s-1")
    assert stream.cancelled.is_set()
    assert not registry.start("m-2", "s-1").cancelled.is_set()


def test_cancel_of_a_running_stream_interrupts_it_once() -> None:
    registry = Registry()
    stream = registry.start("m-1", "s-1")
    assert not stream.cancelled.is_set()
    assert registry.cancel("m-1", at=123.5) is True
    assert stream.cancelled.is_set()
    assert stream.cancel_requested_at == 123.5
    assert registry.cancel("m-1", at=200.0) is False  # duplicate record: nothing new
    assert stream.cancel_requested_at == 123.5


def test_end_forgets_the_running_stream() -> None:
    registry = Registry()
    registry.start("m-1", "s-1")
    registry.end("m-1")
    registry.end("m-1")  # twice is harmless
    assert "m-1" not in registry.running
    assert registry.cancel("m-1", at=1.0) is False


def test_memory_of_cancelled_ids_is_bounded_and_forgets_the_oldest() -> None:
    registry = Registry(remember=3)
    for m in ("m-1", "m-2", "m-3"):
        registry.cancel(m, at=0.0)
    registry.cancel("m-1", at=0.0)  # seen again: now the most recent
    registry.cancel("m-4", at=0.0)  # pushes out the oldest, m-2
    assert not registry.start("m-2", "s").cancelled.is_set()
    for m in ("m-1", "m-3", "m-4"):
        assert registry.start(m, "s").cancelled.is_set(), m


def test_memory_stays_at_its_bound_under_many_cancels() -> None:
    registry = Registry(remember=100)
    for i in range(10_000):
        registry.cancel(f"m-{i}", at=0.0)
    assert len(registry._cancelled) == 100  # bounded memory in a long-running consumer
    assert registry.start("m-9999", "s").cancelled.is_set()
    assert not registry.start("m-0", "s").cancelled.is_set()
