"""`python -m bench` runs the whole suite; `python -m bench --smoke` a short check (CI)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from bench import plots, report
from bench.run import SYSTEMS, Params, Suite


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown systems {sorted(unknown)}; known: {SYSTEMS}")
    return names


def parse(argv: list[str]) -> Params:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a short end-to-end check (CI)")
    ap.add_argument("--compare-n", type=int, help="concurrency of the comparison (200)")
    ap.add_argument(
        "--sweep", type=_ints, help="concurrencies of the sweep (50,100,200,300,400,500,1000)"
    )
    ap.add_argument("--systems", type=_names, help=f"systems to run ({','.join(SYSTEMS)})")
    ap.add_argument("--sweep-systems", type=_names, help="systems swept (chatpipe,limit,seed)")
    ap.add_argument("--duration", type=float, help="seconds of load per run (20)")
    ap.add_argument("--tokens", type=int, help="tokens per answer (200)")
    ap.add_argument("--token-delay-ms", type=float, help="ms between tokens (40 = 25 tokens/s)")
    ap.add_argument("--cancel-fraction", type=float, help="share of answers cancelled (0.2)")
    ap.add_argument(
        "--arrivals",
        choices=("steady", "burst"),
        help="steady: answers spread over one answer's length, measured after it (default); "
        "burst: all start within max(1 s, n/200 s), measured from the first",
    )
    ap.add_argument("--no-burst", action="store_true", help="skip the burst case at --compare-n")
    ap.add_argument("--no-silence", action="store_true", help="skip the cancel-during-silence case")
    ap.add_argument(
        "--no-fast", action="store_true", help="skip the fast-model rows (100 tokens/s)"
    )
    ap.add_argument("--silence-n", type=int, help="concurrency of the silence case (100)")
    ap.add_argument("--silence-duration", type=float, help="seconds of the silence case (15)")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="run every n of the sweep, also after a system saturated (p99 > 2 s)",
    )
    ap.add_argument("--redis-url", help="use this Redis (shared) instead of a dedicated server")
    ap.add_argument("--redis-port", type=int, help="port of the dedicated redis-server (16399)")
    ap.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis-url names one node of a Redis Cluster: the processes under test get "
        "REDIS_CLUSTER=true, the probe sums every node (e.g. infra/local/cluster.sh: "
        "--redis-url redis://127.0.0.1:21001/0 --kafka "
        "127.0.0.1:29092,127.0.0.1:29093,127.0.0.1:29094)",
    )
    ap.add_argument("--kafka", help="bootstrap servers (KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    ap.add_argument("--max-concurrent-streams", type=int, help="MAX_CONCURRENT_STREAMS (512)")
    ap.add_argument("--max-minutes", type=float, help="time budget of the whole suite (45)")
    ap.add_argument("--out", type=Path, help="results folder (bench/results)")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the processes under test (repeatable)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR|ENV:VAL,...",
        help="A/B: also run chatpipe as chatpipe-NAME, from a copy of its packages in DIR "
        "(e.g. taken before a change) and/or with settings ENV:VALUE (comma-separated; "
        "repeatable)",
    )
    ap.add_argument("--rounds", type=int, help="repeat the systems' order this many times (1)")
    a = ap.parse_args(argv)
    p = Params.for_smoke() if a.smoke else Params()
    simple = {
        "compare_n": a.compare_n,
        "sweep": a.sweep,
        "systems": a.systems,
        "sweep_systems": a.sweep_systems,
        "duration_s": a.duration,
        "tokens": a.tokens,
        "token_delay_ms": a.token_delay_ms,
        "cancel_fraction": a.cancel_fraction,
        "silence_n": a.silence_n,
        "silence_duration_s": a.silence_duration,
        "redis_url": a.redis_url,
        "redis_port": a.redis_port,
        "kafka": a.kafka,
        "max_concurrent_streams": a.max_concurrent_streams,
        "max_minutes": a.max_minutes,
        "out_dir": a.out,
        "rounds": a.rounds,
        "arrivals": a.arrivals,
    }
    for key, value in simple.items():
        if value is not None:
            setattr(p, key, value)
    for item in a.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--env wants NAME=VALUE, got {item!r}")
        if name == "REDIS_CLUSTER":
            ap.error("--env REDIS_CLUSTER: use --redis-cluster (the probe must know)")
        p.extra_env[name] = value
    for item in a.variant:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            ap.error(f"--variant wants NAME=DIR or NAME=ENV:VAL,..., got {item!r}")
        variant: dict[str, str] = {}
        for part in value.split(","):
            key, colon, val = part.partition(":")
            if colon and key.isupper():
                variant[key] = val
            elif Path(part).is_dir():
                variant["BENCH_TREE"] = str(Path(part).resolve())
            else:
                ap.error(f"--variant {name}: {part!r} is neither a folder nor ENV:VALUE")
        p.variants[name] = variant
    if a.redis_cluster:
        if not a.redis_url:
            ap.error("--redis-cluster needs --redis-url naming one node of the cluster")
        p.redis_cluster = True
    if a.no_silence:
        p.silence = False
    if a.no_fast:
        p.fast = False
    if a.no_burst:
        p.burst = False
    if a.no_profile:
        p.profile = False
    if a.keep_going:
        p.keep_going = True
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # a SIGTERM (CI timeout) unwinds like Ctrl-C: every process started is stopped, the
    # run's topics deleted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    params = parse(argv)
    result = Suite(params, argv).run()
    params.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if params.smoke else time.strftime("full-%Y%m%dT%H%M%SZ", time.gmtime())
    json_path = params.out_dir / f"{stem}.json"
    md_path = params.out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(report.markdown(result))
    print()
    print(report.text(result))
    print(f"results: {json_path} and {md_path}")
    if not params.smoke:
        try:
            pngs = plots.draw(result, params.out_dir, stem)
        except ImportError:
            print("plots: not drawn (matplotlib missing: pip install -e '.[bench]')")
        else:
            print("plots: " + " ".join(str(p) for p in pngs))
    if params.smoke:
        failures = report.smoke_failures(result)
        if failures:
            print("SMOKE FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
        print("smoke OK: the harness ran end to end; no event lost or duplicated")
        return 0
    return 1 if result["problems"] and not result["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
