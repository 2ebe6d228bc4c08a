"""What every test that starts chatpipe processes shares: a free port and the environment
builder (tests/e2e/cluster.py, tests/interop/stack.py and tests/providers/procs.py use these)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

from chatpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port nobody listens on right now (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_env(values: Mapping[str, object]) -> dict[str, str]:
    """The environment of a chatpipe process: ours, without any chatpipe setting inherited
    from the environment of the test run, plus `values` (setting names, any case) upper-cased,
    and this checkout on PYTHONPATH."""
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in values.items():
        env[key.upper()] = str(value)
    return env
