"""infra/nginx/nginx.conf passes `nginx -t` (Debian's nginx; skipped where it is not
installed) and sets what Server-Sent Events need from a proxy. tests/e2e/test_proxy.py runs it
in front of real api processes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.nginx import CONF, check, nginx, render


def directives(text: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.strip()]


def test_config_sets_what_sse_needs() -> None:
    found = directives(CONF.read_text())
    for wanted in (
        "proxy_http_version 1.1;",
        "proxy_buffering off;",
        "proxy_cache off;",
        "gzip off;",
        "proxy_pass http://chatpipe_api;",
    ):
        assert wanted in found, f"nginx.conf lacks `{wanted}`"
    timeout = next(d for d in found if d.startswith("proxy_read_timeout"))
    value = re.fullmatch(r"proxy_read_timeout (\d+)([smh]);", timeout)
    assert value is not None, timeout
    seconds = int(value.group(1)) * {"s": 1, "m": 60, "h": 3600}[value.group(2)]
    assert seconds >= 300, "reads must outlast the gaps between SSE heartbeats by far"


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    if nginx() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    result = check(tmp_path, ["127.0.0.1:18001", "127.0.0.1:18002"], 18080)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_rejects_a_broken_config(tmp_path: Path) -> None:
    """`nginx -t` is a real check: a config without its upstream block fails it."""
    if nginx() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    broken = render(["127.0.0.1:18001"], 18080).replace("upstream chatpipe_api", "upstream other")
    conf = tmp_path / "broken.conf"
    conf.write_text(broken)
    binary = nginx()
    assert binary is not None
    result = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-g", f"pid {tmp_path}/n.pid;"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "chatpipe_api" in result.stderr
