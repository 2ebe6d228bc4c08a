"""The provider tests' `topics` and `redis` fixtures (see tests/providers/conftest.py)."""

from tests.providers.conftest import redis, topics

__all__ = ["redis", "topics"]
