"""`chatpipe dev`: the local stack, the topics, 2 api + 3 ai_consumer + 1 cancel listener.

Ctrl-C (or SIGTERM) stops every process it started, and the Kafka/Redis stack when this
command started it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from chatpipe.errors import ChatpipeError
from chatpipe.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "infra" / "local" / "stack.sh"


def _log_dir() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    path = state / "chatpipe" / "dev-logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stack(*args: str) -> int:
    return subprocess.call(["bash", str(STACK), *args])


def _spawn(name: str, module: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    out = (logs / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", module],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_ready(urls: list[str], procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        if any(p.poll() is not None for p in procs):
            raise ChatpipeError("a process exited during start-up; see the logs")
        url = pending[0]
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ChatpipeError(f"{url} not ready after {timeout:.0f}s")
        time.sleep(0.2)


METRICS_LINE = re.compile(r"metrics listening on (http://\S+/metrics)")


def _metrics_urls(logs: Path, names: list[str], timeout: float = 10) -> dict[str, str]:
    """The /metrics address each process logged at start (METRICS_PORT=0: a free port)."""
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    while True:
        for name in names:
            if name not in found:
                text = (logs / f"{name}.log").read_text(errors="replace")
                match = METRICS_LINE.findall(text)
                if match:
                    found[name] = match[-1]  # the latest start's
        if len(found) == len(names) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def run_dev(settings: Settings, apis: int, consumers: int, start_stack: bool) -> int:
    started_stack = False
    if start_stack and _stack("status") != 0:
        if _stack("start") != 0:
            raise ChatpipeError("the local Kafka/Redis stack did not start (see above)")
        started_stack = True
    from chatpipe.cli import _topics

    if asyncio.run(_topics(settings)) != 0:
        return 2
    logs = _log_dir()
    base = dict(os.environ)
    base.update(
        KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        REDIS_URL=settings.redis_url,
        LOG_FORMAT=os.environ.get("LOG_FORMAT", "text"),
        # every ai_consumer and the listener serve /metrics on a free port, printed below
        METRICS_PORT="0",
        SIM_TOKEN_DELAY_MS=os.environ.get("SIM_TOKEN_DELAY_MS", "60"),
    )
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for i in range(apis):
            port = settings.api_port + i
            procs.append(
                _spawn(
                    f"api-{i + 1}",
                    "api",
                    {**base, "API_PORT": str(port), "INSTANCE_ID": f"api-{i + 1}"},
                    logs,
                )
            )
            urls.append(f"http://{settings.api_host}:{port}")
        for i in range(consumers):
            procs.append(
                _spawn(
                    f"ai_consumer-{i + 1}",
                    "ai_consumer",
                    {**base, "INSTANCE_ID": f"ai-{i + 1}"},
                    logs,
                )
            )
        procs.append(
            _spawn(
                "cancel_listener", "cancel_listener", {**base, "INSTANCE_ID": "listener-1"}, logs
            )
        )
        _wait_ready([f"{u}/ready" for u in urls], procs)
        print(f"chatpipe is running: {apis} api, {consumers} ai_consumer, 1 cancel_listener")
        print(f"logs: {logs}")
        for url in urls:
            print(f"api: {url}  (OpenAPI: {url}/docs, metrics: {url}/metrics)")
        others = [f"ai_consumer-{i + 1}" for i in range(consumers)] + ["cancel_listener"]
        for name, url in _metrics_urls(logs, others).items():
            print(f"{name} metrics: {url}")
        print(f"Open the demo: {urls[0]}/")
        print("Ctrl-C stops everything.", flush=True)
        while not stop:
            if any(p.poll() is not None for p in procs):
                print("a chatpipe process exited; stopping (see the logs)", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if started_stack:
            _stack("stop")
