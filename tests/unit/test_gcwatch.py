"""chatpipe/gcwatch.py: collector pauses are measured and logged; start-up objects frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from chatpipe.gcwatch import GCWatch, freeze_startup
from chatpipe.metrics import Metrics


@pytest.fixture
def watch() -> Iterator[GCWatch]:
    w = GCWatch(Metrics(), warn_s=0.0).install()
    yield w
    w.uninstall()


def pauses(metrics: Metrics, generation: int) -> float:
    value = metrics.registry.get_sample_value(
        "chatpipe_gc_pause_seconds_count", {"generation": str(generation)}
    )
    return value or 0.0


def test_each_collection_is_timed_by_generation_and_logged(
    watch: GCWatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = pauses(watch.metrics, 2)
    gc.collect()
    assert pauses(watch.metrics, 2) == before + 1
    assert watch.longest > 0
    assert "garbage collection paused the process" in caplog.text
    assert "generation 2" in caplog.text


def test_uninstall_stops_the_timing(watch: GCWatch) -> None:
    watch.uninstall()
    before = pauses(watch.metrics, 2)
    gc.collect()
    assert pauses(watch.metrics, 2) == before
    watch.install()
    watch.install()  # twice is once
    gc.collect()
    assert pauses(watch.metrics, 2) == before + 1


def test_freeze_moves_the_live_objects_out_of_the_collectors_reach() -> None:
    try:
        assert freeze_startup(enabled=False) == 0
        live = len(gc.get_objects())
        frozen = freeze_startup()
        assert frozen == gc.get_freeze_count()
        assert frozen >= live // 2  # most of what lives now
        assert len(gc.get_objects()) < live - frozen // 2  # and the collector no longer sees it
    finally:
        gc.unfreeze()
