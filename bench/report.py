"""Tables (printed and Markdown), the targets, capacity, and the smoke verdict."""

from __future__ import annotations

from typing import Any

LABELS = {
    "chatpipe": "chatpipe (2 api + 3 ai_consumer, Kafka, Redis)",
    "limit": "limit: simulator -> SSE, 1 process",
    "seed": "seed: 2 instances, Redis GET every chunk",
    "seed-every-10": "seed: 2 instances, Redis GET every 10th chunk",
}
ORDER = ["chatpipe", "limit", "seed", "seed-every-10"]
P99_LIMIT_MS = 100.0


def counted(process: str) -> bool:
    """Whether a process's CPU is the system's own: not the driver's, not the shared Kafka
    brokers' (`kafka (shared broker)`, or `kafka HOST:PORT (shared broker)` for each of
    several). Redis is the system's: the dedicated redis-server, a cluster's nodes."""
    return process != "driver" and not process.startswith("kafka")


def _redis_cpu(r: dict[str, Any]) -> str:
    """Redis CPU per 1k chunks; on a cluster every node, then primaries + replicas."""
    total = _f(r["redis"]["cpu_ms_per_1000_chunks"])
    c = r["redis"].get("cluster")
    if not c:
        return total
    prim = _f(c["primaries_cpu_ms_per_1000_chunks"])
    repl = _f(c["replicas_cpu_ms_per_1000_chunks"])
    return f"{total} ({prim} primaries + {repl} replicas)"


def _kafka_cpu(r: dict[str, Any]) -> str:
    k = r.get("kafka")
    if not k:
        return "-"
    n = len(k["brokers"])
    return _f(k["cpu_ms_per_1000_chunks"]) + (f" ({n} brokers)" if n > 1 else "")


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


class Table:
    def __init__(self, title: str, headers: list[str]) -> None:
        self.title = title
        self.headers = headers
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else _f(c) for c in cells])

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |"]
        out.append("|" + "|".join("---" for _ in self.headers) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out) + "\n"

    def text(self) -> str:
        widths = [
            max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
            for i, h in enumerate(self.headers)
        ]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True))
        out = [self.title, line, "-" * len(line)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in self.rows]
        return "\n".join(out) + "\n"


def cpu_us_per_chunk(r: dict[str, Any]) -> float:
    """CPU per chunk of every process of the system, chatpipe's share of the broker included
    (the seed and the limit use Kafka for nothing)."""
    own = float(r["cpu_ms_per_1000_chunks"])
    if r["system"].startswith("chatpipe") and r.get("kafka"):
        own += float(r["kafka"]["cpu_ms_per_1000_chunks"])
    return own


def _runs(report: dict[str, Any], scenario: str) -> list[dict[str, Any]]:
    return [r for r in report["runs"] if r["scenario"] == scenario]


def _at(report: dict[str, Any], scenario: str, system: str, n: int) -> dict[str, Any] | None:
    for r in _runs(report, scenario):
        if r["system"] == system and r["n"] == n:
            return r
    return None


def _sort_key(r: dict[str, Any]) -> tuple[int, int]:
    sys_i = ORDER.index(r["system"]) if r["system"] in ORDER else 99
    return sys_i, r["n"]


def _streams_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """One row per run: streams, latencies, cancels, integrity, Redis and CPU per chunk."""
    t = Table(
        title,
        [
            "system",
            "streams",
            "chunks/s (n x rate)",
            "token p50",
            "token p99",
            "token max",
            "TTFT p50",
            "TTFT p99",
            "cancel p50",
            "cancel p99",
            "cancel max",
            "chunks after cancel answer (max / total)",
            "missed cancels",
            "lost / dup",
            "errors",
            "Redis cmds / 1k chunks",
            "Redis CPU ms / 1k chunks",
            "Kafka CPU ms / 1k chunks",
            "CPU ms / 1k chunks (all its processes)",
        ],
    )
    for r in rows:
        lat, ttft, c = r["token_latency_ms"], r["ttft_ms"], r["cancel"]
        t.add(
            r["system"],
            str(r["streams"]["started"]),
            f"{_f(r['chunks_per_s_sustained'], 0)} ({_f(r['chunks_per_s_offered'], 0)})",
            lat["p50"],
            lat["p99"],
            lat["max"],
            ttft["p50"],
            ttft["p99"],
            c["latency_ms"]["p50"],
            c["latency_ms"]["p99"],
            c["latency_ms"]["max"],
            f"{c['chunks_after_answer_max']} / {c['chunks_after_answer_total']}",
            str(c["missed"]),
            f"{r['integrity']['lost']} / {r['integrity']['duplicated']}",
            str(sum(r["errors"].values())),
            r["redis"]["commands_per_1000_chunks"],
            _redis_cpu(r),
            _kafka_cpu(r),
            r["cpu_ms_per_1000_chunks"],
        )
    return t


def comparison(report: dict[str, Any]) -> list[Table]:
    n = report["params"]["compare_n"]
    rows = [r for r in _runs(report, "sweep") if r["n"] == n]
    rows.sort(key=_sort_key)
    p = report["params"]
    t = _streams_table(
        f"Comparison at {n} concurrent streams, {1000 / p['token_delay_ms']:g} tokens/s, "
        f"{p['tokens']} tokens, {p['cancel_fraction']:.0%} cancelled "
        "(latencies in ms; medians are the p50 columns)",
        rows,
    )
    tables = [t]
    cp = next((r for r in rows if r["system"] == "chatpipe"), None)
    if cp is not None:
        ratios = Table(
            f"chatpipe / baseline ratios at n={n} (below 1.00x = chatpipe lower)",
            [
                "baseline",
                "token p50",
                "token p99",
                "TTFT p50",
                "cancel p50",
                "cancel p99",
                "Redis cmds / chunk",
                "CPU / chunk",
            ],
        )
        for r in rows:
            if r is cp:
                continue
            ratios.add(
                r["system"],
                _ratio(cp["token_latency_ms"]["p50"], r["token_latency_ms"]["p50"]),
                _ratio(cp["token_latency_ms"]["p99"], r["token_latency_ms"]["p99"]),
                _ratio(cp["ttft_ms"]["p50"], r["ttft_ms"]["p50"]),
                _ratio(cp["cancel"]["latency_ms"]["p50"], r["cancel"]["latency_ms"]["p50"]),
                _ratio(cp["cancel"]["latency_ms"]["p99"], r["cancel"]["latency_ms"]["p99"]),
                _ratio(
                    cp["redis"]["commands_per_1000_chunks"], r["redis"]["commands_per_1000_chunks"]
                ),
                _ratio(cp["cpu_ms_per_1000_chunks"], r["cpu_ms_per_1000_chunks"]),
            )
        tables.append(ratios)
    procs = Table(
        f"Processes at n={n}: CPU over the run (100% = one core), per chunk, and peak RSS",
        [
            "system",
            "process",
            "CPU s",
            "CPU %",
            "CPU us / chunk",
            "context switches / chunk",
            "peak RSS MB",
        ],
    )
    # context switches are read for the main thread: meaningful for the single-threaded ones
    for r in rows:
        chunks = max(1, r["chunks"])
        own = [k for k in r["processes"] if counted(k)]
        for name, v in r["processes"].items():
            procs.add(
                r["system"],
                name,
                v["cpu_s"],
                v["cpu_pct"],
                round(1e6 * v["cpu_s"] / chunks),
                round(v.get("ctx_switches", 0) / chunks, 2) if name in own else "-",
                v["peak_rss_mb"],
            )
    tables.append(procs)
    redis = Table(
        f"Redis commands per 1,000 chunks at n={n}, by command",
        ["system", "commands (per 1k chunks)"],
    )
    for r in rows:
        by = r["redis"]["by_command_per_1000_chunks"]
        redis.add(r["system"], ", ".join(f"{k} {v:g}" for k, v in list(by.items())[:8]))
        spent = r["redis"].get("command_ms_per_1000_chunks")
        if spent:
            redis.add(
                f"{r['system']}, Redis time in µs per chunk",
                ", ".join(f"{k} {v:g}" for k, v in list(spent.items())[:8]),
            )
        cluster = r["redis"].get("cluster")
        if cluster:
            per = 1000 / max(1, r["chunks"])
            redis.add(
                f"{r['system']}, by node",
                ", ".join(
                    f"{name} ({v['role']}) {v['commands'] * per:.1f}"
                    for name, v in sorted(cluster["nodes"].items())
                ),
            )
    tables.append(redis)
    return tables


def silence(report: dict[str, Any]) -> Table | None:
    rows = sorted(_runs(report, "silence"), key=_sort_key)
    if not rows:
        return None
    p = report["params"]
    lo, hi = p["silence_window_s"]
    t = Table(
        f"Cancel during silence: first token after {p['silence_first_token_ms'] / 1000:g} s, "
        f"every answer cancelled {lo:g}-{hi:g} s after the request (ms)",
        [
            "system",
            "n",
            "cancels sent",
            "answers",
            "ended cancelled",
            "cancel p50",
            "cancel p99",
            "cancel max",
            "chunks after cancel answer (max)",
            "lost / dup",
            "errors",
        ],
    )
    for r in rows:
        c = r["cancel"]
        t.add(
            r["system"],
            str(r["n"]),
            str(c["sent"]),
            ", ".join(f"{k} {v}" for k, v in c["answers"].items()),
            str(r["streams"].get("cancelled", 0)),
            c["latency_ms"]["p50"],
            c["latency_ms"]["p99"],
            c["latency_ms"]["max"],
            str(c["chunks_after_answer_max"]),
            f"{r['integrity']['lost']} / {r['integrity']['duplicated']}",
            str(sum(r["errors"].values())),
        )
    return t


def sweep(report: dict[str, Any], scenario: str = "sweep") -> Table:
    rows = sorted(_runs(report, scenario), key=_sort_key)
    title = "Capacity sweep (ms; CPU % summed over the system's processes, 100% = one core)"
    if scenario == "fast":
        p = report["params"]
        rate = 1000 / p.get("fast_token_delay_ms", 10)
        title = (
            f"Fast model: {rate:.0f} tokens/s, {p.get('fast_tokens', 400)}-token answers "
            "(ms; CPU % as above; CPU per chunk in the last column)"
        )
    t = Table(
        title,
        [
            "system",
            "n",
            "chunks/s (n x rate)",
            "token p50",
            "token p99",
            "token max",
            "TTFT p99",
            "cancel p99",
            "lost / dup",
            "errors",
            "CPU %",
            "driver CPU % / loop lag p99",
            "load before",
            "CPU us / chunk (all its processes, broker included)",
        ],
    )
    for r in rows:
        own = sum(v["cpu_pct"] for k, v in r["processes"].items() if counted(k))
        t.add(
            r["system"],
            str(r["n"]),
            f"{_f(r['chunks_per_s_sustained'], 0)} ({_f(r['chunks_per_s_offered'], 0)})",
            r["token_latency_ms"]["p50"],
            r["token_latency_ms"]["p99"],
            r["token_latency_ms"]["max"],
            r["ttft_ms"]["p99"],
            r["cancel"]["latency_ms"]["p99"],
            f"{r['integrity']['lost']} / {r['integrity']['duplicated']}",
            str(sum(r["errors"].values())),
            round(own),
            f"{r['driver']['cpu_pct']:.0f} / {_f(r['driver']['loop_lag_ms']['p99'])}",
            _load(r["load"]["before"]),
            round(cpu_us_per_chunk(r)),
        )
    return t


def burst(report: dict[str, Any]) -> Table | None:
    rows = sorted(_runs(report, "burst"), key=_sort_key)
    if not rows:
        return None
    return _streams_table(
        f"Burst arrivals at n={rows[0]['n']}: every answer starts within max(1 s, n/200 s), so "
        "they also end and start again together, one answer later; measured from the first "
        "start (ms)",
        rows,
    )


def chatpipe_split(report: dict[str, Any]) -> Table | None:
    rows = [r for r in _runs(report, "sweep") if r["system"] == "chatpipe"]
    rows += [r for r in _runs(report, "burst") if r["system"] == "chatpipe"]
    rows += [r for r in _runs(report, "silence") if r["system"] == "chatpipe"]
    if not rows:
        return None
    t = Table(
        "Where chatpipe's time goes (ms, p50 / p99): a chunk from the model to Redis (XADD, by "
        "the entry id's clock) and from Redis to the client; the request accepted (POST -> 202); "
        "the cancel answered (POST -> 200) and the stream ended (POST -> done)",
        [
            "run",
            "token",
            "produced -> XADD",
            "XADD -> client",
            "POST /api/chat -> 202",
            "TTFT",
            "cancel answered",
            "cancel -> done",
        ],
    )

    def pp(summary: dict[str, Any] | None) -> str:
        if not summary or summary.get("p50") is None:
            return "-"
        return f"{_f(summary['p50'])} / {_f(summary['p99'])}"

    for r in rows:
        split = r.get("token_latency_split_ms") or {}
        t.add(
            f"{r['scenario']} n={r['n']}",
            pp(r["token_latency_ms"]),
            pp(split.get("produced_to_redis_xadd")),
            pp(split.get("redis_xadd_to_client")),
            pp(r.get("accept_ms")),
            pp(r["ttft_ms"]),
            pp(r["cancel"].get("answer_ms")),
            pp(r["cancel"]["latency_ms"]),
        )
    return t


def _load(uptime: str) -> str:
    return uptime.rsplit("load average:", 1)[-1].strip() if "load average" in uptime else uptime


# a system that delivers less than this share of the offered chunks/s is behind: its chunks
# are late at the source (stamped when produced), which the token latency does not show
KEEPS_UP = 0.95


def capacity(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system: the largest n whose p99 stayed within 100 ms while it kept up (at least
    95% of the offered chunks/s, no errors), and the first n where it did not."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted(_runs(report, "sweep"), key=_sort_key):
        c = out.setdefault(r["system"], {"ok_up_to": None, "passed_at": None, "tested": []})
        c["tested"].append(r["n"])
        p99 = r["token_latency_ms"]["p99"]
        behind = r["chunks_per_s_sustained"] < KEEPS_UP * r["chunks_per_s_offered"]
        bad = p99 is None or p99 > P99_LIMIT_MS or behind or sum(r["errors"].values()) > 0
        if c["passed_at"] is None:
            if bad:
                c["passed_at"] = r["n"]
            else:
                c["ok_up_to"] = r["n"]
    return out


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    n = report["params"]["compare_n"]
    cp = _at(report, "sweep", "chatpipe", n)
    seed = _at(report, "sweep", "seed", n)
    sil = next((r for r in _runs(report, "silence") if r["system"] == "chatpipe"), None)
    cap = capacity(report).get("chatpipe", {})
    out: list[tuple[str, str, bool | None]] = []

    def check(what: str, value: Any, ok: bool | None) -> None:
        out.append((what, str(value), ok))

    if cp is not None:
        lat = cp["token_latency_ms"]["p99"]
        check(
            f"n={n} at 25 tokens/s: token-to-client p99 <= 50 ms",
            f"{lat} ms",
            lat is not None and lat <= 50,
        )
        c = cp["cancel"]["latency_ms"]["p99"]
        check(f"n={n}: cancel p99 <= 50 ms", f"{c} ms", c is not None and c <= 50)
        m = cp["cancel"]["chunks_after_answer_max"]
        check(f"n={n}: at most 1 chunk after the cancel answer", f"max {m}", m <= 1)
    cp_runs = [r for r in report["runs"] if r["system"] == "chatpipe"]
    if cp_runs:
        lost = sum(r["integrity"]["lost"] for r in cp_runs)
        dup = sum(r["integrity"]["duplicated"] for r in cp_runs)
        check(
            "zero lost / duplicated events (every chatpipe run)", f"{lost} / {dup}", lost + dup == 0
        )
    if sil is not None:
        c = sil["cancel"]["latency_ms"]["p99"]
        check("cancel during silence p99 <= 50 ms", f"{c} ms", c is not None and c <= 50)
    if cp is not None and seed is not None:
        a = cp["redis"]["commands_per_1000_chunks"]
        b = seed["redis"]["commands_per_1000_chunks"]
        check(
            "Redis commands per chunk <= the seed's (GET every chunk)",
            f"{a / 1000:.3f} vs {b / 1000:.3f}",
            a <= b,
        )
    if cap:
        ok_to, passed = cap.get("ok_up_to"), cap.get("passed_at")
        shown = f"p99 <= 100 ms up to n={ok_to}" + (f", passed at n={passed}" if passed else "")
        check(
            ">= 500 concurrent streams before p99 token latency passes 100 ms",
            shown,
            (ok_to or 0) >= 500,
        )
    return out


def targets_table(report: dict[str, Any]) -> Table:
    t = Table("Targets", ["target", "measured", "met"])
    for what, value, ok in targets(report):
        t.add(what, value, "yes" if ok else ("-" if ok is None else "NO"))
    return t


def capacity_table(report: dict[str, Any]) -> Table:
    t = Table(
        "Capacity: concurrent streams before p99 token latency passes 100 ms or the system falls "
        "behind (under 95% of the offered chunks/s)",
        [
            "system",
            "p99 <= 100 ms and keeping up, up to n",
            "passed 100 ms or behind at n",
            "tested n",
        ],
    )
    for system, c in sorted(
        capacity(report).items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99
    ):
        t.add(
            system,
            str(c["ok_up_to"] or "-"),
            str(c["passed_at"] or "not within the sweep"),
            ", ".join(map(str, c["tested"])),
        )
    return t


def profile_tables(report: dict[str, Any]) -> list[Table]:
    out = []
    for proc, summary in report.get("profiles", {}).items():
        if not summary.get("samples"):
            continue
        t = Table(
            f"py-spy, {proc}: {summary['samples']} samples (% of on-CPU samples)",
            [
                "self time by package",
                "%",
                "top functions (self)",
                "%",
                "top functions (inclusive)",
                "%",
            ],
        )
        a, b, c = (
            summary["self_by_package_pct"],
            summary["self_top_pct"],
            summary["inclusive_top_pct"],
        )
        for i in range(max(len(a), len(b), len(c))):
            row: list[Any] = []
            for col in (a, b, c):
                row += [col[i][0], col[i][1]] if i < len(col) else ["", ""]
            t.add(*row)
        out.append(t)
    return out


def all_tables(report: dict[str, Any]) -> list[Table]:
    tables = comparison(report)
    sil = silence(report)
    if sil is not None:
        tables.append(sil)
    tables.append(sweep(report))
    if _runs(report, "fast"):
        tables.append(sweep(report, "fast"))
    bursts = burst(report)
    if bursts is not None:
        tables.append(bursts)
    split = chatpipe_split(report)
    if split is not None:
        tables.append(split)
    tables += [capacity_table(report), targets_table(report)]
    tables += profile_tables(report)
    return tables


def _arrivals(p: dict[str, Any]) -> str:
    if p.get("arrivals", "burst") == "steady" and not p.get("smoke"):
        answer = p["tokens"] * p["token_delay_ms"] / 1000
        return (
            f"arrivals: steady (the sweep and the comparison): the n answers start spread over "
            f"one answer's length ({answer:g} s) and are measured for the next "
            f"{p['duration_s']:g} s; integrity over every stream"
        )
    return "arrivals: burst: all n start within max(1 s, n/200 s), measured from the first start"


def header(report: dict[str, Any]) -> list[str]:
    m, p = report["machine"], report["params"]
    return [
        f"chatpipe benchmark ({report['kind']}), {report['started_at']} .. {report['finished_at']}",
        f"command: {report['command']}",
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, {m['os']}, "
        f"kernel {m['kernel']}, Python {m['python']}, Redis {m['redis_server']}, Kafka {m['kafka']}",
        f"under test: TOKENS {p['tokens']}, token delay {p['token_delay_ms']:g} ms, "
        f"MAX_CONCURRENT_STREAMS {p['max_concurrent_streams']}, LOG_LEVEL INFO, 12 partitions"
        + (f"; extra env {p['extra_env']}" if p.get("extra_env") else ""),
        _arrivals(p),
        f"load at start: {report['load']['start']}",
        f"load at end:   {report['load']['end']}",
        *report["notes"],
        *(f"PROBLEM: {p}" for p in report["problems"]),
    ]


def text(report: dict[str, Any]) -> str:
    return "\n".join(header(report)) + "\n\n" + "\n".join(t.text() for t in all_tables(report))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# chatpipe benchmark results ({report['kind']})", ""]
    lines += [f"- {line}" for line in header(report)]
    lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()))
    lines.append("")
    lines += [t.markdown() for t in all_tables(report)]
    return "\n".join(lines)


def smoke_failures(report: dict[str, Any]) -> list[str]:
    """Why a smoke run failed: it could not run, or events were lost or duplicated."""
    out = list(report["problems"])
    if not report["runs"]:
        out.append("no run produced a report")
    for r in report["runs"]:
        name = f"{r['system']} n={r['n']}"
        if r["integrity"]["lost"] or r["integrity"]["duplicated"]:
            out.append(
                f"{name}: {r['integrity']['lost']} lost, {r['integrity']['duplicated']} duplicated"
            )
        if r["errors"]:
            out.append(f"{name}: errors {r['errors']} {r['error_samples'][:3]}")
        if not r["chunks"]:
            out.append(f"{name}: no chunk received")
    return out
