"""Fault-injection tests (issue 4): each module runs on a Kafka + Redis of its own.

`real_services` is overridden with module scope to point at a private stack
(tests/support/private_stack.py), so every fixture of tests/conftest.py and tests/e2e/conftest.py
(`settings`, `redis`, `cluster`, `apis`, ...) talks to it, and a test may stop the broker or
restart Redis (`private`) without disturbing the rest of the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.private_stack import PrivateStack, private_stack
from tests.support.services import Services


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    """The module's own stack (started; wiped after the module)."""
    with private_stack(tmp_path_factory.mktemp("stack")) as stack:
        yield stack


@pytest.fixture(scope="module")
def real_services(private: PrivateStack) -> Services:
    return private.services
