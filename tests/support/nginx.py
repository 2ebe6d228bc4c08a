"""infra/nginx/nginx.conf made runnable here: only the upstream `server` lines (the compose
file's api-1..3 host names) and the `listen` port are rewritten; every other line is tested as
shipped. `nginx()` is Debian's binary, or None when it is not installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "infra" / "nginx" / "nginx.conf"
UPSTREAM = re.compile(r"(upstream chatpipe_api \{\n)(.*?)(\n\s*keepalive)", re.DOTALL)
SERVER = re.compile(r"^\s*server (\S+?)(:\d+)?( [^;]*)?;", re.MULTILINE)
LISTEN = re.compile(r"^(\s*)listen 80;", re.MULTILINE)


def nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def upstream_servers(text: str) -> list[str]:
    """The `host:port` of each server of the upstream block."""
    block = UPSTREAM.search(text)
    assert block is not None, "no `upstream chatpipe_api {` block with keepalive"
    return [f"{m.group(1)}{m.group(2) or ''}" for m in SERVER.finditer(block.group(2))]


def render(upstreams: list[str], port: int) -> str:
    """The shipped config with `upstreams` (host:port) as servers and listening on `port`."""
    text = CONF.read_text()
    block = UPSTREAM.search(text)
    assert block is not None
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=10s;" for u in upstreams)
    text = text[: block.start(2)] + servers + text[block.end(2) :]
    text, n = LISTEN.subn(rf"\g<1>listen 127.0.0.1:{port};", text)
    assert n == 1, "no `listen 80;` line"
    return text


def prepare(workdir: Path, upstreams: list[str], port: int) -> list[str]:
    """Write the rendered config under `workdir`; return the nginx command line that runs it
    in the foreground (pid and error log in `workdir`)."""
    binary = nginx()
    assert binary is not None
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(render(upstreams, port))
    return [
        binary,
        "-p",
        str(workdir),
        "-c",
        str(conf),
        "-g",
        f"daemon off; pid {workdir / 'nginx.pid'}; error_log {workdir / 'error.log'} info;",
    ]


def check(workdir: Path, upstreams: list[str], port: int) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the rendered config."""
    cmd = prepare(workdir, upstreams, port)
    return subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30, check=False)
