"""Wires one ai_consumer process: clients, the embedded cancel listener, the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from prometheus_client import start_http_server

from ai_consumer.handler import Handler
from ai_consumer.llm.factory import make_provider
from ai_consumer.registry import Registry
from ai_consumer.sink import Sink
from ai_consumer.worker import Worker
from cancel_listener.listener import CancelListener
from chatpipe.clients import make_consumer, make_producer, make_redis
from chatpipe.metrics import Metrics
from chatpipe.schemas import ChatCancel
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def started(
    settings: Settings, metrics: Metrics
) -> AsyncIterator[tuple[Worker, CancelListener]]:
    redis = make_redis(settings, max_connections=max(16, settings.redis_max_connections))
    producer = make_producer(settings)
    consumer = make_consumer(
        settings,
        group_id=settings.consumer_group,
        group_instance_id=None,
        max_poll_records=500,
    )
    cancels = make_consumer(settings, group_id=None, fetch_max_wait_ms=100)
    provider = make_provider(settings)
    state = State(redis, settings)
    registry = Registry()
    await producer.start()
    try:
        await consumer.start()
        await cancels.start()
        sink = Sink(redis, state, producer, settings, metrics)
        sink.start()
        handler = Handler(settings, state, sink, producer, provider, registry, metrics)
        worker = Worker(settings, consumer, producer, state, handler, registry, metrics)

        def interrupt(cancel: ChatCancel) -> None:
            if registry.cancel(cancel.message_id, cancel.requested_at.timestamp()):
                metrics.cancels_local.inc()
                log.info(
                    "cancel received for a local stream, interrupting",
                    extra={"message_id": cancel.message_id, "session_id": cancel.session_id},
                )

        listener = CancelListener(
            settings, cancels, redis, state, metrics, producer, on_cancel=interrupt
        )
        try:
            yield worker, listener
        finally:
            await sink.stop()
    finally:
        for closer in (consumer.stop, cancels.stop, producer.stop, provider.aclose, redis.aclose):
            with contextlib.suppress(Exception):
                await closer()


async def serve(settings: Settings) -> None:
    metrics = Metrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.api_host, registry=metrics.registry)
    async with started(settings, metrics) as (worker, listener):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        listen = asyncio.create_task(listener.run(), name="cancel-listener")
        log.info(
            "ai_consumer %s started (group %s, topic %s, max %d streams)",
            settings.instance_id,
            settings.consumer_group,
            settings.requests_topic,
            settings.max_concurrent_streams,
        )
        try:
            await worker.run()
        finally:
            listener.request_stop()
            listen.cancel()
            await asyncio.gather(listen, return_exceptions=True)
    log.info("ai_consumer %s stopped", settings.instance_id)
