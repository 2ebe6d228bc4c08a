"""PNG plots of a sweep, for docs/benchmarks.md: token p99 and CPU per chunk against the number
of concurrent streams, one line per system; the same two for the fast-model rows (100 tokens/s,
scenario "fast") when the report has them. `python -m bench` draws them beside its report when
matplotlib is installed (`pip install -e '.[bench]'`); `python -m bench.plots RESULTS.json`
draws them from a results file.

CPU per chunk is what the system costs the box for each chunk a client received: its own
processes (api, consumers, Redis; the seed's and the limit's processes) and, for chatpipe, the
Kafka broker it needs (the others do not use it). The driver is not counted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import ORDER, P99_LIMIT_MS, cpu_us_per_chunk

Run = dict[str, Any]


def token_p99_ms(r: Run) -> float:
    return float(r["token_latency_ms"]["p99"])


def series(
    report: dict[str, Any], value: Callable[[Run], float], scenario: str = "sweep"
) -> dict[str, list[tuple[int, float]]]:
    """system -> [(n, value)] over the report's runs of `scenario`, by n."""
    found: dict[str, list[tuple[int, float]]] = {}
    for r in report["runs"]:
        if r["scenario"] == scenario:
            found.setdefault(r["system"], []).append((int(r["n"]), value(r)))
    ordered = sorted(found, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))
    return {s: sorted(found[s]) for s in ordered}


PLOTS: list[tuple[str, str, Callable[[Run], float], float | None]] = [
    ("token-p99", "token latency p99 (ms, log)", token_p99_ms, P99_LIMIT_MS),
    ("cpu-per-chunk", "CPU per chunk received (us)", cpu_us_per_chunk, None),
]


def scenarios(report: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(scenario, file name part, tokens/s) of each plotted scenario: the sweep, then the
    fast-model rows."""
    params = report["params"]
    return [
        ("sweep", "", 1000 / float(params["token_delay_ms"])),
        ("fast", "-fast", 1000 / float(params.get("fast_token_delay_ms", 10.0))),
    ]


def draw(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per plot and scenario in `out_dir` ({stem}-token-p99.png,
    {stem}-cpu-per-chunk.png, and {stem}-fast-*.png for the fast-model rows); none for a
    scenario the report has no run of."""
    import matplotlib  # the bench extra: imported only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for (scenario, part, rate), (name, label, value, limit) in (
        (s, p) for s in scenarios(report) for p in PLOTS
    ):
        lines = series(report, value, scenario)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for system, points in lines.items():
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=system)
        if limit is not None:
            ax.axhline(limit, color="grey", linestyle="--", linewidth=1, label=f"{limit:g} ms")
            ax.set_yscale("log")
        ax.set_xlabel(f"concurrent streams (n), {rate:g} tokens/s each")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stem}{part}-{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.plots RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    for png in draw(json.loads(path.read_text()), path.parent, path.stem):
        print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
