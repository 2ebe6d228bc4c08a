"""The provider tests' `topics` fixture (see tests/providers/conftest.py)."""

from tests.providers.conftest import topics

__all__ = ["topics"]
