"""The processes a benchmark run starts and measures: a dedicated Redis, the chatpipe stack
(2 api + 3 ai_consumer) in a fresh namespace, the baselines, the driver; CPU/RSS sampling.

Everything listens on 127.0.0.1. Every process gets a scratch working directory (no `.env`
leaks in) and its own log file; it is stopped by its pid, SIGTERM first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from chatpipe.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The harness could not run (a process did not start, a step timed out)."""


def free_port(preferred: int | None = None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = s.getsockname()[1]
            return port
    raise BenchError("no free port")


def wait_until(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None
    log_start: int = 0  # where this process's lines begin (a restarted name appends)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class Launcher:
    """Starts processes with a base environment and stops exactly those it started."""

    def __init__(self, workdir: Path, base_env: dict[str, str]) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cwd = workdir / "cwd"
        self.cwd.mkdir(exist_ok=True)
        self.base_env = base_env
        self.procs: list[Proc] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {**self.base_env, **extra}
        # BENCH_TREE: a copy of the product packages that goes before this checkout (an A/B
        # variant, see `--variant`)
        tree = env.pop("BENCH_TREE", "")
        env["PYTHONPATH"] = os.pathsep.join(
            [
                *([tree] if tree else []),
                str(ROOT),
                *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []),
            ]
        )
        return env

    def spawn(
        self, name: str, argv: list[str], port: int | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        log = self.logs / f"{name}.log"
        start = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                env=self.env(**(env or {})),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, port, start)
        self.procs.append(proc)
        return proc

    def module(
        self, name: str, module: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        return self.spawn(name, [sys.executable, "-m", module], port, env)

    def stop(self, procs: Iterable[Proc], timeout: float = 15.0) -> None:
        procs = [p for p in procs if p.alive()]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                p.popen.wait(timeout=5)
        for p in procs:
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        self.stop(list(self.procs))


def wait_http(proc: Proc, path: str, timeout: float = 60.0) -> None:
    url = f"http://{proc.target}{path}"

    def ok() -> bool:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(f"{url}", ok, timeout)


# --- Redis ---------------------------------------------------------------------------------


class RedisServer:
    """A dedicated redis-server for the measured runs (nothing saved to disk)."""

    def __init__(self, launcher: Launcher, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = launcher.spawn(
            "redis-server",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(launcher.cwd),
            ],
        )
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            if not self.proc.alive():
                raise BenchError(f"redis-server did not start:\n{self.proc.tail()}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(f"redis-server on {port}", up, 15)
        client.close()


class RedisProbe:
    """INFO commandstats and INFO cpu, before and after a measured run."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def snapshot(self) -> dict[str, Any]:
        stats = self.client.info("commandstats")
        cpu = self.client.info("cpu")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        return {
            "calls": calls,
            "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        }

    def delta(self, before: dict[str, Any], after: dict[str, Any], chunks: int) -> dict[str, Any]:
        calls = {
            k: v - before["calls"].get(k, 0)
            for k, v in after["calls"].items()
            if v - before["calls"].get(k, 0) > 0
        }
        calls.pop("info", None)  # our own probe
        total = sum(calls.values())
        cpu = after["cpu_s"] - before["cpu_s"]
        per = 1000 / chunks if chunks else 0.0
        return {
            "commands": total,
            "commands_per_1000_chunks": round(total * per, 1),
            "by_command_per_1000_chunks": {
                k: round(v * per, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
            },
            "cpu_s": round(cpu, 3),
            "cpu_ms_per_1000_chunks": round(cpu * 1000 * per, 2),
        }

    def delete_prefix(self, prefix: str) -> int:
        n = 0
        for key in self.client.scan_iter(match=f"{prefix}*", count=1000):
            n += int(self.client.unlink(key))
        return n

    def close(self) -> None:
        self.client.close()


# --- Kafka namespace -----------------------------------------------------------------------


@dataclass
class Namespace:
    """Unique topic prefix, key prefix and consumer group for one benchmark run."""

    run_id: str = field(
        default_factory=lambda: f"bench{time.strftime('%H%M%S')}{uuid.uuid4().hex[:6]}"
    )

    @property
    def env(self) -> dict[str, str]:
        return {
            "TOPIC_PREFIX": f"{self.run_id}.",
            "KEY_PREFIX": f"{self.run_id}:",
            "CONSUMER_GROUP": f"{self.run_id}-ai",
        }


def create_topics(launcher: Launcher, env: dict[str, str]) -> str:
    exe = shutil.which("chatpipe")
    argv = [exe, "topics"] if exe else [sys.executable, "-m", "chatpipe.cli", "topics"]
    done = subprocess.run(
        argv, env=launcher.env(**env), cwd=launcher.cwd, capture_output=True, text=True, timeout=90
    )
    if done.returncode != 0:
        raise BenchError(f"`chatpipe topics` failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def delete_topics(kafka: str, ns: Namespace) -> list[str]:
    from chatpipe.clients import make_admin

    settings = Settings(kafka_bootstrap_servers=kafka, topic_prefix=ns.env["TOPIC_PREFIX"])
    names = [
        settings.requests_topic,
        settings.cancels_topic,
        settings.responses_topic,
        settings.dlq_topic,
    ]

    async def run() -> None:
        admin = make_admin(settings)
        await admin.start()
        try:
            await admin.delete_topics(names, timeout_ms=30_000)
        finally:
            await admin.close()

    asyncio.run(run())
    return names


# --- the systems under test ----------------------------------------------------------------


def _log_lines(proc: Proc) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with proc.log.open("rb") as f:
            f.seek(proc.log_start)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


@dataclass
class System:
    """One system under test: its processes, the targets the driver uses, its mode."""

    name: str
    mode: str
    procs: list[Proc]
    targets: list[str]
    label: dict[int, str] = field(default_factory=dict)  # pid -> role name


def start_chatpipe(
    launcher: Launcher,
    env: dict[str, str],
    apis: int = 2,
    consumers: int = 3,
    name: str = "chatpipe",
) -> System:
    partitions = int(env.get("TOPIC_PARTITIONS", "12"))
    run = env["KEY_PREFIX"].rstrip(":")
    procs: list[Proc] = []
    api_procs = []
    for i in range(apis):
        port = free_port()
        p = launcher.module(
            f"api-{i + 1}",
            "api",
            port,
            {**env, "API_PORT": str(port), "INSTANCE_ID": f"{run}-api-{i + 1}"},
        )
        api_procs.append(p)
        procs.append(p)
    cons = []
    for i in range(consumers):
        p = launcher.module(
            f"ai_consumer-{i + 1}",
            "ai_consumer",
            None,
            # METRICS_PORT unset: /metrics on a free port, as in production (not scraped here)
            {**env, "INSTANCE_ID": f"{run}-ai-{i + 1}"},
        )
        cons.append(p)
        procs.append(p)
    try:
        for p in api_procs:
            wait_http(p, "/ready")

        def settled() -> bool:
            sets: list[set[int]] = []
            for p in cons:
                if not p.alive():
                    raise BenchError(f"{p.name} exited during start-up:\n{p.tail()}")
                lines = _log_lines(p)
                if not any(str(x.get("msg", "")).startswith("replayed") for x in lines):
                    return False
                assigned = [
                    x["msg"]
                    for x in lines
                    if str(x.get("msg", "")).startswith("partitions assigned")
                ]
                if not assigned:
                    return False
                last = assigned[-1]
                sets.append(
                    {
                        int(v)
                        for v in last[last.index("[") + 1 : last.index("]")].split(",")
                        if v.strip()
                    }
                )
            union = set().union(*sets)
            disjoint = sum(len(s) for s in sets) == len(union)
            return disjoint and union == set(range(partitions)) and all(sets)

        wait_until("the consumer group to settle over every partition", settled, 90, 0.5)
    except BaseException:
        launcher.stop(procs)
        raise
    labels = {p.pid: p.name for p in procs}
    return System(name, "chatpipe", procs, [p.target for p in api_procs], labels)


def start_limit(launcher: Launcher, env: dict[str, str]) -> System:
    port = free_port()
    p = launcher.module("limit", "bench.baselines.limit", port, {**env, "API_PORT": str(port)})
    try:
        wait_http(p, "/openapi.json")
    except BaseException:
        launcher.stop([p])
        raise
    return System("limit", "limit", [p], [p.target], {p.pid: "limit"})


def start_seed(
    launcher: Launcher, env: dict[str, str], check_every: int, instances: int = 2
) -> System:
    procs = []
    for i in range(instances):
        port = free_port()
        procs.append(
            launcher.module(
                f"seed{check_every}-{i + 1}",
                "bench.baselines.seed",
                port,
                {**env, "API_PORT": str(port), "CHECK_EVERY": str(check_every)},
            )
        )
    try:
        for p in procs:
            wait_http(p, "/openapi.json")
    except BaseException:
        launcher.stop(procs)
        raise
    name = "seed" if check_every == 1 else f"seed-every-{check_every}"
    return System(name, "seed", procs, [p.target for p in procs], {p.pid: p.name for p in procs})


# --- CPU and memory ------------------------------------------------------------------------


def kafka_broker_pid(bootstrap: str) -> int | None:
    port = bootstrap.rsplit(":", 1)[-1]
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "kafka.Kafka" in cmd:
            found.append((f"stack-{port}" in cmd, proc.pid))
    found.sort(reverse=True)
    return found[0][1] if found else None


class Sampler:
    """CPU seconds over a window (cpu_times at both ends) and peak RSS (sampled every 0.25 s)
    of a set of processes."""

    def __init__(self, procs: dict[str, int], interval: float = 0.25) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in procs.items():
            with contextlib.suppress(psutil.Error):
                self.procs[name] = psutil.Process(pid)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.cpu0: dict[str, float] = {}
        self.ctx0: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    def add(self, name: str, pid: int, cpu: bool = True) -> None:
        """Watch one more process (RSS; CPU too unless `cpu` is False, e.g. for a process that
        exits before `stop()`)."""
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            self.procs[name] = p
            if cpu:
                self.cpu0[name] = self._cpu(p)
                self.ctx0[name] = self._ctx(p)

    @staticmethod
    def _ctx(p: psutil.Process) -> int:
        c = p.num_ctx_switches()
        return int(c.voluntary + c.involuntary)

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, p in list(self.procs.items()):
                with contextlib.suppress(psutil.Error):
                    rss = p.memory_info().rss
                    self.peak[name] = max(self.peak.get(name, 0), rss)

    def start(self) -> None:
        self.t0 = time.monotonic()
        for name, p in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self.cpu0[name] = self._cpu(p)
                self.ctx0[name] = self._ctx(p)
        self._thread.start()

    def stop(self) -> dict[str, dict[str, float]]:
        """Per process: CPU seconds and % of one core over the window, context switches (each
        wake-up from the event loop's poll is one), peak RSS."""
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self.t0
        out = {}
        for name, p in self.procs.items():
            cpu, ctx = 0.0, 0
            with contextlib.suppress(psutil.Error):
                if name in self.cpu0:
                    cpu = self._cpu(p) - self.cpu0[name]
                    ctx = self._ctx(p) - self.ctx0[name]
                self.peak[name] = max(self.peak.get(name, 0), p.memory_info().rss)
            out[name] = {
                "cpu_s": round(cpu, 2),
                "cpu_pct": round(100 * cpu / wall, 1) if wall else 0.0,
                "ctx_switches": ctx,
                "peak_rss_mb": round(self.peak.get(name, 0) / 2**20, 1),
            }
        return out
