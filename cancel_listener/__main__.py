"""`python -m cancel_listener`: the standalone broadcast cancel listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from cancel_listener.listener import CancelListener
from cancel_listener.sweeper import CancelSweeper
from chatpipe.clients import make_consumer, make_producer, make_redis, verify_redis
from chatpipe.entry import run_service
from chatpipe.gcwatch import GCWatch, freeze_startup
from chatpipe.logs import setup_logging
from chatpipe.metrics import Metrics, serve_metrics
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger("cancel_listener")


async def serve(settings: Settings) -> None:
    metrics = Metrics()
    endpoint = serve_metrics(metrics, settings.metrics_bind, settings.metrics_port)
    redis = make_redis(settings, max_connections=8)
    consumer = make_consumer(settings, group_id=None)
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    try:
        await verify_redis(redis, settings)  # a refused Redis login fails start-up, clearly
        state = State(redis, settings)
        sweeper = None
        if settings.cancel_sweep_interval_s > 0:

            async def send_tombstone(key: bytes) -> object:
                return await producer.send(settings.cancels_topic, None, key=key)

            sweeper = CancelSweeper(
                state,
                send_tombstone,
                metrics,
                max_age_s=settings.cancel_record_max_age_s,
                interval_s=settings.cancel_sweep_interval_s,
                grace_s=settings.cancel_sweep_grace_s,
                session_ttl_s=settings.cancel_queued_ttl_s,
            )
        listener = CancelListener(
            settings, consumer, redis, state, metrics, producer, sweeper=sweeper
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, listener.request_stop)
        log.info("cancel_listener %s reading %s", settings.instance_id, settings.cancels_topic)
        gc_watch = GCWatch(metrics).install()
        try:
            await listener.run()
        finally:
            gc_watch.uninstall()
    finally:
        for closer in (consumer.stop, producer.stop, redis.aclose):
            with contextlib.suppress(Exception):
                await closer()
        if endpoint is not None:
            endpoint.close()


def main() -> None:
    settings = Settings()
    setup_logging(settings, "cancel_listener")
    freeze_startup(settings.gc_freeze)  # what imports left: out of the GC's way
    run_service(serve(settings), "cancel_listener", settings.event_loop)


if __name__ == "__main__":
    main()
