"""Wires one ai_consumer process: clients, the embedded cancel listener, the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from ai_consumer.handler import Handler
from ai_consumer.llm.factory import make_provider
from ai_consumer.registry import Registry
from ai_consumer.sink import Sink
from ai_consumer.takeover import Takeover
from ai_consumer.tombstones import Tombstones
from ai_consumer.wakeup import CancelWakeup
from ai_consumer.worker import Worker
from cancel_listener.listener import CancelListener
from chatpipe.clients import make_consumer, make_producer, make_redis, verify_redis
from chatpipe.gcwatch import GCWatch
from chatpipe.metrics import Metrics, serve_metrics
from chatpipe.schemas import ChatCancel
from chatpipe.settings import Settings
from chatpipe.state import State
from chatpipe.tracing import Tracing, make_tracing

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def started(
    settings: Settings, metrics: Metrics, tracing: Tracing | None = None
) -> AsyncIterator[tuple[Worker, CancelListener, Takeover]]:
    redis = make_redis(settings, max_connections=max(16, settings.redis_max_connections))
    producer = make_producer(settings, linger_ms=settings.producer_linger_ms)
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
        await verify_redis(redis, settings)  # a refused Redis login fails start-up, clearly
        await consumer.start()
        await cancels.start()
        sink = Sink(state, producer, settings, metrics)
        sink.start()

        async def send_tombstone(key: bytes) -> object:
            return await producer.send(settings.cancels_topic, None, key=key)

        tombstones = Tombstones(send_tombstone)
        handler = Handler(settings, state, sink, tombstones, provider, registry, metrics, tracing)
        worker = Worker(settings, consumer, producer, state, handler, registry, metrics)
        takeover = Takeover(settings, state, handler, registry, metrics)

        def interrupt(cancel: ChatCancel) -> None:
            if registry.cancel(cancel.message_id, cancel.requested_at.timestamp()):
                metrics.cancels_local.inc()
                log.info(
                    "cancel received for a local stream, interrupting",
                    extra={"message_id": cancel.message_id, "session_id": cancel.session_id},
                )

        listener = CancelListener(
            settings,
            cancels,
            redis,
            state,
            metrics,
            producer,
            on_cancel=interrupt,
            on_record=tombstones.record_seen,
        )
        # the api's Pub/Sub wake-up interrupts a local stream before chat.cancels arrives
        wakeup = CancelWakeup(redis, state.keys.cancel_wakeup(), interrupt)
        woken = asyncio.create_task(wakeup.run(), name="cancel-wakeup")
        try:
            yield worker, listener, takeover
        finally:
            woken.cancel()
            await asyncio.gather(woken, return_exceptions=True)
            await tombstones.close()
            await sink.stop()
    finally:
        for closer in (consumer.stop, cancels.stop, producer.stop, provider.aclose, redis.aclose):
            with contextlib.suppress(Exception):
                await closer()


async def serve(settings: Settings) -> None:
    metrics = Metrics()
    endpoint = serve_metrics(metrics, settings.metrics_bind, settings.metrics_port)
    tracing = make_tracing(settings, "ai_consumer")
    try:
        await _serve(settings, metrics, tracing)
    finally:
        tracing.close()
        if endpoint is not None:
            endpoint.close()


async def _serve(settings: Settings, metrics: Metrics, tracing: Tracing) -> None:
    async with started(settings, metrics, tracing) as (worker, listener, takeover):
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def request_stop() -> None:  # a signal: flip state only
            worker.request_stop()
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
        listen = asyncio.create_task(listener.run(), name="cancel-listener")
        taking = asyncio.create_task(
            takeover.serve(stopping, settings.shutdown_grace_s), name="takeover"
        )
        gc_watch = GCWatch(metrics).install()
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
            stopping.set()
            await asyncio.gather(taking, return_exceptions=True)
            gc_watch.uninstall()
            listener.request_stop()
            listen.cancel()
            await asyncio.gather(listen, return_exceptions=True)
    log.info("ai_consumer %s stopped", settings.instance_id)
