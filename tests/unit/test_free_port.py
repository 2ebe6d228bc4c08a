"""tests/support/procs.py `free_port()`: a port a test's process binds a moment later.

Bind-0 handed out a port of the kernel's ephemeral range, closed it, and the process bound it
later: in between, any outgoing connection (the suite opens thousands) could take it as its
local port, and the process failed with "Address already in use" (the cluster helper respawned
an api on that; a private stack's broker or Redis just failed). The same class of race made CI
fail once (tests/unit/test_stack_ports.py). Ports below the ephemeral range are never given to
an outgoing connection; each pytest-xdist worker, and a session without xdist, draws from a
range of its own, so two sessions side by side never hand out the same port.
"""

from __future__ import annotations

import socket

import pytest

from tests.support import procs
from tests.unit.test_stack_ports import ci_setting, cluster_ports, ephemeral_range


def test_ports_are_below_the_ephemeral_range_and_never_handed_out_twice() -> None:
    low, _ = ephemeral_range()
    ports = [procs.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert max(ports) < low
    for port in ports[:20]:  # free when handed out: this process can bind it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("worker", ["", "gw0", "gw1", "gw2"])
def test_each_xdist_worker_draws_from_a_range_apart(worker: str) -> None:
    ranges = {w: procs.port_range(w) for w in ("", "gw0", "gw1", "gw2")}
    mine = set(ranges.pop(worker))
    assert mine
    assert all(not mine & set(other) for other in ranges.values())


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The only port of the range is taken: the next free one comes from the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(procs, "port_range", lambda worker: range(busy, busy + 1))
        monkeypatch.setattr(procs, "_given", set())
        port = procs.free_port()
        assert port != busy
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_no_range_holds_a_port_of_a_stack() -> None:
    stacks = {9092, 9093, 6379, 16399}  # the dev stack, and the bench's dedicated Redis
    stacks |= {int(ci_setting(n)) for n in ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "REDIS_PORT")}
    stacks |= set(cluster_ports(CLUSTER_KAFKA_PORT="", CLUSTER_REDIS_PORT=""))  # the dev cluster
    stacks |= set(
        cluster_ports(
            CLUSTER_KAFKA_PORT=ci_setting("CLUSTER_KAFKA_PORT"),
            CLUSTER_REDIS_PORT=ci_setting("CLUSTER_REDIS_PORT"),
        )
    )
    for worker in ("", "gw0", "gw1", "gw2"):
        assert not stacks & set(procs.port_range(worker)), worker
