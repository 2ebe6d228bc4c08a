"""Percentile summaries (no numpy: the samples are sorted once)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: Iterable[float], scale: float = 1000.0) -> dict[str, Any]:
    """count, p50, p90, p99, max, mean of `values` (seconds) in milliseconds by default."""
    data = sorted(values)
    if not data:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}

    def r(v: float | None) -> float | None:
        return None if v is None else round(v * scale, 3)

    return {
        "count": len(data),
        "p50": r(percentile(data, 50)),
        "p90": r(percentile(data, 90)),
        "p99": r(percentile(data, 99)),
        "max": r(data[-1]),
        "mean": r(sum(data) / len(data)),
    }
