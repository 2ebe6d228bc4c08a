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


def stale_nodes(state_dir: Path) -> list[str]:
    out = subprocess.run(
        [str(ROOT / "infra" / "local" / "cluster.sh"), "stale"],
        env={**os.environ, "CHATPIPE_CLUSTER_DIR": str(state_dir), "CLUSTER_REDIS_PORT": "21001"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


def test_a_redis_node_state_made_for_other_ports_is_found_stale(tmp_path: Path) -> None:
    """A dev cluster folder from before the ports moved (27001.. to 21001..): each node's
    nodes.conf names peers on the old ports, the nodes never form a cluster, and `start`
    waited 90 s and failed (seen on this machine, 2026-12-06). `start` starts such nodes
    afresh; `stale` names them."""
    assert stale_nodes(tmp_path) == []  # a new folder: nothing to start afresh
    for n in (1, 2):
        node = tmp_path / f"redis-{n}"
        node.mkdir()
        (node / "nodes.conf").write_text(f"abc 127.0.0.1:{27000 + n}@37001 myself,master\n")
    (tmp_path / "redis-2" / "port").write_text("21002\n")  # made for today's port
    assert stale_nodes(tmp_path) == ["redis-1"]
    (tmp_path / "redis-1" / "port").write_text("27001\n")
    assert stale_nodes(tmp_path) == ["redis-1"]
    (tmp_path / "redis-1" / "port").write_text("21001\n")
    assert stale_nodes(tmp_path) == []
