"""Garbage-collector pauses: measured on every process, and kept short.

CPython's cyclic collector runs inside the process: while it runs, every stream of that
process waits. A full (generation 2) collection walks every tracked object, and start-up leaves
a few hundred thousand of them (pydantic, FastAPI, aiokafka, the settings): one full collection
took 136 to 181 ms in an api or ai_consumer process here (docs/benchmarks.md), long enough to
show in the token latency's p99. Those objects live as long as the process, so `freeze()`, once
start-up is done, moves them to the permanent generation, which the collector never scans (the
practice CPython documents for `gc.freeze`): later collections only walk what was allocated
since. Collection itself is unchanged (`GC_FREEZE=false` turns the freeze off).

`GCWatch` times every collection through `gc.callbacks` into `chatpipe_gc_pause_seconds`
(by generation) and logs a pause of `warn_s` or more.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from chatpipe.metrics import Metrics

log = logging.getLogger(__name__)


class GCWatch:
    def __init__(self, metrics: Metrics, warn_s: float = 0.05) -> None:
        self.metrics = metrics
        self.warn_s = warn_s
        self._started = 0.0
        self.longest = 0.0  # seconds, since install()

    def install(self) -> GCWatch:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        paused = time.perf_counter() - self._started
        generation = int(info.get("generation", -1))
        self.metrics.gc_pause.labels(str(generation)).observe(paused)
        self.longest = max(self.longest, paused)
        if paused >= self.warn_s:
            # logging from inside a collection is allowed (the callback runs outside it)
            log.warning(
                "garbage collection paused the process for %.0f ms (generation %d, %d collected)",
                paused * 1000,
                generation,
                int(info.get("collected", 0)),
            )


def freeze_startup(enabled: bool = True) -> int:
    """Call once start-up is done: collect what start-up left, then freeze the rest. Returns
    how many objects are frozen (0 when `enabled` is false)."""
    if not enabled:
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d start-up objects frozen", frozen)
    return frozen
