"""What the numbers were measured on: CPU, memory, versions, load."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from typing import Any

import psutil

PACKAGES = [
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "redis",
    "hiredis",
    "aiokafka",
    "pydantic",
    "orjson",
    "httpx",
    "psutil",
    "py-spy",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def uptime() -> str:
    return _run(["uptime"]) or " ".join(f"{x:.2f}" for x in os.getloadavg())


def kafka_version(broker_pid: int | None) -> str:
    if broker_pid is None:
        return "unknown"
    try:
        cmd = " ".join(psutil.Process(broker_pid).cmdline())
    except psutil.Error:
        return "unknown"
    m = re.search(r"kafka[-_](?:2\.\d+-)?(\d+\.\d+\.\d+)", cmd)
    return m.group(1) if m else "unknown"


def describe(broker_pid: int | None) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    redis_v = _run(["redis-server", "--version"])
    m = re.search(r"v=(\S+)", redis_v)
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "os": _run(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "redis_server": m.group(1) if m else redis_v,
        "kafka": kafka_version(broker_pid),
        "packages": versions,
    }
