"""Fault-injection tests (issue 4). Faults in chatpipe's own processes (kill -9, SIGSTOP,
SIGTERM, a rebalance, a slow client, poison records) run on the shared stack, each module in
its own namespace. A module that stops the broker, restarts Redis or kills every Redis
connection runs on a Kafka + Redis of its own (`private`, used through
tests/e2e/faults/own_stack.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.private_stack import PrivateStack, private_stack


@pytest.fixture(scope="session")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    """The fault modules' own stack (started on first use; wiped at the end of the session);
    its Redis restarts empty (`restart_redis`)."""
    with private_stack(tmp_path_factory.mktemp("stack")) as stack:
        yield stack
