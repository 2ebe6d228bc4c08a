"""bench/plots.py: the sweep's PNG plots (token p99 and CPU per chunk against n)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import plots


def run(system: str, n: int, p99: float, own: float, kafka: float | None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "scenario": "sweep",
        "system": system,
        "n": n,
        "token_latency_ms": {"p99": p99},
        "cpu_ms_per_1000_chunks": own,
    }
    if kafka is not None:
        r["kafka"] = {"cpu_ms_per_1000_chunks": kafka}
    return r


REPORT: dict[str, Any] = {
    "params": {"token_delay_ms": 40},
    "runs": [
        run("seed", 200, 30.0, 119.0, 5.0),  # the broker idles beside the seed: not its cost
        run("chatpipe", 200, 20.0, 170.0, 56.0),
        run("chatpipe", 100, 10.0, 180.0, 60.0),
        {**run("chatpipe", 200, 900.0, 1.0, None), "scenario": "burst"},  # not a sweep run
        {**run("chatpipe", 100, 40.0, 90.0, 30.0), "scenario": "fast"},
        {**run("seed", 100, 20.0, 100.0, 4.0), "scenario": "fast"},
    ],
}


def test_cpu_per_chunk_counts_the_broker_for_chatpipe_only() -> None:
    cpu = plots.series(REPORT, plots.cpu_us_per_chunk)
    assert list(cpu) == ["chatpipe", "seed"]  # the report's order of systems
    assert cpu["chatpipe"] == [(100, 240.0), (200, 226.0)]
    assert cpu["seed"] == [(200, 119.0)]
    assert plots.series(REPORT, plots.token_p99_ms)["chatpipe"] == [(100, 10.0), (200, 20.0)]
    fast = plots.series(REPORT, plots.cpu_us_per_chunk, "fast")
    assert fast == {"chatpipe": [(100, 120.0)], "seed": [(100, 100.0)]}


def test_draw_writes_one_png_per_plot_and_scenario(tmp_path: Path) -> None:
    written = plots.draw(REPORT, tmp_path, "full-x")
    assert [p.name for p in written] == [
        "full-x-token-p99.png",
        "full-x-cpu-per-chunk.png",
        "full-x-fast-token-p99.png",
        "full-x-fast-cpu-per-chunk.png",
    ]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size > 5_000  # axes, lines and labels drawn


def test_a_report_without_a_sweep_draws_nothing(tmp_path: Path) -> None:
    assert plots.draw({**REPORT, "runs": REPORT["runs"][3:4]}, tmp_path, "s") == []
