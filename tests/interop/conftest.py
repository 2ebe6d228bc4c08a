"""Fixtures of the interop tests: the Java project (built once per session) and its runner."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatpipe.settings import Settings
from tests.interop import jvm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "java: needs java and mvn; builds and runs interop/java (Spring Kafka)"
    )


@pytest.fixture(scope="session")
def java_jar() -> Path:
    """interop/java built once per session; skipped (with the reason) without java or mvn."""
    missing = jvm.missing_tools()
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not on PATH: the Java interop tests need a JDK 17+ and Maven"
        )
    return jvm.build()


@pytest.fixture
def java(java_jar: Path, topics: Settings, tmp_path: Path) -> jvm.Java:
    """The Java producer/consumer pointed at this test's namespace (its topics exist)."""
    return jvm.Java(java_jar, topics, tmp_path)
