"""The benchmark suite: which systems, which loads, in which order; the measured window.

For each system (chatpipe, limit, seed, seed-every-10) the processes are started once and the
driver is run at each concurrency of the sweep, in its own process. Around each driver run we
take INFO commandstats / INFO cpu of Redis and the CPU times of every process, and sample their
RSS. The cancel-during-silence case restarts each system with SIM_FIRST_TOKEN_DELAY_MS.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from bench import machine, profile
from bench.driver import Spec
from bench.report import counted
from bench.stack import (
    BenchError,
    Launcher,
    Namespace,
    RedisProbe,
    RedisServer,
    Sampler,
    System,
    create_topics,
    delete_topics,
    free_port,
    kafka_broker_pids,
    start_chatpipe,
    start_limit,
    start_seed,
)

SYSTEMS = ("chatpipe", "limit", "seed", "seed10")


@dataclass
class Params:
    smoke: bool = False
    compare_n: int = 200
    sweep: list[int] = field(default_factory=lambda: [50, 100, 200, 300, 400, 500, 1000])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    sweep_systems: list[str] = field(default_factory=lambda: ["chatpipe", "limit", "seed"])
    duration_s: float = 20.0
    tokens: int = 200
    token_delay_ms: float = 40.0
    cancel_fraction: float = 0.2
    # steady: the n answers start spread over one answer's length, measured after that (n
    # streams at every phase of an answer); burst: all start within max(1 s, n/200 s) and
    # everything is measured from the first start (a thundering herd every answer's length)
    arrivals: str = "steady"
    burst: bool = True  # also run each system once with burst arrivals at compare_n
    silence: bool = True
    silence_n: int = 100
    silence_duration_s: float = 15.0
    silence_first_token_ms: float = 5000.0
    silence_window_s: tuple[float, float] = (1.0, 4.0)
    # the fast-model rows (issue 16): 100 tokens/s, 400-token answers, at these n, for the
    # swept systems
    fast: bool = True
    fast_sweep: list[int] = field(default_factory=lambda: [100, 200, 300])
    fast_token_delay_ms: float = 10.0
    fast_tokens: int = 400
    profile: bool = True
    profile_duration_s: int = 15
    max_concurrent_streams: int = 512
    stream_timeout_s: float = 90.0
    redis_url: str | None = None
    redis_port: int = 16399
    # the processes under test get REDIS_CLUSTER=true and redis_url names one node of a Redis
    # Cluster; the probe then reads every node (bench/stack.py RedisProbe)
    redis_cluster: bool = False
    kafka: str = field(
        default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    out_dir: Path = Path(__file__).resolve().parent / "results"
    max_minutes: float = 45.0
    keep_going: bool = False  # run every n of the sweep, also past saturation
    seed: int = 7
    # extra environment for every process under test (settings such as COALESCE_MS, or a
    # PYTHONPATH for an experiment); recorded in the results
    extra_env: dict[str, str] = field(default_factory=dict)
    # A/B: more chatpipe systems, measured as `chatpipe-<name>` right after `chatpipe` at each
    # round; name -> extra environment: settings, and/or BENCH_TREE, a folder holding a copy of
    # api/, ai_consumer/, chatpipe/, ... that goes before this checkout
    variants: dict[str, dict[str, str]] = field(default_factory=dict)
    rounds: int = 1  # the systems' order is repeated this many times (A, B, A, B, ...)

    @classmethod
    def for_smoke(cls) -> Params:
        return cls(
            smoke=True,
            compare_n=8,
            sweep=[8],
            systems=["chatpipe", "limit", "seed"],
            sweep_systems=["chatpipe", "limit", "seed"],
            duration_s=3.0,
            tokens=20,
            token_delay_ms=20.0,
            cancel_fraction=0.3,
            silence=False,
            fast=False,
            burst=False,
            profile=False,
            stream_timeout_s=30.0,
            max_minutes=5.0,
        )


def _saturated(result: dict[str, Any]) -> bool:
    """Past this point a larger N only burns time: p99 over 2 s, or many errors."""
    p99 = result["token_latency_ms"]["p99"] or 0
    started = max(1, result["streams"]["started"])
    return p99 > 2000 or sum(result["errors"].values()) > 0.1 * started


class Suite:
    def __init__(self, params: Params, argv: list[str]) -> None:
        self.p = params
        self.argv = argv
        self.workdir = Path(tempfile.mkdtemp(prefix="chatpipe-bench-"))
        self.ns = Namespace()
        self.launcher = Launcher(self.workdir, dict(os.environ))
        self.redis: RedisServer | None = None
        self.redis_url = ""
        self.probe: RedisProbe | None = None
        self.broker_pid: int | None = None  # the first broker's (its Kafka version)
        self.kafka_missing: list[str] = []  # brokers of --kafka with no process on this host
        self.runs: list[dict[str, Any]] = []
        self.profiles: dict[str, Any] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.t_start = time.monotonic()
        self._spec_ids = itertools.count(1)

    # --- set-up and tear-down ------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.p.kafka,
            "REDIS_URL": self.redis_url,
            # always set: a REDIS_CLUSTER in the caller's environment must not leak in
            "REDIS_CLUSTER": "true" if self.p.redis_cluster else "false",
            **self.ns.env,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "SIM_TOKENS": str(self.p.tokens),
            "SIM_TOKEN_DELAY_MS": str(self.p.token_delay_ms),
            "SIM_FIRST_TOKEN_DELAY_MS": "0",
            "MAX_CONCURRENT_STREAMS": str(self.p.max_concurrent_streams),
            **self.p.extra_env,
            **extra,
        }

    def setup(self) -> None:
        if self.p.redis_cluster:
            self.setup_cluster()
        elif self.p.redis_url:
            self.redis_url = self.p.redis_url
            self.notes.append(
                f"Redis: the given server {self.redis_url} (shared: its command and CPU counts "
                "include other clients)"
            )
        elif shutil.which("redis-server"):
            self.redis = RedisServer(self.launcher, free_port(self.p.redis_port))
            self.redis_url = self.redis.url
            self.notes.append(f"Redis: a dedicated redis-server on port {self.redis.port}")
        else:
            self.redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
            self.notes.append(
                f"Redis: no redis-server on PATH, used REDIS_URL {self.redis_url} (shared)"
            )
        if self.probe is None:
            self.probe = RedisProbe(self.redis_url)
        brokers, missing = kafka_broker_pids(self.p.kafka)
        self.kafka_missing = missing
        self.broker_pid = next(iter(brokers.values()), None)
        if brokers:
            self.notes.append(
                f"Kafka: {len(brokers)} broker(s) of --kafka on this host "
                f"({', '.join(f'{a} pid {pid}' for a, pid in brokers.items())}): their CPU is "
                "summed (the kafka rows; not counted in the system's own CPU), each found again "
                "by its port before every measured run"
            )
        if missing:
            self.notes.append(
                f"Kafka: no broker process found on this host for {', '.join(missing)}: its "
                "CPU is not counted"
            )
        out = create_topics(self.launcher, self.env())
        print(
            f"[bench] namespace {self.ns.run_id}; logs in {self.launcher.logs}; topics:\n{out}",
            flush=True,
        )

    def setup_cluster(self) -> None:
        if not self.p.redis_url:
            raise BenchError("--redis-cluster needs --redis-url naming one node of the cluster")
        self.redis_url = self.p.redis_url
        try:
            self.probe = RedisProbe(self.redis_url, cluster=True)
            snapshot = self.probe.snapshot(refresh=True)
            nodes = self.probe.describe()
        except (redis.RedisError, RedisClusterException) as e:
            raise BenchError(f"Redis Cluster at {self.redis_url}: {e}") from e
        local = self.probe.local_pids(snapshot)
        if len(local) < len(snapshot["nodes"]):
            self.notes.append(
                f"Redis: only {len(local)} of the cluster's {len(snapshot['nodes'])} nodes run "
                "on this host (found by port): the others' CPU is in the Redis CPU column "
                "(INFO cpu) but not in the system's CPU per chunk"
            )
        self.notes.append(
            f"Redis: the Redis Cluster at {self.redis_url}, {nodes}; the processes under test "
            "run with REDIS_CLUSTER=true. It is shared: its counts include other clients. "
            "Redis commands are summed over the primaries; Redis CPU over every node, "
            "primaries + replicas (a replica applies every write again), and each node on this "
            "host is one of the system's processes (the redis-server:PORT rows): its CPU counts "
            "in the system's CPU per chunk, as the dedicated redis-server's does in a "
            "single-Redis run"
        )

    def teardown(self) -> None:
        self.launcher.stop([p for p in self.launcher.procs if p.name != "redis-server"])
        try:
            names = delete_topics(self.p.kafka, self.ns)
            print(f"[bench] deleted topics {', '.join(names)}", flush=True)
        except Exception as e:
            self.problems.append(f"could not delete the run's topics: {e}")
        if self.probe is not None:
            if self.redis is None:
                try:
                    n = self.probe.delete_prefix(self.ns.env["KEY_PREFIX"])
                    print(f"[bench] deleted {n} Redis keys under {self.ns.env['KEY_PREFIX']}")
                except Exception as e:
                    self.problems.append(f"could not delete the run's Redis keys: {e}")
            self.probe.close()
        self.launcher.stop_all()

    # --- systems -------------------------------------------------------------------------
    def start(self, kind: str, **env: str) -> System:
        e = self.env(**env)
        if kind == "chatpipe":
            return start_chatpipe(self.launcher, e)
        if kind.startswith("chatpipe-"):
            variant = self.p.variants[kind.removeprefix("chatpipe-")]
            return start_chatpipe(self.launcher, {**e, **variant}, name=kind)
        if kind == "limit":
            return start_limit(self.launcher, e)
        return start_seed(self.launcher, e, 10 if kind == "seed10" else 1)

    def spec(self, system: System, name: str, n: int, **over: Any) -> Spec:
        p = self.p
        values: dict[str, Any] = {
            "name": name,
            "mode": system.mode,
            "targets": system.targets,
            "concurrency": n,
            "duration_s": p.duration_s,
            "tokens": p.tokens,
            "token_delay_ms": p.token_delay_ms,
            "cancel_fraction": p.cancel_fraction,
            "stream_timeout_s": p.stream_timeout_s,
            "seed": p.seed + n,
            # unique per driver run: a repeated name (--rounds) must not reuse message ids
            "run_id": f"{self.ns.run_id}-{name}-{next(self._spec_ids)}",
        }
        values.update(over)
        spec = Spec(**values)
        if "ramp_s" not in over:
            if p.arrivals == "steady" and not p.smoke:
                spec.ramp_s = spec.warmup_s = spec.answer_s
            else:
                spec.ramp_s = max(1.0, n / 200)
        return spec

    def drive(self, spec: Spec, sampler: Sampler | None = None) -> dict[str, Any]:
        specs = self.workdir / "specs"
        specs.mkdir(exist_ok=True)
        spec_file = specs / f"{spec.name}.json"
        out_file = specs / f"{spec.name}.result.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        proc = self.launcher.spawn(
            f"driver-{spec.name}",
            [
                sys.executable,
                "-m",
                "bench.driver",
                "--spec",
                str(spec_file),
                "--out",
                str(out_file),
            ],
        )
        if sampler is not None:
            sampler.add("driver", proc.pid, cpu=False)  # it reports its own CPU
        limit = max(spec.ramp_s, spec.warmup_s) + spec.duration_s + spec.stream_timeout_s + 60
        try:
            code = proc.popen.wait(timeout=limit)
        except Exception:
            self.launcher.stop([proc], timeout=5)
            raise BenchError(f"driver {spec.name} did not finish within {limit:.0f}s") from None
        self.launcher.procs.remove(proc)
        if code != 0 or not out_file.exists():
            raise BenchError(f"driver {spec.name} failed (exit {code}):\n{proc.tail(30)}")
        result: dict[str, Any] = json.loads(out_file.read_text())
        return result

    def warm_up(self, system: System) -> None:
        spec = self.spec(
            system,
            f"warmup-{system.name}-{len(self.runs)}",
            4,
            duration_s=0.5,
            tokens=3,
            ramp_s=0.1,
            cancel_fraction=0.0,
            stream_timeout_s=30.0,
        )
        result = self.drive(spec)
        if result["errors"] or result["integrity"]["lost"] or not result["chunks"]:
            raise BenchError(
                f"warm-up of {system.name} failed: {result['errors']} {result['error_samples'][:3]}"
            )

    def measure(
        self, system: System, scenario: str, spec: Spec, profile_procs: list[str] | None = None
    ) -> dict[str, Any]:
        assert self.probe is not None
        watched = {name: pid for pid, name in system.label.items()}
        if self.redis is not None:
            watched["redis-server"] = self.redis.proc.pid
        load_before = machine.uptime()
        before = self.probe.snapshot(refresh=True)
        watched.update(self.probe.local_pids(before))  # a cluster's nodes on this host
        # again before every run: a broker may have restarted since the last one
        brokers, missing = kafka_broker_pids(self.p.kafka)
        if missing and missing != self.kafka_missing:
            self.notes.append(
                f"{spec.name}: no Kafka broker process on this host for {', '.join(missing)} "
                "at the start: its CPU is not counted"
            )
        for address, pid in brokers.items():
            label = f"kafka {address}" if len(brokers) > 1 else "kafka"
            watched[f"{label} (shared broker)"] = pid
        sampler = Sampler(watched)
        sampler.start()
        spies = []
        if profile_procs:
            pdir = self.workdir / "profiles"
            pdir.mkdir(exist_ok=True)
            for name in profile_procs:
                for gil in (False, True):
                    label = f"{name} (GIL held)" if gil else name
                    raw = pdir / f"{name}{'-gil' if gil else ''}.txt"
                    spy = profile.start(watched[name], raw, self.p.profile_duration_s, gil=gil)
                    spies.append((label, raw, spy))
        print(
            f"[bench] {spec.name}: {spec.concurrency} streams for {spec.duration_s:g}s", flush=True
        )
        try:
            result = self.drive(spec, sampler)
        finally:
            processes = sampler.stop()
            for _, _, spy in spies:
                try:
                    spy.wait(timeout=self.p.profile_duration_s + 30)
                except Exception:
                    spy.kill()
        after = self.probe.snapshot()
        if "driver" in processes:
            processes["driver"]["cpu_s"] = result["driver"]["cpu_s"]
            processes["driver"]["cpu_pct"] = result["driver"]["cpu_pct"]
        result["scenario"] = scenario
        result["system"] = system.name
        result["n"] = spec.concurrency
        result["processes"] = processes
        result["redis"] = self.probe.delta(before, after, result["chunks"])
        result["redis"]["dedicated"] = self.redis is not None
        if result["redis"].get("cluster", {}).get("topology_changed"):
            self.notes.append(
                f"{spec.name}: the Redis Cluster changed during the run (a node restarted, "
                "failed over or did not answer): its Redis numbers cover part of the run"
            )
        brokers_after, _ = kafka_broker_pids(self.p.kafka)
        if brokers_after != brokers:

            def pids(found: dict[str, int]) -> str:
                return ", ".join(f"{a} pid {pid}" for a, pid in found.items()) or "none"

            self.notes.append(
                f"{spec.name}: Kafka brokers at the start: {pids(brokers)}; at the end: "
                f"{pids(brokers_after)} (a broker stopped or restarted: its CPU covers part of "
                "the run, or none)"
            )
        kafka_cpu = sum(v["cpu_s"] for k, v in processes.items() if k.startswith("kafka"))
        result["kafka"] = {
            "brokers": sorted(brokers),
            "cpu_s": round(kafka_cpu, 3),
            "cpu_ms_per_1000_chunks": round(
                kafka_cpu * 1e6 / result["chunks"] if result["chunks"] else 0.0, 2
            ),
        }
        result["load"] = {"before": load_before, "after": machine.uptime()}
        own = [v["cpu_s"] for k, v in processes.items() if counted(k)]
        chunks = max(1, result["chunks"])
        result["cpu_ms_per_1000_chunks"] = round(1000 * sum(own) * 1000 / chunks, 1)
        for name, raw, _ in spies:
            self.profiles[name] = profile.summarise(raw)
        self._say(result)
        return result

    def _say(self, r: dict[str, Any]) -> None:
        lat, c = r["token_latency_ms"], r["cancel"]["latency_ms"]
        print(
            f"[bench]   {r['system']:<10} n={r['n']:<5} chunks/s {r['chunks_per_s_sustained']:>8} "
            f"token p50/p99/max {lat['p50']}/{lat['p99']}/{lat['max']} ms  cancel p99 {c['p99']} ms  "
            f"lost {r['integrity']['lost']} dup {r['integrity']['duplicated']} "
            f"errors {sum(r['errors'].values())}",
            flush=True,
        )

    def out_of_time(self) -> bool:
        return time.monotonic() - self.t_start > self.p.max_minutes * 60

    # --- the scenarios -------------------------------------------------------------------
    def kinds(self) -> list[str]:
        """The systems in the order they run: chatpipe's variants right after it, and the
        whole order repeated `rounds` times."""
        once: list[str] = []
        for kind in self.p.systems:
            once.append(kind)
            if kind == "chatpipe":
                once += [f"chatpipe-{name}" for name in self.p.variants]
        return once * max(1, self.p.rounds)

    def run_sweep(self) -> None:
        p = self.p
        profiled = False
        for kind in self.kinds():
            swept = kind.split("-")[0] if kind.startswith("chatpipe") else kind
            sizes = sorted(set(p.sweep if swept in p.sweep_systems else []) | {p.compare_n})
            if self.out_of_time():
                self.problems.append(f"time budget spent: {kind} sweep not run")
                continue
            try:
                system = self.start(kind)
            except BenchError as e:
                self.problems.append(f"{kind} did not start: {e}")
                continue
            try:
                self.warm_up(system)
                for n in sizes:
                    if self.out_of_time():
                        self.problems.append(f"time budget spent: {kind} n={n} not run")
                        break
                    spec = self.spec(system, f"{system.name}-n{n}", n)
                    result = self.measure(system, "sweep", spec)
                    self.runs.append(result)
                    if n == p.compare_n and p.burst:
                        self.run_burst(system)
                    if not p.keep_going and _saturated(result) and n != sizes[-1]:
                        self.notes.append(
                            f"{system.name}: saturated at n={n} (p99 > 2 s or > 10% errors); "
                            "larger n not run (--keep-going runs them)"
                        )
                        break
                if kind == "chatpipe" and p.profile and profile.available() and not profiled:
                    self.run_profile(system)
                    profiled = True
            except BenchError as e:
                self.problems.append(f"{kind}: {e}")
            finally:
                self.launcher.stop(system.procs)

    def run_burst(self, system: System) -> None:
        """The comparison's n, every answer starting within max(1 s, n/200 s) and measured from
        the first start: n new conversations at once, and again one answer later."""
        n = self.p.compare_n
        spec = self.spec(
            system, f"{system.name}-burst-n{n}", n, ramp_s=max(1.0, n / 200), warmup_s=0.0
        )
        self.runs.append(self.measure(system, "burst", spec))

    def run_profile(self, system: System) -> None:
        n = self.p.compare_n
        spec = self.spec(
            system,
            f"{system.name}-n{n}-profiled",
            n,
            duration_s=float(self.p.profile_duration_s + 2),
            seed=self.p.seed + 999,
        )
        result = self.measure(system, "profile", spec, profile_procs=["api-1", "ai_consumer-1"])
        self.runs.append(result)

    def run_fast(self) -> None:
        """The swept systems again with a fast model: 100 tokens/s, 400-token answers, at each
        n of `fast_sweep` (scenario "fast"), stopping after a saturated n as the sweep does."""
        p = self.p
        for kind in self.kinds():
            swept = kind.split("-")[0] if kind.startswith("chatpipe") else kind
            if swept not in p.sweep_systems:
                continue
            if self.out_of_time():
                self.problems.append(f"time budget spent: {kind} fast-model rows not run")
                continue
            try:
                system = self.start(
                    kind,
                    SIM_TOKEN_DELAY_MS=str(p.fast_token_delay_ms),
                    SIM_TOKENS=str(p.fast_tokens),
                )
            except BenchError as e:
                self.problems.append(f"{kind} (fast model) did not start: {e}")
                continue
            try:
                self.warm_up(system)
                for n in p.fast_sweep:
                    if self.out_of_time():
                        self.problems.append(f"time budget spent: {kind} fast n={n} not run")
                        break
                    spec = self.spec(
                        system,
                        f"{system.name}-fast-n{n}",
                        n,
                        tokens=p.fast_tokens,
                        token_delay_ms=p.fast_token_delay_ms,
                    )
                    result = self.measure(system, "fast", spec)
                    self.runs.append(result)
                    if not p.keep_going and _saturated(result) and n != p.fast_sweep[-1]:
                        break
            except BenchError as e:
                self.problems.append(f"{kind} (fast model): {e}")
            finally:
                self.launcher.stop(system.procs)

    def run_silence(self) -> None:
        p = self.p
        for kind in self.kinds():
            if self.out_of_time():
                self.problems.append(f"time budget spent: {kind} silence case not run")
                continue
            try:
                system = self.start(kind, SIM_FIRST_TOKEN_DELAY_MS=str(p.silence_first_token_ms))
            except BenchError as e:
                self.problems.append(f"{kind} (silence) did not start: {e}")
                continue
            try:
                n = p.silence_n
                spec = self.spec(
                    system,
                    f"{system.name}-silence-n{n}",
                    n,
                    duration_s=p.silence_duration_s,
                    first_token_delay_ms=p.silence_first_token_ms,
                    cancel_fraction=1.0,
                    cancel_window_s=p.silence_window_s,
                    # every answer is cancelled 1-4 s in: they are short and spread anyway
                    ramp_s=max(1.0, n / 200),
                    warmup_s=0.0,
                )
                self.runs.append(self.measure(system, "silence", spec))
            except BenchError as e:
                self.problems.append(f"{kind} (silence): {e}")
            finally:
                self.launcher.stop(system.procs)

    def run(self) -> dict[str, Any]:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        load_start = machine.uptime()
        try:
            self.setup()
            self.run_sweep()
            if self.p.fast:
                self.run_fast()
            if self.p.silence:
                self.run_silence()
        except BenchError as e:
            self.problems.append(f"harness: {e}")
        finally:
            self.teardown()
        params = asdict(self.p)
        params["out_dir"] = str(self.p.out_dir)
        return {
            "kind": "smoke" if self.p.smoke else "full",
            "started_at": started,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "python -m bench " + shlex.join(self.argv),
            "machine": machine.describe(self.broker_pid),
            "load": {"start": load_start, "end": machine.uptime()},
            "namespace": self.ns.run_id,
            "workdir": str(self.workdir),
            "params": params,
            "notes": self.notes,
            "problems": self.problems,
            "runs": self.runs,
            "profiles": self.profiles,
        }
