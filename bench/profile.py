"""py-spy profiles of the stack's processes under load, summarised as text.

`py-spy record --format raw` writes collapsed stacks (`frame;frame;... count`, a frame being
`function (path:line)`). We keep the raw files in the run's work directory and summarise them:
self time by package (where the CPU goes), the top functions by self time, and the top
functions by inclusive time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench.stack import ROOT

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


def start(
    pid: int, out: Path, duration_s: int, rate: int = 100, gil: bool = False
) -> subprocess.Popen[bytes]:
    """`gil`: only samples where the thread holds the GIL, i.e. Python code running. Without
    it a thread blocked in a syscall that released the GIL (a socket write that woke the
    peer, which then took the CPU) counts too, which inflates the frames that do I/O."""
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration_s),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nonblocking",
            *(["--gil"] if gil else []),
            "--output",
            str(out),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=out.with_suffix(".err").open("wb"),
        start_new_session=True,
    )


def package_of(path: str) -> str:
    """The top-level package (or stdlib module) a source file belongs to. py-spy writes paths
    relative to their sys.path entry (`redis/asyncio/client.py`, `asyncio/runners.py`); full
    paths are cut the same way."""
    p = path.replace("\\", "/")
    if p.startswith("<"):
        return p
    for marker in ("site-packages/", "dist-packages/"):
        if marker in p:
            p = p.split(marker, 1)[1]
            break
    else:
        if "/lib/python3" in p:
            p = p.split("/lib/python3", 1)[1].partition("/")[2]
        elif p.startswith("/"):
            root = str(ROOT) + "/"
            p = p.removeprefix(root)
    head = p.split("/", 1)[0]
    if "/" not in p:  # a bare module: one of the repo's packages, when it is there
        for repo_pkg in ("chatpipe", "api", "ai_consumer", "cancel_listener", "bench"):
            if (ROOT / repo_pkg / p).exists():
                return repo_pkg
    return head.removesuffix(".py") or "other"


def _frame(raw: str) -> tuple[str, str]:
    m = _FRAME.match(raw.strip())
    if not m:
        return raw.strip(), "other"
    path = m.group("path")
    short = "/".join(path.replace("\\", "/").split("/")[-2:])
    return f"{m.group('func')} ({short})", package_of(path)


def summarise(raw_file: Path, top: int = 15) -> dict[str, Any]:
    if not raw_file.exists():
        return {"samples": 0, "error": "no profile written"}
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw_file.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        if (frames and frames[0].startswith("process ")) or (
            frames and frames[0].startswith("thread ")
        ):
            frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        name, pkg = _frame(frames[-1])
        self_fn[name] += count
        self_pkg[pkg] += count
        for fn in {_frame(f)[0] for f in frames}:
            incl[fn] += count

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]

    return {
        "samples": total,
        "self_by_package_pct": pct(self_pkg),
        "self_top_pct": pct(self_fn),
        "inclusive_top_pct": pct(incl),
    }
