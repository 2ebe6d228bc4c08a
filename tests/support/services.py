"""Where the real Kafka broker and Redis server come from.

1. `KAFKA_BOOTSTRAP_SERVERS` / `REDIS_URL` when set (the local stack: `make stack-up`, CI);
2. else testcontainers, when a Docker engine answers;
3. else the test fails with one sentence saying how to start the local stack.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

HOW = (
    "No Kafka/Redis: start the local stack with `make stack-up` and export "
    "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 REDIS_URL=redis://127.0.0.1:6379/0 "
    "(or run `make test`, which does both), or run a Docker engine for testcontainers."
)


@dataclass(frozen=True)
class Services:
    kafka: str
    redis_url: str
    source: str


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def services() -> Iterator[Services | None]:
    kafka, redis_url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("REDIS_URL")
    if kafka and redis_url:
        yield Services(kafka, redis_url, "env")
        return
    if not _docker_answers():
        yield None
        return
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with (
        KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as k,
        RedisContainer("redis:7") as r,
    ):
        host, port = r.get_container_host_ip(), r.get_exposed_port(6379)
        yield Services(k.get_bootstrap_server(), f"redis://{host}:{port}/0", "testcontainers")
