"""`make test` runs a module's tests on one pytest-xdist worker (`--dist loadgroup`, the groups
set in tests/conftest.py): the module's processes, topics and private stack start once. When
xdist cannot group (it groups through a suffix of the test's node id, which pytest 9.2 no
longer lets it change: pytest-dev/pytest-xdist#1386), nothing fails, the tests only get spread
over the workers: each worker starts the module's processes again (CI: 568 -> 673 s) and the
fault modules that stop their own broker run beside each other. This test notices it."""

from __future__ import annotations

import os

import pytest


def test_this_module_runs_grouped_on_one_worker(request: pytest.FixtureRequest) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") is None or not request.config.getvalue("loadgroup"):
        pytest.skip("not under `--dist loadgroup`")
    assert request.node.nodeid.endswith("@tests/unit/test_xdist_grouping.py"), (
        f"{request.node.nodeid}: pytest-xdist did not group it (pin pytest: pyproject.toml)"
    )
