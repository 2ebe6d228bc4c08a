"""Kafka and Redis client factories. Called from `__main__` / `lifespan`, never at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import BlockingConnectionPool, Redis

from chatpipe.errors import Unavailable
from chatpipe.settings import Settings

log = logging.getLogger(__name__)


def kafka_common(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": f"chatpipe-{settings.instance_id}",
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "retry_backoff_ms": 100,
        "metadata_max_age_ms": 30_000,
        "connections_max_idle_ms": 540_000,
    }


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """Idempotent producer, acks=all: a 202 and a chunk mean 'in Kafka on every in-sync replica'."""
    opts: dict[str, Any] = {
        **kafka_common(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
        "max_batch_size": 256 * 1024,
        "max_request_size": 11 * 1024 * 1024,  # the DLQ forwards records up to 10 MiB whole
        "compression_type": None,
    }
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    opts: dict[str, Any] = {
        **kafka_common(settings),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": 100,
        "max_poll_interval_ms": 300_000,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": 1_000,
        "isolation_level": "read_uncommitted",
    }
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"chatpipe-admin-{settings.instance_id}",
        request_timeout_ms=settings.kafka_request_timeout_ms,
    )


def make_redis(
    settings: Settings, *, max_connections: int | None = None, socket_timeout: float | None = None
) -> Redis:
    """One pool per process, blocking when exhausted (redis-py's default pool raises instead)."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=10,
        decode_responses=False,
    )
    return Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


class ProducerHandle:
    """A producer that may start after the process: the api comes up while Kafka is down and
    answers 503 until a producer connects (retried in the background), instead of crashing."""

    def __init__(self, factory: Callable[[], AIOKafkaProducer], retry_s: float = 1.0) -> None:
        self._factory = factory
        self._retry_s = retry_s
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error = "not started"

    async def _try_start(self) -> bool:
        producer = self._factory()
        try:
            await producer.start()
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                await producer.stop()
            return False
        self._producer = producer
        return True

    async def start(self) -> None:
        if not await self._try_start():
            log.warning(
                "Kafka not reachable at start (%s); retrying in the background", self.last_error
            )
            self._task = asyncio.create_task(self._retry(), name="kafka-producer-start")

    async def _retry(self) -> None:
        while not await self._try_start():  # noqa: ASYNC110 - retrying a connection, nothing to wait on
            await asyncio.sleep(self._retry_s)
        log.info("Kafka producer connected")

    def get(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise Unavailable(f"kafka: not connected ({self.last_error})")
        return self._producer

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
