"""The local stacks listen on ports outside the kernel's ephemeral range, and apart.

A port in the ephemeral range (Linux: 32768-60999 by default) can be taken by any outgoing
connection's local end at the moment a node binds it: CI's cluster stack starts while the
single-node suite opens thousands of connections, and a broker on 39092 once failed to start
with "Address already in use" (CI, 2026-12-06). The single-node stacks are given by their
settings (.ci/run, infra/local/stack.sh); the cluster stack prints its own (`cluster.sh ports`:
brokers, controllers, Redis nodes and their cluster bus at +10000).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CI_RUN = (ROOT / ".ci" / "run").read_text()


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def ci_setting(name: str) -> str:
    found = re.search(rf"\b{name}=(\d+)", CI_RUN)
    assert found, f".ci/run sets no {name}"
    return found.group(1)


def cluster_ports(**env: str) -> dict[int, str]:
    out = subprocess.run(
        [str(ROOT / "infra" / "local" / "cluster.sh"), "ports"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ports = {
        int(port): f"{name} ({env or 'defaults'})"
        for port, name in map(str.split, out.splitlines())
    }
    assert len(ports) == 18, out  # 3 brokers, 3 controllers, 6 Redis nodes, 6 buses
    return ports


def test_every_stack_listens_outside_the_ephemeral_range_and_on_ports_of_its_own() -> None:
    stacks = [
        {9092: "dev kafka", 9093: "dev controller", 6379: "dev redis"},
        {
            int(ci_setting("KAFKA_PORT")): "CI kafka",
            int(ci_setting("KAFKA_CONTROLLER_PORT")): "CI controller",
            int(ci_setting("REDIS_PORT")): "CI redis",
        },
        cluster_ports(CLUSTER_KAFKA_PORT="", CLUSTER_REDIS_PORT=""),  # the dev cluster
        cluster_ports(
            CLUSTER_KAFKA_PORT=ci_setting("CLUSTER_KAFKA_PORT"),
            CLUSTER_REDIS_PORT=ci_setting("CLUSTER_REDIS_PORT"),
        ),
    ]
    low, high = ephemeral_range()
    seen: dict[int, str] = {}
    for stack in stacks:
        for port, name in stack.items():
            assert not low <= port <= high, f"{name} on {port}: in the ephemeral range {low}-{high}"
            assert port not in seen, f"{name} and {seen[port]} both on {port}"
            seen[port] = name
