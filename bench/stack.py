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
from redis.cluster import RedisCluster

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


# not the system's commands: the probe's own INFO, and a replica's REPLCONF ACK to its primary
# (once a second; a Redis Cluster's replicas send them whatever the load)
OWN_COMMANDS = ("info", "replconf")


class RedisProbe:
    """INFO commandstats and INFO cpu, before and after a measured run.

    On a Redis Cluster (`cluster=True`, `url` = any node) every node known to redis-py's
    cluster client is asked, and each one's role is read from its own INFO (a failover may have
    moved it): commands are summed over the primaries (a replica's commandstats count the
    writes it applies again), CPU over every node, primaries and replicas apart."""

    def __init__(self, url: str, cluster: bool = False) -> None:
        self.url = url
        self.cluster: RedisCluster | None = RedisCluster.from_url(url) if cluster else None
        self.client: redis.Redis | None = None if cluster else redis.Redis.from_url(url)

    @staticmethod
    def _per_command(stats: dict[str, Any], field: str) -> dict[str, int]:
        """One field of INFO commandstats per command: `calls`, or `usec` (microseconds spent
        in it; a script's inner commands are counted in the script's EVALSHA and again on
        their own)."""
        return {
            k.removeprefix("cmdstat_"): int(v[field])
            for k, v in stats.items()
            if k.startswith("cmdstat_") and isinstance(v, dict) and field in v
        }

    @staticmethod
    def _cpu(info: dict[str, Any]) -> float:
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def _topology(self) -> Any:
        """The cluster client, untyped: redis-py leaves its node-map methods unannotated."""
        assert self.cluster is not None
        return self.cluster

    def nodes(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Cluster only: per node (host:port), its role, port, run id, calls by command and CPU
        seconds. `refresh`: read the cluster's map first (CLUSTER SLOTS: a node may have
        joined, restarted or failed over); only before a measured window, so that those
        commands fall outside it. A node that does not answer is left out (the run then shows
        `topology_changed`), after one more read of the map."""
        cluster = self._topology()
        if refresh:
            cluster.nodes_manager.initialize()
        for attempt in (1, 2):
            out: dict[str, dict[str, Any]] = {}
            failed = []
            for node in list(cluster.get_nodes()):
                try:
                    info: dict[str, Any] = cluster.info(
                        "commandstats", "cpu", "replication", "server", target_nodes=node
                    )
                except redis.RedisError:
                    failed.append(node.name)
                    continue
                out[node.name] = {
                    "role": "primary" if info.get("role") == "master" else "replica",
                    "port": int(info.get("tcp_port") or node.port),
                    "run_id": str(info.get("run_id", "")),
                    "calls": self._per_command(info, "calls"),
                    "usec": self._per_command(info, "usec"),
                    "cpu_s": self._cpu(info),
                }
            if not failed or attempt == 2:
                if not out:
                    raise BenchError(f"no node of the Redis Cluster at {self.url} answered")
                return out
            cluster.nodes_manager.initialize()
        raise AssertionError("unreachable")

    def snapshot(self, refresh: bool = False) -> dict[str, Any]:
        """Calls by command and CPU seconds (see the class); `refresh` as in `nodes`."""
        if self.cluster is not None:
            nodes = self.nodes(refresh)
            summed: dict[str, dict[str, int]] = {"calls": {}, "usec": {}}
            for node in nodes.values():
                if node["role"] == "primary":
                    for field, total in summed.items():
                        for k, v in node[field].items():
                            total[k] = total.get(k, 0) + v
            return {
                **summed,
                "cpu_s": sum(n["cpu_s"] for n in nodes.values()),
                "nodes": nodes,
            }
        assert self.client is not None
        stats = self.client.info("commandstats")
        cpu = self.client.info("cpu")
        return {
            "calls": self._per_command(stats, "calls"),
            "usec": self._per_command(stats, "usec"),
            "cpu_s": self._cpu(cpu),
        }

    def local_pids(self, snapshot: dict[str, Any]) -> dict[str, int]:
        """Cluster only: `redis-server:PORT (role)` -> pid of each node that runs on this
        host (found by the port it listens on), for the CPU sampler."""
        nodes: dict[str, dict[str, Any]] = snapshot.get("nodes", {})
        local = {
            n["port"]: f"redis-server:{n['port']} ({n['role']})"
            for name, n in nodes.items()
            if _is_local(name.rsplit(":", 1)[0])
        }
        pids = pids_listening(set(local), "redis-server")
        return {local[port]: pids[port] for port in sorted(local) if port in pids}

    def delta(self, before: dict[str, Any], after: dict[str, Any], chunks: int) -> dict[str, Any]:
        calls = self._grown(before, after, "calls")
        total = sum(calls.values())
        cpu = after["cpu_s"] - before["cpu_s"]
        per = 1000 / chunks if chunks else 0.0
        out: dict[str, Any] = {
            "commands": total,
            "commands_per_1000_chunks": round(total * per, 1),
            "by_command_per_1000_chunks": {
                k: round(v * per, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
            },
            "cpu_s": round(cpu, 3),
            "cpu_ms_per_1000_chunks": round(cpu * 1000 * per, 2),
            # ms of Redis time per 1k chunks (= µs per chunk), by command, largest first
            "command_ms_per_1000_chunks": {
                k: round(v * per / 1000, 2)
                for k, v in sorted(
                    self._grown(before, after, "usec").items(), key=lambda kv: -kv[1]
                )
            },
        }
        if "nodes" in after:
            out.update(self._cluster_delta(before["nodes"], after["nodes"], per))
            cpu = sum(n["cpu_s"] for n in out["cluster"]["nodes"].values())
            out["cpu_s"] = round(cpu, 3)
            out["cpu_ms_per_1000_chunks"] = round(cpu * 1000 * per, 2)
        return out

    @staticmethod
    def _grown(before: dict[str, Any], after: dict[str, Any], field: str) -> dict[str, int]:
        """Per command, how much `field` (calls, usec) grew over the run; the probe's own
        commands left out."""
        was = before.get(field, {})
        return {
            k: v - was.get(k, 0)
            for k, v in after.get(field, {}).items()
            if k not in OWN_COMMANDS and v > was.get(k, 0)
        }

    @staticmethod
    def _cluster_delta(
        before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], per: float
    ) -> dict[str, Any]:
        """Per node over the run; a node that was not there at both ends, restarted or changed
        role in between makes `topology_changed` true (its numbers then cover part of the run,
        or none)."""
        nodes: dict[str, dict[str, Any]] = {}
        changed = set(before) != set(after)
        for name, a in after.items():
            b = before.get(name)
            if b is None or b["run_id"] != a["run_id"] or b["role"] != a["role"]:
                changed = True
            same = b is not None and b["run_id"] == a["run_id"]
            cpu = a["cpu_s"] - b["cpu_s"] if same and b is not None else 0.0
            calls = 0
            if same and b is not None:
                calls = sum(
                    max(0, v - b["calls"].get(k, 0))
                    for k, v in a["calls"].items()
                    if k not in OWN_COMMANDS
                )
            nodes[name] = {
                "role": a["role"],
                "commands": calls,
                "cpu_s": round(max(0.0, cpu), 3),
                "cpu_ms_per_1000_chunks": round(max(0.0, cpu) * 1000 * per, 2),
            }

        def cpu_of(role: str) -> float:
            return float(sum(n["cpu_s"] for n in nodes.values() if n["role"] == role))

        return {
            "cluster": {
                "primaries": sorted(k for k, n in nodes.items() if n["role"] == "primary"),
                "replicas": sorted(k for k, n in nodes.items() if n["role"] == "replica"),
                "primaries_cpu_ms_per_1000_chunks": round(cpu_of("primary") * 1000 * per, 2),
                "replicas_cpu_ms_per_1000_chunks": round(cpu_of("replica") * 1000 * per, 2),
                "topology_changed": changed,
                "nodes": nodes,
            }
        }

    def describe(self) -> str:
        """Cluster only: `3 primaries (a, b, c) + 3 replicas (d, e, f)`."""
        nodes = self.nodes()
        prim = sorted(k for k, n in nodes.items() if n["role"] == "primary")
        repl = sorted(k for k, n in nodes.items() if n["role"] == "replica")
        return (
            f"{len(prim)} primaries ({', '.join(prim)}) + {len(repl)} replicas ({', '.join(repl)})"
        )

    def delete_prefix(self, prefix: str) -> int:
        """UNLINK every key under `prefix`: on a cluster, SCAN of every primary."""
        n = 0
        if self.cluster is not None:
            for node in self._topology().get_primaries():
                batch: list[bytes] = []
                for key in self.cluster.scan_iter(
                    match=f"{prefix}*", count=1000, target_nodes=node
                ):
                    batch.append(key)
                    if len(batch) >= 500:
                        n += int(self.cluster.unlink(*batch))  # split by slot by redis-py
                        batch = []
                if batch:
                    n += int(self.cluster.unlink(*batch))
            return n
        assert self.client is not None
        for key in self.client.scan_iter(match=f"{prefix}*", count=1000):
            n += int(self.client.unlink(key))
        return n

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        if self.client is not None:
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


def _is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0", "", socket.gethostname())


def pids_listening(ports: set[int], match: str) -> dict[int, int]:
    """port -> pid of the process (its command line holding `match`) that listens on it."""
    found: dict[int, int] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if not ports - set(found):
            break
        if match not in " ".join(proc.info.get("cmdline") or []):
            continue
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
                    found.setdefault(conn.laddr.port, proc.pid)
    return found


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """(host, port) of each entry of a bootstrap list `host:port,host:port`."""
    out = []
    for item in bootstrap.split(","):
        item = item.strip().rsplit("//", 1)[-1]
        if not item:
            continue
        host, _, port = item.rpartition(":")
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    return out


def kafka_broker_pids(bootstrap: str) -> tuple[dict[str, int], list[str]]:
    """Each broker of the bootstrap list that runs on this host: `host:port` -> pid, found by
    the port it listens on; and the addresses not found (elsewhere, or not a kafka.Kafka JVM
    of this host)."""
    addresses = bootstrap_addresses(bootstrap)
    local = {port for host, port in addresses if _is_local(host)}
    pids = pids_listening(local, "kafka.Kafka")
    found: dict[str, int] = {}
    missing: list[str] = []
    for host, port in addresses:
        address = f"{host}:{port}"
        if port in pids and _is_local(host):
            if pids[port] not in found.values():  # two names of one broker count once
                found[address] = pids[port]
        else:
            missing.append(address)
    if not found and len(addresses) == 1 and _is_local(addresses[0][0]):
        # its sockets unreadable (another user's process): the stack's folder in its command
        # line (infra/local/stack.sh's `stack-PORT`)
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if "kafka.Kafka" in cmd and f"stack-{addresses[0][1]}" in cmd:
                found[missing.pop()] = proc.pid
                break
    return found, missing


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
