"""A/B summary of one results file: `python -m bench.ab bench/results/full-....json`.

For runs made with `--variant NAME=DIR` (and `--rounds K`): one line per measured run in the
order they ran, then per concurrency the median of each system's rounds and its ratio to
`chatpipe` (the checkout). CPU is µs per chunk delivered; below 1.00x the variant is lower.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

COLUMNS = [
    ("chunks/s", lambda r: r["chunks_per_s_sustained"]),
    ("tok p50", lambda r: r["token_latency_ms"]["p50"]),
    ("tok p99", lambda r: r["token_latency_ms"]["p99"]),
    ("xadd>cli p99", lambda r: r["token_latency_split_ms"]["redis_xadd_to_client"]["p99"]),
    ("cancel p50", lambda r: r["cancel"]["latency_ms"]["p50"]),
    ("cancel p99", lambda r: r["cancel"]["latency_ms"]["p99"]),
    ("accept p99", lambda r: r["accept_ms"]["p99"]),
    ("api us", lambda r: _cpu(r, "api")),
    ("ai us", lambda r: _cpu(r, "ai_consumer")),
    ("redis us", lambda r: _cpu(r, "redis-server")),
    ("kafka us", lambda r: _cpu(r, "kafka")),
    ("own us", lambda r: r["cpu_ms_per_1000_chunks"]),
    ("cmds/chunk", lambda r: r["redis"]["commands_per_1000_chunks"] / 1000),
]


def _cpu(r: dict[str, Any], prefix: str) -> float:
    chunks = max(1, r["chunks"])
    cpu = sum(float(v["cpu_s"]) for k, v in r["processes"].items() if k.startswith(prefix))
    return float(1e6 * cpu / chunks)


def _value(fn: Any, r: dict[str, Any]) -> float | None:
    try:
        v = fn(r)
    except (KeyError, TypeError):
        return None
    return None if v is None else float(v)


def _row(name: str, values: list[float | None]) -> str:
    cells = ["-" if v is None else f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}" for v in values]
    return f"{name:<28}" + "".join(f"{c:>13}" for c in cells)


def summary(result: dict[str, Any]) -> str:
    runs = [r for r in result["runs"] if r["scenario"] in ("sweep", "silence")]
    head = f"{'run':<28}" + "".join(f"{c:>13}" for c, _ in COLUMNS)
    out = [head]
    for r in runs:
        name = f"{r['system']} n={r['n']}" + (" silence" if r["scenario"] == "silence" else "")
        out.append(_row(name, [_value(fn, r) for _, fn in COLUMNS]))
    out += ["", "medians over rounds, and the ratio to chatpipe (the checkout)", head]
    keys = sorted({(r["scenario"], r["n"]) for r in runs})
    for scenario, n in keys:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            if (r["scenario"], r["n"]) == (scenario, n):
                groups.setdefault(r["system"], []).append(r)
        medians: dict[str, list[float | None]] = {}
        for system, rs in groups.items():
            row: list[float | None] = []
            for _, fn in COLUMNS:
                vals = [v for v in (_value(fn, r) for r in rs) if v is not None]
                row.append(statistics.median(vals) if vals else None)
            medians[system] = row
            label = f"{system} n={n} x{len(rs)}" + (" silence" if scenario == "silence" else "")
            out.append(_row(label, row))
        base = medians.get("chatpipe")
        for system, row in medians.items():
            if system == "chatpipe" or base is None:
                continue
            ratios = [
                None if a is None or b is None or not b else a / b
                for a, b in zip(row, base, strict=True)
            ]
            cells = ["-" if v is None else f"{v:.2f}x" for v in ratios]
            out.append(f"{'  ratio ' + system:<28}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    for path in argv:
        print(path)
        print(summary(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
