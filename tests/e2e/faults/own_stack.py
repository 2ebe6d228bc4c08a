"""A Kafka + Redis of a module's own (tests/support/private_stack.py), for the fault tests that
stop the broker, restart Redis or kill every Redis connection: they must not disturb the tests
that run beside or after them on the shared stack.

Such a module imports `real_services`, which then points every fixture of tests/conftest.py
and tests/e2e/conftest.py (`settings`, `redis`, `cluster`, `apis`, ...) at the private stack
(`private`, tests/e2e/faults/conftest.py), which a test takes to stop, start or restart a
service of it, and marks itself OWN_STACK: these modules run one after the other on one
pytest-xdist worker and share that stack (started once per session; each test leaves it up and
working; test_history_persistence.py overrides `private` with a Redis that keeps an AOF).
"""

from __future__ import annotations

import pytest

from tests.support.private_stack import PrivateStack
from tests.support.services import Services

OWN_STACK = pytest.mark.xdist_group("own-stack")


@pytest.fixture(scope="module")
def real_services(private: PrivateStack) -> Services:
    return private.services
