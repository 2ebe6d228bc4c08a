"""`python -m cancel_listener`: the standalone broadcast cancel listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from prometheus_client import start_http_server

from cancel_listener.listener import CancelListener
from chatpipe.clients import make_consumer, make_producer, make_redis
from chatpipe.logs import setup_logging
from chatpipe.metrics import Metrics
from chatpipe.settings import Settings
from chatpipe.state import State

log = logging.getLogger("cancel_listener")


async def serve(settings: Settings) -> None:
    metrics = Metrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.api_host, registry=metrics.registry)
    redis = make_redis(settings, max_connections=8)
    consumer = make_consumer(settings, group_id=None)
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    try:
        listener = CancelListener(
            settings, consumer, redis, State(redis, settings), metrics, producer
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, listener.request_stop)
        log.info("cancel_listener %s reading %s", settings.instance_id, settings.cancels_topic)
        await listener.run()
    finally:
        for closer in (consumer.stop, producer.stop, redis.aclose):
            with contextlib.suppress(Exception):
                await closer()


def main() -> None:
    settings = Settings()
    setup_logging(settings, "cancel_listener")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
